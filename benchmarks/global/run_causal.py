"""Causal checks per prefix on a small honest setup (no SmolLM2 transcoder set exists).

The attribution helper's real run left SmolLM2 transcoders for layers 0-2 only (a
30-layer model); circuit-tracer's ``ReplacementModel`` needs one transcoder per layer, so
the causal checks here run on a small random Llama (the tests' tiny-Llama builder,
widened) whose every MLP gets a Matryoshka transcoder *trained* on its own MLP
inputs/outputs (sparsify's Trainer via ``fit_activations``). For each prefix length P the
strongest active features inside the prefix (layers before the last) are patched with
factor 0 (ablation) and 2; reported: mechanistic fidelity (cosine, normalised MSE of the
last layer's residual change, original vs local replacement model), and the last-token
logit change of constrained and iterative patching.

Usage: python -m benchmarks.global.run_causal [--width 128] [--tokens 30000]
Writes results/causal.json, results/causal.md, results/causal.png next to this file.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import provenance, write_json, write_markdown
from tests import tiny as fx

HERE = Path(__file__).parent


def mlp_io(model, tokens: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every MLP's ``(inputs, outputs)`` on ``tokens`` as ``[rows, d_model]``, BOS dropped."""
    from matryoshka_plugin.hooks import capture_mlps, mlp_modules

    layers = sorted(mlp_modules(model))
    got = {l: ([], []) for l in layers}
    with torch.no_grad(), capture_mlps(model, layers) as run:
        for b in tokens.split(64):
            for l, act in run(b).items():
                got[l][0].append(act.input[:, 1:].flatten(0, 1))
                got[l][1].append(act.output[:, 1:].flatten(0, 1))
    return {l: (torch.cat(i), torch.cat(o)) for l, (i, o) in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=30000)
    ap.add_argument("--n-features", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    from tqdm import tqdm

    from matryoshka_plugin import MatryoshkaSparseCoderConfig
    from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
    from matryoshka_plugin.adapters.circuit_tracer.sparsify_export import export_transcoder_set
    from matryoshka_plugin.causal import plot_fidelity, prefix_causal_report, summarise_fidelity
    from matryoshka_plugin.fit import fit_activations
    from matryoshka_plugin.offline import load_pretrained

    nested = [args.width // 8, args.width // 4, args.width // 2, args.width]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        llama = fx.build_tiny_llama(tmp / "llama", d_model=args.d_model, n_layers=args.layers)
        hf = load_pretrained(str(llama))
        rng = random.Random(0)
        seq = 32
        vocab_ids = list(range(3, 3 + len(fx.WORDS)))
        rows = [[1] + [rng.choice(vocab_ids) for _ in range(seq - 1)] for _ in range(args.tokens // (seq - 1) + 1)]
        io = mlp_io(hf, torch.tensor(rows))
        run = tmp / "run"
        fvu = {}
        for l in tqdm(sorted(io), desc="training transcoders"):
            x, y = io[l]
            cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=args.width, k=args.k, transcode=True, nested_sizes=nested[:-1])
            coder = fit_activations(x, cfg, targets=y, batch_size=512, seq_len=64, epochs=3, optimizer="adam", lr=3e-3, lr_warmup_steps=10)
            with torch.no_grad():
                fvu[l] = {p: float(v) for p, v in coder.prefix_fvu(x[:4000], y[:4000], nested).items()} if hasattr(coder, "prefix_fvu") else {}
            coder.save_to_disk(run / f"layers.{l}.mlp")
        tc, _ = load_transcoders_dir(export_transcoder_set(run, tmp / "tc"))
        model = load_local_replacement_model(llama, tc)
        prompts = [" ".join(rng.choice(fx.WORDS) for _ in range(10)) for _ in range(3)]
        rows_out = prefix_causal_report(model, prompts, nested, factors=(0.0, 2.0), n_features=args.n_features)
    seconds = time.perf_counter() - start
    meta = dict(
        **provenance(__spec__.name),
        setup=f"random Llama d_model={args.d_model}, {args.layers} layers, word-level vocab of {len(fx.WORDS)}; "
        f"Matryoshka TopK transcoders width {args.width}, k={args.k}, nested {nested}, trained on {args.tokens} tokens",
        transcoder_fvu=fvu,
        seconds=seconds,
    )
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    write_json(dict(meta=meta, rows=rows_out), res / "causal.json")
    lines = [
        f"Measured {meta['date']} by `{meta['command']}` ({meta['machine']}).",
        f"Setup (small and honest, not SmolLM2): {meta['setup']}.",
        "",
    ]
    table, summary = summarise_fidelity(rows_out, nested)
    lines += table
    lines += ["", "Transcoder FVU per prefix (layer: {P: FVU}): " + json.dumps(fvu)]
    write_markdown(lines, res / "causal.md")
    plot_fidelity(summary, nested, "patched strongest features inside each prefix (small random Llama, trained transcoders)", res / "causal.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
