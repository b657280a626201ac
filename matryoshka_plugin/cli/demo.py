"""``matryoshka-demo``: train Matryoshka transcoders on SmolLM2 and Austen, offline on CPU.

Options and output only; the job (training, held-out prefix FVU, JSON table, PNG plot)
is ``demo_job.run``.
"""

import argparse
import sys
from pathlib import Path

from ..core.errors import MatryoshkaError
from ..corpus import AUSTEN_NOVELS
from ..demo_job import RESULTS_JSON, RESULTS_PNG, format_table, run
from ..offline import SMOLLM2

PROG = "matryoshka-demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train Matryoshka transcoders on SmolLM2's early MLPs on Jane Austen "
        "(offline, CPU) and plot held-out FVU against prefix length.",
    )
    p.add_argument("--out", default="matryoshka-demo", help="output folder (default %(default)s)")
    p.add_argument("--model", default=SMOLLM2,
                   help="a .gguf, a Hugging Face folder, a hub name, or 'smollm2' (default)")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2],
                   help="MLP layers to train transcoders on (default 0 1 2)")
    p.add_argument("--num-latents", type=int, default=2048, help="dictionary width")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--ctx-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=80, help="training steps")
    p.add_argument("--optimizer", default="signum", choices=["adam", "signum", "muon"],
                   help="sparsify optimizer (default %(default)s, sparsify's own default)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: sparsify's width-scaled rule)")
    p.add_argument("--lr-warmup-steps", type=int, default=20, help="Adam warm-up steps")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for FVU")
    p.add_argument("--novels", nargs="+", default=None, choices=list(AUSTEN_NOVELS),
                   help="train/evaluate on these novels only (default all six)")
    p.add_argument("--seed", type=int, default=0, help="shuffle and initialisation seed")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print its table; 2 and one line on a user's mistake."""
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
    except MatryoshkaError as e:
        # Not through cli.runner.run, which puts the program name first: this script's
        # error line has always been a plain "error: ..." (tests/test_demo.py holds it).
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"Held-out FVU by prefix length ({results['settings']['eval_tokens']:,} tokens):")
    print(format_table(results))
    out = Path(args.out)
    print(f"\nCheckpoints: {results['settings']['checkpoints']}")
    print(f"Table: {out / RESULTS_JSON}\nPlot: {out / RESULTS_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
