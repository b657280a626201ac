"""Which of Bussmann's training differences gives his code its lower full-width FVU (#20).

On the hard toy his Matryoshka BatchTopK reaches full-width FVU 0.060 where the plugin in
his set-up reaches 0.084 (benchmarks/authors, 3 seeds). His code differs from sparsify's
Trainer in four ways that touch reconstruction; this trains the plugin once with each of
them switched to his, and with all four, on the same rows, budget and metrics as
``benchmarks.authors`` (hard toy: width 192, k 6, 1024 steps of 512 rows, Adam 3e-3):

- ``no_encoder_bias``: his ``b_enc`` is never added; here it is zeroed and frozen.
- ``constant_lr``: his learning rate is constant; sparsify warms up (a tenth of the run,
  as ``fit_activations`` sets it) and decays linearly to 0.
- ``beta2_099``: his Adam has beta2 0.99; torch's default is 0.999.
- ``auxk``: his loss adds AuxK (penalty 1/32, a latent dead after 20 batches without
  firing); sparsify's AuxK with the same penalty and threshold. (His MSE where sparsify
  has FVU only rescales each batch's loss by a constant, which Adam all but ignores.)

Each variant is trained for a Matryoshka coder and for its one-level baseline, so the
ratio #20 asks about (Matryoshka over the baseline with the same activation rule) is
read off per variant: a lever that lowers both FVUs alike leaves the ratio where it was.

    python -m benchmarks.quality.bussmann_gap --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch

import matryoshka_plugin.fit as fit_module
from benchmarks.authors.run import default_suite, measure, plan_budget, suite_data, train_plugin, warmup_steps
from benchmarks.common import provenance
from benchmarks.toy.run import summarise
from matryoshka_plugin.adapters.sparsify import MatryoshkaTrainer

HERE = Path(__file__).resolve().parent
LEVERS = ("no_encoder_bias", "constant_lr", "beta2_099", "auxk")
VARIANTS = {"plugin": (), **{lever: (lever,) for lever in LEVERS}, "all_four": LEVERS}
# coder -> (its row in benchmarks.authors, the baseline it is compared with)
CODERS = {
    "matryoshka_batch_topk": ("matryoshka_bussmann_like", "batch_topk"),
    "batch_topk": ("batch_topk", None),
    "matryoshka_topk": ("matryoshka_fixed", "topk"),
    "topk": ("topk", None),
}
DEAD_AFTER_BATCHES = 20  # Bussmann's n_batches_to_dead
AUX_PENALTY = 1 / 32  # Bussmann's aux_penalty


def lever_trainer(levers: tuple[str, ...]) -> type[MatryoshkaTrainer]:
    """sparsify's Trainer with ``levers`` switched to Bussmann's after it is built."""

    class LeverTrainer(MatryoshkaTrainer):
        def __init__(self, cfg, dataset, model):
            super().__init__(cfg, dataset, model)
            (adam,) = self.optimizers
            if "constant_lr" in levers:
                self.lr_schedulers = [torch.optim.lr_scheduler.LambdaLR(adam, lambda step: 1.0)]
            if "beta2_099" in levers:
                for group in adam.param_groups:
                    group["betas"] = (group["betas"][0], 0.99)
            if "no_encoder_bias" in levers:
                for sae in self.saes.values():
                    sae.encoder.bias.data.zero_()
                    sae.encoder.bias.requires_grad_(False)

    return LeverTrainer


def train(coder: str, levers: tuple[str, ...], x, budget, suite, seed: int):
    kwargs = {}
    if "constant_lr" in levers:
        kwargs["lr_warmup_steps"] = 0
    if "auxk" in levers:
        kwargs.update(auxk_alpha=AUX_PENALTY, dead_feature_threshold=DEAD_AFTER_BATCHES * suite.batch_size)
    with mock.patch.object(fit_module, "MatryoshkaTrainer", lever_trainer(levers)):
        trained, _ = train_plugin(CODERS[coder][0], x, budget, suite, seed, **kwargs)
    return trained


def run(seeds: list[int], coders: list[str], variants: list[str]) -> dict:
    x_train, x_test, toy, f_test = suite_data("hard_toy", None, 0, 0.0, 0)
    suite = default_suite("hard_toy")
    budget = plan_budget(len(x_train), suite.steps, suite.batch_size)
    per_seed: dict[str, dict[str, list[dict]]] = {c: {v: [] for v in variants} for c in coders}
    for seed in seeds:
        for coder in coders:
            for variant in variants:
                m = measure(train(coder, VARIANTS[variant], x_train, budget, suite, seed),
                            x_test, [suite.width // 16, suite.width], toy, f_test)
                per_seed[coder][variant].append(m)
                print(f"seed {seed} {coder} {variant}: FVU {m['fvu_full']:.4f} "
                      f"absorption {m['absorption_rate']:.3f} dead {m['dead']}", file=sys.stderr, flush=True)
    return {**provenance("benchmarks.quality.bussmann_gap"),
            "settings": {"suite": "hard_toy", "width": suite.width, "k": suite.k, "steps": budget.steps,
                         "batch_size": suite.batch_size, "lr": suite.lr, "seeds": seeds,
                         "warmup_steps": warmup_steps(budget.steps)},
            "per_seed": per_seed}


def metrics(m: dict, width: int) -> dict:
    return {"fvu": m["fvu_full"], "fvu_w16": m["fvu_vs_prefix"][str(width // 16)],
            "absorption": m["absorption_rate"], "dead": m["dead"]}


def table(result: dict) -> list[str]:
    width = result["settings"]["width"]
    per_seed = result["per_seed"]
    lines = ["| coder | variant | full FVU | FVU P=w/16 | absorption | dead | full FVU / baseline | absorption / baseline |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for coder, variants in per_seed.items():
        base = CODERS[coder][1]
        for variant, runs in variants.items():
            ms = [metrics(r, width) for r in runs]
            cells = [summarise([m[k] for m in ms]) for k in ("fvu", "fvu_w16", "absorption", "dead")]
            row = [f"{c['mean']:.3f} ± {c['std']:.3f}" if i < 3 else f"{c['mean']:.1f}" for i, c in enumerate(cells)]
            ratios = ["", ""]
            if base in per_seed and variant in per_seed[base]:
                bs = [metrics(r, width) for r in per_seed[base][variant]]
                ratios = [f"{summarise([m[k] / b[k] for m, b in zip(ms, bs)])['mean']:.2f}"
                          for k in ("fvu", "absorption")]
            lines.append(f"| {coder} | {variant} | " + " | ".join(row + ratios) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--coders", type=lambda s: s.split(","), default=list(CODERS))
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=HERE / "bussmann_gap")
    p.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                   help="merge these result files into OUT.md instead of training")
    args = p.parse_args(argv)
    for name, allowed in (("coders", CODERS), ("variants", VARIANTS)):
        if bad := [v for v in getattr(args, name) if v not in allowed]:
            p.error(f"--{name} {bad[0]!r} is unknown; allowed: {', '.join(allowed)}")
    if missing := [f for f in args.report or [] if not f.is_file()]:
        p.error(f"--report {str(missing[0])!r} is not a file; expected a JSON this script wrote")
    torch.set_num_threads(1)
    if args.report is None:
        result = run(args.seeds, args.coders, args.variants)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        results = [result]
    else:
        results = [json.loads(f.read_text()) for f in args.report]
    merged = dict(results[0], per_seed={c: v for r in results for c, v in r["per_seed"].items()})
    lines = [f"{r['date']}, {r['machine']}: `{r['command']}`" for r in results]
    args.out.with_suffix(".md").write_text("\n\n".join(lines + ["\n".join(table(merged))]) + "\n")
    print("\n".join(table(merged)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
