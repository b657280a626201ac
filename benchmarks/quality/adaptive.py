"""The adaptive prefix schedule and latent permutation against fixed groups and Pareto (#19).

The hard toy, budget, metrics and ratios of ``benchmarks.quality.run`` (its ``main``, run
with these variants): absorption of parents, FVU at the full width and at P = width/16,
dead latents, each against the plain TopK coder. Variants: Bussmann's fixed groups
(``mat``), the truncated-Pareto sampled prefixes (``mat_pareto``), ``prefix_schedule='adaptive'``,
``permute_every`` on fixed groups, and both together; each moves every 64 of the 1024
steps. Its own defaults: settings w2_k6,w4_k6, seeds 0,1.

    python -m benchmarks.quality.adaptive --settings w2_k6 --seeds 0

writes adaptive.json and adaptive.md here (``--out-dir`` elsewhere).
"""

import sys

from benchmarks.quality import run

EVERY = 64
ADAPTIVE_VARIANTS: dict[str, tuple[dict, dict]] = {
    "base": run.VARIANTS["base"],
    "mat": run.VARIANTS["mat"],
    "mat_pareto": run.VARIANTS["mat_pareto"],
    "mat_adaptive": ({"matryoshka": True, "prefix_schedule": "adaptive", "adaptive_every": EVERY}, {}),
    "mat_permute": ({"matryoshka": True, "permute_every": EVERY}, {}),
    "mat_adaptive_permute": (
        {"matryoshka": True, "prefix_schedule": "adaptive", "adaptive_every": EVERY, "permute_every": EVERY}, {}
    ),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # Later flags win in argparse: the caller's settings and seeds replace these.
    run.main(["--settings", "w2_k6,w4_k6", "--seeds", "0,1", *argv],
             variant_table=ADAPTIVE_VARIANTS, module="benchmarks.quality.adaptive", stem="adaptive")


if __name__ == "__main__":
    main()
