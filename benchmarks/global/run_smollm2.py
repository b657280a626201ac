"""Global graph and causal checks per prefix on SmolLM2-135M with the attribution run's
Matryoshka transcoders (``benchmarks/attribution/run_smollm2.py`` leaves them under
``$MATRYOSHKA_CACHE/attribution-bench`` (``benchmarks.common.scratch_dir``): a sparsify run ``demo/checkpoints/austen`` with one
transcoder per MLP layer, width 1152, k 32, nested sizes 72/144/288/576/1152, and its
circuit-tracer export ``export-topk``).

1. ``matryoshka-global`` on the Austen corpus for layers ``--global-layers`` (the pair
   statistics grow with layers^2 * k^2 per token, so a few layers on a CPU).
2. Causal checks (``matryoshka_plugin.causal.prefix_causal_report``) on the circuit-tracer
   ``ReplacementModel``: for each prefix length, the strongest active features inside the
   prefix are ablated (factor 0) and doubled (factor 2); mechanistic fidelity (cosine,
   normalised MSE of the last layer's residual change, original vs local replacement
   model) and the last-token logit change of constrained and iterative patching.

Usage: python -m benchmarks.global.run_smollm2 [--prefix-lens 72 288 1152] [--n-tokens 3000]
Writes results/smollm2_global/ (edge lists, plots) and results/<--name>.{json,md,png} (default smollm2_causal).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import provenance, scratch_dir, write_json, write_markdown

HERE = Path(__file__).parent
PROMPTS = ["The capital of France is", "Mr. Darcy looked at Elizabeth and"]


def main() -> None:
    bench = scratch_dir("attribution-bench")
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=str(bench / "demo" / "checkpoints" / "austen"))
    ap.add_argument("--export", default=str(bench / "export-topk"))
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=[72, 288, 1152])
    ap.add_argument("--global-layers", default="0-3")
    ap.add_argument("--n-tokens", type=int, default=3000)
    ap.add_argument("--n-features", type=int, default=4)
    ap.add_argument("--min-position", type=int, default=1, help="patch only features at positions >= this (1: all but BOS)")
    ap.add_argument("--max-layer", type=int, default=28, help="patch only features at layers <= this")
    ap.add_argument("--skip-global", action="store_true")
    ap.add_argument("--name", default="smollm2_causal", help="stem of the causal result files under results/")
    ap.add_argument("--label", default=None, help="how the report describes the transcoders (default: the attribution run's)")
    args = ap.parse_args()
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    meta = dict(
        **provenance(__spec__.name),
        checkpoint=args.checkpoint,
    )
    if not args.skip_global:
        from matryoshka_plugin.cli.global_graph import main as global_main

        start = time.perf_counter()
        rc = global_main([
            args.checkpoint, "--corpus", "austen", "--model", "smollm2", "--layers", args.global_layers,
            "--prefix-len", *map(str, args.prefix_lens), "--n-tokens", str(args.n_tokens), "--ctx-len", "128",
            "--out", str(res / "smollm2_global"), "--overwrite",
        ])
        if rc:
            sys.exit(rc)
        meta["global_seconds"] = time.perf_counter() - start

    from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
    from matryoshka_plugin.causal import plot_fidelity, prefix_causal_report, summarise_fidelity

    start = time.perf_counter()
    tc, _ = load_transcoders_dir(args.export)
    model = load_local_replacement_model("smollm2", tc)
    meta["load_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    rows = prefix_causal_report(
        model, PROMPTS, args.prefix_lens, factors=(0.0, 2.0), n_features=args.n_features, min_position=args.min_position,
        max_layer=args.max_layer,
    )
    meta["causal_seconds"] = time.perf_counter() - start
    write_json(dict(meta=meta, rows=rows), res / f"{args.name}.json")
    lines = [
        f"Measured {meta['date']} by `{meta['command']}` ({meta['machine']}).",
        f"SmolLM2-135M, {args.label or f'Matryoshka TopK transcoders from the attribution run ({args.checkpoint})'}; prompts {PROMPTS};",
        f"{args.n_features} strongest active features inside each prefix per prompt (layers 0..{args.max_layer}, positions >= {args.min_position}).",
        "",
    ]
    table, summary = summarise_fidelity(rows, args.prefix_lens)
    lines += table
    lines += ["", "Patched features (P, prompt, layer, position, feature, factor, cosine, NMSE):", ""]
    lines += [
        f"- P={r['prefix_len']} '{r['prompt'][:20]}' L{r['layer']} pos {r['position']} f{r['feature']} x{r['factor']:g}: "
        f"cos {r['cosine']:.3f}, NMSE {r['nmse']:.3f}"
        for r in rows
    ]
    write_markdown(lines, res / f"{args.name}.md")
    plot_fidelity(summary, args.prefix_lens, f"SmolLM2-135M, patched strongest features inside each prefix ({meta['date'][:10]})", res / f"{args.name}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
