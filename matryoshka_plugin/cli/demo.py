"""``matryoshka-demo``: Matryoshka vs TopK transcoders on SmolLM2 and Austen, offline on CPU,
on to attribution graphs at three prefix lengths.

Options and output only; the job is ``demo_job.run``.
"""

import argparse
import sys

from ..corpus import AUSTEN_NOVELS
from ..demo_job import PROMPT, RECIPES, format_summary, format_table, run
from ..offline import SMOLLM2
from .runner import run as run_cli

PROG = "matryoshka-demo"


def _recipe_default(name: str, none: str = "all") -> str:
    """The help text's default of an option that each ``--recipe`` sets."""
    shown = {
        recipe: none if v is None else " ".join(map(str, v)) if isinstance(v, list) else str(v)
        for recipe, v in ((r, RECIPES[r][name]) for r in RECIPES)
    }
    if len(set(shown.values())) == 1:
        return f"default {next(iter(shown.values()))}"
    return "default " + ", ".join(f"{v} with --recipe {r}" for r, v in shown.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train Matryoshka and plain TopK transcoders on SmolLM2's MLPs on Jane "
        "Austen (offline, CPU), plot held-out FVU against prefix length, export the "
        "Matryoshka set for circuit-tracer and build attribution graphs at three prefix lengths.",
    )
    p.add_argument("--out", default="matryoshka-demo", help="output folder (default %(default)s)")
    p.add_argument("--recipe", default="demo", choices=list(RECIPES),
                   help="demo: three layers in minutes; full: every layer in about two hours "
                   "of CPU, checkpointed (rerun the same command to resume)")
    p.add_argument("--model", default=SMOLLM2,
                   help="a .gguf, a Hugging Face folder, a hub name, or 'smollm2' (default)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help=f"MLP layers to train transcoders on ({_recipe_default('layers')})")
    p.add_argument("--num-latents", type=int, default=None,
                   help=f"dictionary width ({_recipe_default('num_latents')})")
    p.add_argument("--k", type=int, default=None,
                   help=f"active latents per token ({_recipe_default('k')})")
    p.add_argument("--ctx-len", type=int, default=None,
                   help=f"tokens per sequence ({_recipe_default('ctx_len')})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per step ({_recipe_default('batch_size')})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per dictionary ({_recipe_default('steps')})")
    p.add_argument("--save-every", type=int, default=None,
                   help=f"steps between training checkpoints ({_recipe_default('save_every', none='only at the end')})")
    p.add_argument("--optimizer", default="signum", choices=["adam", "signum", "muon"],
                   help="sparsify optimizer (default %(default)s, sparsify's own default)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: sparsify's width-scaled rule)")
    p.add_argument("--lr-warmup-steps", type=int, default=20, help="Adam warm-up steps")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help=f"held-out tokens for FVU ({_recipe_default('eval_tokens')})")
    p.add_argument("--novels", nargs="+", default=None, choices=list(AUSTEN_NOVELS),
                   help="train/evaluate on these novels only (default all six)")
    p.add_argument("--prompt", default=PROMPT, help="text of the attribution graphs (default: "
                   "the opening of Pride and Prejudice)")
    p.add_argument("--max-feature-nodes", type=int, default=2048,
                   help="most feature nodes per attribution graph (default %(default)s)")
    p.add_argument("--attribution-batch-size", type=int, default=64,
                   help="backward passes batched in attribution (default %(default)s)")
    p.add_argument("--viewer-tokens", type=int, default=4096,
                   help="held-out tokens scanned for the viewer's feature pages (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and initialisation seed")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    return p


def _demo(args) -> None:
    from pathlib import Path

    done = run(args)
    results = done["results"]
    print()
    print(f"Held-out FVU by prefix length ({results['settings']['eval_tokens']:,} tokens):")
    print(format_table(results))
    print()
    print(format_summary(results, done["graphs"], Path(args.out)))


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print its table and summary; 2 and one line on a user's mistake."""
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _demo(args))


if __name__ == "__main__":
    sys.exit(main())
