"""Global graph of a Matryoshka cross-layer transcoder on SmolLM2-135M (issue #9).

Runs ``matryoshka-global`` on a CLT directory (``matryoshka-clt train``'s ``save_dir/clt``)
over the offline Austen corpus, for a few prefixes and a few of the CLT's layers (the pair
statistics grow with layers^2 * k^2 per token), on one CPU thread. Then, from the CLT's
weights alone, how much of what a feature writes before each target layer comes from its
cross-layer decoder slots rather than its own layer's slot: the median over features
``i < P`` of ``||D_m[i] - W_dec[l][i, 0]|| / ||D_m[i]||``, where ``D_m`` is the effective
decoder (``core.edge_scores.clt_effective_decoders``). 0 means a per-layer transcoder
would give the same virtual weights.

Usage: OMP_NUM_THREADS=1 python -m benchmarks.global.run_clt CLT_DIR
           [--layers 0,10,20,29] [--prefix-lens 64 256 ...] [--n-tokens 4096]
Writes results/smollm2_clt_global/ (edge lists, plots, meta.json) and
results/smollm2_clt_global.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# One thread, set before anything imports torch (the machine is shared).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from benchmarks.common import command_line, machine_description, utc_timestamp, write_json, write_markdown  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from matryoshka_plugin.cli.global_graph import main as global_main
    from matryoshka_plugin.clt import load_clt
    from matryoshka_plugin.core.edge_scores import clt_effective_decoders
    from matryoshka_plugin.global_graph import clt_checkpoint_dir

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", help="CLT directory (or a matryoshka-clt run directory holding clt/)")
    ap.add_argument("--layers", default=None, help="CLT layers to use (default: four spread over the CLT)")
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=None, help="default: the CLT's nested sizes")
    ap.add_argument("--n-tokens", type=int, default=4096)
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=str(HERE / "results" / "smollm2_clt_global"))
    args = ap.parse_args()

    path = clt_checkpoint_dir(args.checkpoint)
    if path is None:
        sys.exit(f"run_clt.py: error: {args.checkpoint} holds no matryoshka CLT config.json")
    clt = load_clt(path)
    if args.layers is None:
        L = clt.layers
        picks = sorted({L[0], L[len(L) // 3], L[2 * len(L) // 3], L[-1]})
        args.layers = ",".join(map(str, picks))
    if args.prefix_lens is None:
        args.prefix_lens = list(clt.nested_sizes)
    command = "OMP_NUM_THREADS=1 " + command_line(__spec__.name)
    argv = [
        str(path), "--corpus", "austen", "--model", args.model, "--layers", args.layers,
        "--prefix-len", *map(str, args.prefix_lens), "--n-tokens", str(args.n_tokens),
        "--ctx-len", str(args.ctx_len), "--top-k", str(args.top_k), "--out", args.out, "--overwrite",
    ]
    start = time.perf_counter()
    rc = global_main(argv)
    if rc:
        sys.exit(rc)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    meta = json.loads((out / "meta.json").read_text())
    chosen = meta["layers"]

    # Cross-layer share of each feature's effective decoder, per layer pair and prefix.
    share = {}
    with torch.no_grad():
        for a in chosen:
            s = clt.layers.index(a)
            dec = clt.W_dec[s].float()
            own = dec[:, 0]
            for b, eff in clt_effective_decoders(dec, clt.layers, s, [b for b in chosen if b > a]):
                ratio = (eff - own).norm(dim=1) / eff.norm(dim=1).clamp_min(1e-12)
                share[f"{a}->{b}"] = {p: float(ratio[:p].median()) for p in args.prefix_lens}

    edges_by_p = {r["prefix_len"]: r["n_edges"] for r in meta["prefixes"]}
    date = utc_timestamp()
    machine = machine_description()
    summary = dict(
        command=command, date=date, machine=machine, clt=str(path), clt_layers=clt.layers,
        width=clt.num_latents, k=clt.cfg.k, layers=chosen, n_tokens=meta["n_tokens"],
        n_coactive_pairs=meta["n_coactive_pairs"], seconds_total=seconds,
        seconds_stats_and_edges=meta["seconds"], edges=edges_by_p, cross_layer_share=share,
    )
    write_json(summary, out.parent / "smollm2_clt_global.json")
    lines = [
        f"Measured {date} by `{command}` ({machine}).",
        "",
        f"CLT `{path}`: layers {clt.layers[0]}..{clt.layers[-1]} ({clt.n_layers}), width {clt.num_latents}, "
        f"k {clt.cfg.k}, nested sizes {clt.nested_sizes}. Graph over CLT layers {chosen}, "
        f"{meta['n_tokens']} Austen tokens, {meta['n_coactive_pairs']} co-active pairs, top {args.top_k} "
        f"targets per source by |TWERA|; {seconds:.0f} s in all ({meta['seconds']:.0f} s statistics + edges).",
        "",
        "| P | edges |",
        "|---|---|",
        *[f"| {p} | {n} |" for p, n in edges_by_p.items()],
        "",
        "Median over features i < P of ||D_m[i] - W_dec[l][i, own layer]|| / ||D_m[i]||: the share of what a "
        "source feature writes before the target's MLP that comes from its cross-layer decoder slots.",
        "",
        "| pair | " + " | ".join(f"P={p}" for p in args.prefix_lens) + " |",
        "|---|" + "---|" * len(args.prefix_lens),
        *[f"| {k} | " + " | ".join(f"{v[p]:.2f}" for p in args.prefix_lens) + " |" for k, v in share.items()],
    ]
    write_markdown(lines, out.parent / "smollm2_clt_global.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
