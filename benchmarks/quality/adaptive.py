"""The adaptive prefix schedule and latent permutation against fixed groups and Pareto (#19).

The hard toy and budget of ``benchmarks.quality.run`` (same helpers, same ratios to
the plain TopK coder): absorption of parents, FVU at the full width and at P = width/16,
dead latents. Variants: Bussmann's fixed groups (``mat``), Nabeshima's Pareto
(``mat_pareto``), ``prefix_schedule='adaptive'``, ``permute_every`` on fixed groups, and
both together; each moves every 64 of the 1024 steps.

    python -m benchmarks.quality.adaptive --settings w2_k6,w4_k6 --seeds 0,1

writes adaptive.json and adaptive.md here (``--out-dir`` elsewhere).
"""

import argparse
import os

import torch

from benchmarks.common import provenance, write_json, write_markdown
from benchmarks.quality.run import HERE, VARIANTS, markdown, ratio_rows, setting_grid, train_and_measure
from matryoshka_plugin.toy import ToyModel, hard_toy_config, oracle_fvu

EVERY = 64
ADAPTIVE_VARIANTS: dict[str, tuple[dict, dict]] = {
    "base": VARIANTS["base"],
    "mat": VARIANTS["mat"],
    "mat_pareto": VARIANTS["mat_pareto"],
    "mat_adaptive": ({"matryoshka": True, "prefix_schedule": "adaptive", "adaptive_every": EVERY}, {}),
    "mat_permute": ({"matryoshka": True, "permute_every": EVERY}, {}),
    "mat_adaptive_permute": (
        {"matryoshka": True, "prefix_schedule": "adaptive", "adaptive_every": EVERY, "permute_every": EVERY}, {}
    ),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", type=lambda s: s.split(","), default=["w2_k6", "w4_k6"])
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(ADAPTIVE_VARIANTS))
    p.add_argument("--seeds", type=lambda s: [int(t) for t in s.split(",")], default=[0, 1])
    p.add_argument("--train-rows", type=int, default=65536)
    p.add_argument("--test-rows", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=HERE)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if unknown := [v for v in args.variants if v not in ADAPTIVE_VARIANTS]:
        p.error(f"unknown variants {unknown}; allowed: {', '.join(ADAPTIVE_VARIANTS)}")
    variants = ["base", *[v for v in args.variants if v != "base"]]
    toy = ToyModel(hard_toy_config())
    x_train, _ = toy.sample(args.train_rows, seed=1000)
    x_test, f_test = toy.sample(args.test_rows, seed=2000)
    results, per_run, oracles = {}, [], {}
    for s in setting_grid(args.settings):
        width, k = s["width_multiple"] * toy.cfg.n_features, s["k"]
        oracles[s["name"]] = {
            "fvu_no_absorption": oracle_fvu(toy, f_test, k, absorb=False),
            "fvu_full_absorption": oracle_fvu(toy, f_test, k, absorb=True),
        }
        results[s["name"]] = {}
        for v in variants:
            fields, kwargs = ADAPTIVE_VARIANTS[v]
            runs = []
            for seed in args.seeds:
                m = train_and_measure(fields, kwargs, x_train, x_test, f_test, toy, width, k, args, seed)
                runs.append(m)
                per_run.append({"setting": s["name"], "variant": v, "seed": seed, "width": width, "k": k, **m})
                print(s["name"], v, seed, {a: round(b, 4) for a, b in m.items()}, flush=True)
            results[s["name"]][v] = runs
    meta = provenance("benchmarks.quality.adaptive", argv)
    rows = ratio_rows(results, variants)
    for r in rows:
        r.update(oracles[r["setting"]])
    write_json({**meta, "args": vars(args), "runs": per_run, "ratios": rows},
               os.path.join(args.out_dir, "adaptive.json"))
    table = markdown(rows, meta)
    write_markdown(table.splitlines(), os.path.join(args.out_dir, "adaptive.md"))
    print(table)


if __name__ == "__main__":
    main()
