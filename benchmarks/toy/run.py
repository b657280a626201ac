"""Toy model with ground truth: absorption, splitting and best-match cosine per baseline.

Every plugin baseline is trained through sparsify's own Trainer (``fit_activations``) on the
same hierarchical toy activations, with the same width and k, for several seeds:

- ``topk``: plain sparsify TopK (``matryoshka=False``);
- ``topk_reordered``: the same coders with latents sorted by mean squared activation
  (seed 003, section 4). Ground-truth metrics do not depend on latent order, so it
  only differs from ``topk`` in the FVU-vs-prefix curve;
- ``matryoshka_fixed``: Bussmann's fixed groups (1/16, 1/16, 1/8, 1/4, 1/2 of the width);
- ``matryoshka_pareto``: truncated-Pareto sampled prefixes (Nabeshima's idea, not his distribution: benchmarks/authors), resampled every step;
- ``batch_topk``: BatchTopK with a single level (the anchor's baseline);
- ``matryoshka_batch_topk``: fixed groups with BatchTopK (the anchor's Matryoshka);
- ``saelens_batch_topk`` and ``saelens_matryoshka_batch_topk``: SAELens' own
  ``BatchTopKTrainingSAE`` and ``MatryoshkaBatchTopKTrainingSAE`` (same fixed groups),
  trained by SAELens' own ``SAETrainer`` on the same row batches in the same order, in
  the separate SAELens environment (``saelens_toy.py``, run in a subprocess), and
  evaluated here through SAELens' inference SAE (JumpReLU with the learnt threshold).

Reproduce from the repository root (writes results.json, absorption.png,
fvu_vs_prefix.png, table.md here):

    .venv/bin/python -m benchmarks.toy.run

or train only some baselines and merge them into the existing results.json:

    .venv/bin/python -m benchmarks.toy.run --only saelens_batch_topk,saelens_matryoshka_batch_topk --merge
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from benchmarks.common import SAELENS_PYTHON, provenance, pyplot, save_figure, write_json, write_markdown
from benchmarks.saelens_jumprelu import SaeLensJumpReLU
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.evaluation import prefix_curve, reorder_by_mean_squared_activation
from matryoshka_plugin.fit import fit_activations
from matryoshka_plugin.toy import ToyConfig, ToyModel, ground_truth_metrics

HERE = Path(__file__).resolve().parent
# fit_activations groups rows into pseudo-sequences of this many rows (its default).
FIT_SEQ_LEN = 64

# name -> Matryoshka fields (None: derived from another baseline, not trained)
BASELINES: dict[str, dict | None] = {
    "topk": {"matryoshka": False},
    "topk_reordered": None,
    "matryoshka_fixed": {"matryoshka": True, "prefix_schedule": "fixed"},
    "matryoshka_pareto": {"matryoshka": True, "prefix_schedule": "pareto"},
    # The plugin only swaps in its coder when matryoshka=True, so plain BatchTopK is a
    # Matryoshka coder whose only nested size is the full width (no inner levels).
    "batch_topk": {"matryoshka": True, "batch_topk": True, "nested_sizes": "width"},
    "matryoshka_batch_topk": {"matryoshka": True, "batch_topk": True, "prefix_schedule": "fixed"},
}
# name -> SAELens training architecture (trained by saelens_toy.py in .venv-saelens)
SAELENS_BASELINES: dict[str, str] = {
    "saelens_batch_topk": "batchtopk",
    "saelens_matryoshka_batch_topk": "matryoshka_batchtopk",
}
ALL_BASELINES = [*BASELINES, *SAELENS_BASELINES]
# pairs (BatchTopK, Matryoshka BatchTopK) compared with the paper's absorption anchor
ANCHOR_PAIRS = {
    "toy": ("batch_topk", "matryoshka_batch_topk"),
    "toy_saelens": ("saelens_batch_topk", "saelens_matryoshka_batch_topk"),
}
CHECK_ROWS = 1024
LR_WARMUP_STEPS = 10


def fit_row_order(n_rows: int, seed: int) -> torch.Tensor:
    """The row order ``fit_activations`` trains on (per epoch), mirrored for SAELens."""
    n = (n_rows // FIT_SEQ_LEN) * FIT_SEQ_LEN
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def summarise(values: list[float]) -> dict:
    vals = [v for v in values if v == v]  # drop NaN
    mean = statistics.fmean(vals) if vals else float("nan")
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": values}


def scalar_metrics(gt: dict, curve: list[dict]) -> dict:
    return {
        "absorption_rate": gt["absorption"]["absorption_rate"],
        "parent_miss_rate": gt["absorption"]["parent_miss_rate"],
        "split_fraction": gt["splitting"]["split_fraction"],
        "mean_latents_per_feature": gt["splitting"]["mean_latents_per_feature"],
        "unmatched_fraction": gt["splitting"]["unmatched_fraction"],
        "best_cosine": gt["best_match_cosine"]["mean"],
        "best_cosine_parents": gt["best_match_cosine"]["parents"],
        "best_cosine_children": gt["best_match_cosine"]["children"],
        "fvu_full": curve[-1]["fvu"],
        # BatchTopK coders use a learnt threshold at inference, so their L0 is not k.
        "l0_full": curve[-1]["l0"],
    }


def train_saelens(args, names, x_train, x_check, width, fixed_sizes) -> tuple[dict, dict]:
    """Train the SAELens baselines in the SAELens venv; their adapters and the run metadata.

    Returns ``{(name, seed): SaeLensJumpReLU}`` and SAELens' metadata, with the largest
    difference between the adapter's and SAELens' own reconstruction of ``x_check``.
    """
    py = Path(args.saelens_python)
    if not py.exists():
        raise SystemExit(
            f"error: SAELens Python {py} not found (needed for {', '.join(names)}); "
            "see benchmarks/RESULTS.md to create .venv-saelens, or leave those baselines out with --only"
        )
    spec = {
        "runs": [{"name": n, "architecture": SAELENS_BASELINES[n], "seed": s} for s in args.seeds for n in names],
        "width": width, "k": args.k, "matryoshka_widths": fixed_sizes, "batch_size": args.batch_size,
        "epochs": args.epochs, "lr": args.lr, "lr_warmup_steps": LR_WARMUP_STEPS, "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tensors = {"x_train": x_train.contiguous(), "x_check": x_check.contiguous()}
        tensors.update({f"order_{s}": fit_row_order(len(x_train), s) for s in args.seeds})
        save_file(tensors, str(tmp / "data.safetensors"))
        (tmp / "spec.json").write_text(json.dumps(spec))
        # stderr (SAELens' own progress bars) goes straight to ours.
        res = subprocess.run(
            [str(py), str(HERE / "saelens_toy.py"), str(tmp / "data.safetensors"), str(tmp / "spec.json"),
             str(tmp / "out")],
            stdout=subprocess.PIPE, text=True,
        )
        if res.returncode != 0:
            raise SystemExit(f"error: SAELens training failed (exit {res.returncode}); see its output above")
        meta = json.loads((tmp / "out/meta.json").read_text())
        coders, worst = {}, 0.0
        for run in spec["runs"]:
            saved = load_file(str(tmp / f"out/{run['name']}_seed{run['seed']}.safetensors"))
            # SAELens saves its BatchTopK autoencoders with apply_b_dec_to_input on.
            coder = SaeLensJumpReLU(saved, apply_b_dec_to_input=True, transcode=False, k=args.k)
            recon = coder.decode(*coder.encode(x_check)[:2])
            # The evaluation must see exactly what SAELens' own encode/decode computes.
            diff = max(float((coder.dense_acts(x_check) - saved["ref_acts"]).abs().max()),
                       float((recon - saved["ref_recon"]).abs().max()))
            if diff > 1e-4:
                raise SystemExit(
                    f"error: adapter differs from SAELens' own encode/decode by {diff:.3g} "
                    f"on {run['name']} seed {run['seed']}"
                )
            worst = max(worst, diff)
            coders[(run["name"], run["seed"])] = coder
    meta["adapter_max_abs_diff"] = worst
    meta["adapter_check_rows"] = len(x_check)
    return coders, meta


def run(args, merge_into: dict | None = None) -> dict:
    toy = ToyModel(ToyConfig(seed=args.toy_seed))
    width = args.width or toy.cfg.n_features
    x_train, _ = toy.sample(args.train_rows, seed=1000 + args.toy_seed)
    x_test, f_test = toy.sample(args.test_rows, seed=2000 + args.toy_seed)
    fixed_sizes = MatryoshkaSparseCoderConfig(matryoshka=True).resolve_nested_sizes(width, args.k)
    prefix_lens = sorted({1, 2, *fixed_sizes, *(2**i for i in range(width.bit_length()) if 2**i < width)})
    names = [n for n in ALL_BASELINES if n in args.baselines]
    trained = [n for n in names if n in BASELINES and BASELINES[n] is not None]
    if "topk_reordered" in names and "topk" not in trained:
        trained.insert(0, "topk")
    saelens_names = [n for n in names if n in SAELENS_BASELINES]
    settings = {
        "toy": asdict(toy.cfg), "width": width, "k": args.k, "train_rows": args.train_rows,
        "test_rows": args.test_rows, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "seeds": args.seeds, "matryoshka_fixed_sizes": fixed_sizes,
        "prefix_lens": prefix_lens,
        "mean_true_l0": float((f_test > 0).sum(1).float().mean()),
    }
    if merge_into is not None:
        check_settings(merge_into, settings)  # before training, not after
    per_seed: dict[str, list[dict]] = {n: [] for n in names}
    curves: dict[str, list[list[dict]]] = {n: [] for n in names}
    started = time.time()
    saelens_coders, saelens_meta = {}, None
    if saelens_names:
        saelens_coders, saelens_meta = train_saelens(
            args, saelens_names, x_train, x_test[:CHECK_ROWS], width, fixed_sizes
        )
    bar = tqdm(total=(len(trained) + len(saelens_names)) * len(args.seeds), desc="toy benchmark", file=sys.stderr)
    for seed in args.seeds:
        for name in trained + saelens_names:
            bar.set_postfix_str(f"{name} seed {seed}")
            if name in SAELENS_BASELINES:
                variants = [(name, saelens_coders[(name, seed)])]
            else:
                fields = dict(BASELINES[name])
                if fields.get("nested_sizes") == "width":
                    fields["nested_sizes"] = [width]
                cfg = MatryoshkaSparseCoderConfig(num_latents=width, k=args.k, **fields)
                coder = fit_activations(
                    x_train, cfg, batch_size=args.batch_size, epochs=args.epochs, seed=seed,
                    optimizer="adam", lr=args.lr, lr_warmup_steps=LR_WARMUP_STEPS,
                )
                variants = [(name, coder)]
                if name == "topk" and "topk_reordered" in names:
                    reordered, _ = reorder_by_mean_squared_activation(coder, x_train[:8192])
                    variants.append(("topk_reordered", reordered))
            for vname, c in variants:
                if vname not in names:
                    continue
                curve = prefix_curve(c, x_test, None, prefix_lens, rsa_samples=500)
                gt = ground_truth_metrics(c, toy, x_test, f_test)
                per_seed[vname].append(scalar_metrics(gt, curve))
                curves[vname].append(curve)
            bar.update()
    bar.close()
    summary = {}
    for name in names:
        keys = per_seed[name][0].keys()
        summary[name] = {k: summarise([r[k] for r in per_seed[name]]) for k in keys}
        summary[name]["fvu_vs_prefix"] = {
            str(p): summarise([c[i]["fvu"] for c in curves[name]]) for i, p in enumerate(prefix_lens)
        }
        summary[name]["rsa_vs_prefix"] = {
            str(p): summarise([c[i]["rsa"] for c in curves[name]]) for i, p in enumerate(prefix_lens)
        }
    this_run = {**provenance(__spec__.name), "seconds": round(time.time() - started, 1)}
    result = {
        **this_run,
        "settings": settings,
        "anchor": anchor(summary),
        "summary": summary,
        "per_seed": per_seed,
        "runs": [{**this_run, "baselines": names}],
    }
    if saelens_meta is not None:
        result["saelens"] = saelens_meta
    return result


def anchor(summary: dict) -> dict:
    """Absorption of Matryoshka BatchTopK over BatchTopK, for every pair present, and the paper's."""
    out = {}
    for key, (base, matryoshka) in ANCHOR_PAIRS.items():
        if base in summary and matryoshka in summary:
            b = summary[base]["absorption_rate"]["mean"]
            m = summary[matryoshka]["absorption_rate"]["mean"]
            out[key] = {"matryoshka": m, "batch_topk": b, "ratio": m / b if b else float("nan")}
    if out:
        out = {"paper": {"matryoshka": 0.05, "batch_topk": 0.49, "ratio": 0.05 / 0.49}, **out}
    return out


def check_settings(old: dict, settings: dict) -> None:
    """Exit with a one-line error unless ``old`` results were run with ``settings``."""
    for k, v in settings.items():
        if old.get("settings", {}).get(k) != v:
            raise SystemExit(
                f"error: cannot merge: setting {k!r} is {v!r} here but "
                f"{old.get('settings', {}).get(k)!r} in the existing results; rerun without --merge"
            )


def merge(old: dict, new: dict) -> dict:
    """``old`` results with ``new``'s baselines added or replaced; the settings must agree."""
    check_settings(old, new["settings"])
    order = ALL_BASELINES + [n for n in old["summary"] if n not in ALL_BASELINES]
    summary = {**old["summary"], **new["summary"]}
    per_seed = {**old["per_seed"], **new["per_seed"]}
    runs = old.get("runs") or [
        {k: old[k] for k in ("date", "machine", "command", "seconds")} | {"baselines": list(old["summary"])}
    ]
    merged = {
        **old,
        "summary": {n: summary[n] for n in order if n in summary},
        "per_seed": {n: per_seed[n] for n in order if n in per_seed},
        "runs": runs + new["runs"],
    }
    merged["anchor"] = anchor(merged["summary"])
    if "saelens" in new:
        merged["saelens"] = new["saelens"]
    return merged


def plot(result: dict, out_dir: Path) -> None:
    plt = pyplot()
    summary = result["summary"]
    names = list(summary)
    panels = [("absorption_rate", "absorption rate (lower is better)"),
              ("split_fraction", "features split into >=2 latents"),
              ("best_cosine", "mean best-match cosine (higher is better)"),
              ("fvu_full", "FVU, full width")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2))
    for ax, (key, label) in zip(axes, panels):
        means = [summary[n][key]["mean"] for n in names]
        stds = [summary[n][key]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    n_seeds = len(result["settings"]["seeds"])
    fig.suptitle(f"Hierarchical toy, width {result['settings']['width']}, k {result['settings']['k']}: "
                 f"mean ± std over {n_seeds} seeds")
    fig.tight_layout()
    save_figure(fig, out_dir / "absorption.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, n in enumerate(names):
        for ax, key in zip(axes, ("fvu_vs_prefix", "rsa_vs_prefix")):
            P = [int(p) for p in summary[n][key]]
            m = [summary[n][key][str(p)]["mean"] for p in P]
            s = [summary[n][key][str(p)]["std"] for p in P]
            ax.errorbar(P, m, yerr=s, marker="o", ms=3, capsize=2, label=n, color=f"C{i}")
    axes[0].set(xscale="log", xlabel="prefix length (latents kept)", ylabel="FVU", title="FVU vs prefix")
    axes[1].set(xscale="log", xlabel="prefix length (latents kept)", ylabel="RSA", title="RSA vs prefix")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir / "fvu_vs_prefix.png")


def table(result: dict) -> list[str]:
    s = result["summary"]
    fmt = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
    lines = [
        "| baseline | absorption | parent miss | split fraction | best cosine | cosine parents | cosine children | FVU full | L0 (eval) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, m in s.items():
        lines.append(
            f"| {n} | {fmt(m['absorption_rate'])} | {fmt(m['parent_miss_rate'])} | {fmt(m['split_fraction'])} "
            f"| {fmt(m['best_cosine'])} | {fmt(m['best_cosine_parents'])} | {fmt(m['best_cosine_children'])} "
            f"| {fmt(m['fvu_full'])} | {fmt(m['l0_full'])} |"
        )
    P = list(next(iter(s.values()))["fvu_vs_prefix"])
    lines += ["", "FVU at each prefix length (mean ± std over seeds):", "",
              "| baseline | " + " | ".join(f"P={p}" for p in P) + " |",
              "|---|" + "---|" * len(P)]
    for n, m in s.items():
        lines.append(f"| {n} | " + " | ".join(f"{m['fvu_vs_prefix'][p]['mean']:.3f} ± {m['fvu_vs_prefix'][p]['std']:.3f}" for p in P) + " |")
    if a := result.get("anchor"):
        pairs = "; ".join(
            f"{label} = {a[key]['matryoshka']:.3f}/{a[key]['batch_topk']:.3f} (ratio {a[key]['ratio']:.2f})"
            for key, label in (("toy", "toy (plugin)"), ("toy_saelens", "toy (SAELens)")) if key in a
        )
        lines += ["", f"Anchor: paper absorption Matryoshka/BatchTopK = 0.05/0.49 (ratio {a['paper']['ratio']:.2f}); "
                  f"{pairs}."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=lambda s: [int(t) for t in s.split(",")], default=[0, 1, 2])
    p.add_argument("--width", type=int, default=0, help="dictionary width (default: number of true features)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--train-rows", type=int, default=65536)
    p.add_argument("--test-rows", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--toy-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids contention on shared CPUs)")
    p.add_argument("--only", "--baselines", dest="baselines", type=lambda s: s.split(","), default=ALL_BASELINES,
                   metavar="NAME[,NAME]", help=f"baselines to train (default: all of {','.join(ALL_BASELINES)})")
    p.add_argument("--merge", action="store_true",
                   help="add these baselines to OUT_DIR/results.json (same settings) instead of replacing it")
    p.add_argument("--saelens-python", default=str(SAELENS_PYTHON),
                   help="Python with sae_lens installed, for the saelens_* baselines")
    p.add_argument("--out-dir", type=Path, default=HERE)
    args = p.parse_args(argv)
    unknown = [b for b in args.baselines if b not in ALL_BASELINES]
    if unknown:
        p.error(f"unknown baselines {unknown}; allowed: {', '.join(ALL_BASELINES)}")
    existing = args.out_dir / "results.json"
    if args.merge and not existing.exists():
        p.error(f"--merge needs an existing {existing}; run without --merge first")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    old = json.loads(existing.read_text()) if args.merge else None
    result = run(args, merge_into=old)
    if old is not None:
        result = merge(old, result)
    write_json(result, existing)
    plot(result, args.out_dir)
    write_markdown(table(result), args.out_dir / "table.md")
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
