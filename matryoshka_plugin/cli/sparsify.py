"""``sparsify-matryoshka``: sparsify's CLI with Matryoshka options, config files and CPU.

It accepts every ``sparsify`` flag (it parses sparsify's own ``RunConfig``, with the
``sae`` section widened to ``MatryoshkaSparseCoderConfig``) and adds:

- ``--config_path FILE``: a JSON or YAML ``TrainConfig``/``RunConfig``; flags override it.
- ``--device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
- ``--dist_timeout SECONDS``: under ``torchrun``, how long a rank waits for the others
  before it stops with one line (gloo on CPU, NCCL on CUDA).
- MODEL may be a hub name, a local HF folder, a ``.gguf`` file or ``smollm2``;
  DATASET a hub name, a ``save_to_disk`` folder, a ``.bin`` memmap, or plain text files.

It also mends two upstream quirks: ``--resume`` reads ``{save_dir}/{run_name}`` (upstream
reads ``checkpoints/{run_name}``), and a saved ``config.json`` holding both ``layers``
and ``hookpoints`` (upstream's own output) is accepted. Training runs through sparsify's
own CLI flow, ``torchrun`` included (``adapters.sparsify.training_run``).
"""

import argparse
import sys

from simple_parsing import ArgumentParser

from ..adapters.sparsify.run_config import MatryoshkaRunConfig, read_config_file
from ..adapters.sparsify.training_run import train
from ..core.errors import UsageError
from ..distributed import DEFAULT_TIMEOUT_S
from .runner import run

PROG = "sparsify-matryoshka"


def parse_args(argv: list[str] | None) -> tuple[MatryoshkaRunConfig, float]:
    """The run config and the ``--dist_timeout`` seconds."""
    # simple_parsing's own --config_path swallows the positional MODEL and DATASET, so
    # the file is read here first and becomes the defaults that flags override.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_path")
    known, _ = pre.parse_known_args(argv)
    defaults = read_config_file(known.config_path) if known.config_path else None

    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config_path",
        metavar="FILE",
        help="JSON or YAML training config; flags override its values",
    )
    parser.add_argument(
        "--dist_timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun, seconds a rank waits for the others before it stops",
    )
    parser.add_arguments(MatryoshkaRunConfig, dest="run", default=defaults)
    parsed = parser.parse_args(argv)
    args = parsed.run
    if args.layers and args.hookpoints:
        raise UsageError(
            f"--layers {args.layers} and --hookpoints {args.hookpoints} contradict each "
            "other; give one of them"
        )
    return args, parsed.dist_timeout


def main(argv: list[str] | None = None) -> None:
    """Train; a user's mistake exits with code 2 and one line, as a bad flag does."""
    if code := run(PROG, lambda: train(*parse_args(argv))):
        sys.exit(code)


if __name__ == "__main__":
    main()
