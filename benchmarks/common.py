"""What every benchmark script shares: where it runs, where it writes, how it records.

- ``machine_description``, ``utc_timestamp`` and ``command_line``: the provenance each
  result file records (what ran, when, on what), so a number can be traced and redone;
  ``provenance`` is the three as one record's ``command`` / ``date`` / ``machine``.
- ``scratch_dir``: where heavy intermediate files (caches, checkpoints, exports) go,
  under the plugin's own cache directory rather than a path of one machine.
- ``write_json``, ``write_markdown`` and ``save_figure``: results written atomically, so
  an interrupted run never leaves half a results file behind.
- ``pyplot``: matplotlib without a display.

Scripts run from the repository root as modules, e.g. ``python -m benchmarks.toy.run``.
"""

import json
import os
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from matryoshka_plugin.asset_cache import cache_dir
from matryoshka_plugin.atomic import atomic_write, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
"""The repository root: defaults are relative to it, never to one machine's layout."""

SAELENS_PYTHON = REPO / ".venv-saelens" / "bin" / "python"
"""The separate SAELens environment (see RESULTS.md, "Training cost")."""


def machine_description() -> str:
    """CPU model, CPU count, torch threads and version, platform: what a benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}), "
        f"torch {torch.__version__}, {platform.platform()}"
    )


def utc_timestamp() -> str:
    """Now, in UTC, to the second (ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run: ``python -m MODULE ARGS``.

    ``module`` is the script's ``__spec__.name``; ``argv`` defaults to this process's
    arguments.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *args])


def provenance(module: str, argv: Sequence[str] | None = None) -> dict[str, str]:
    """``{"command", "date", "machine"}`` of this run, for the top of a result record."""
    return {"command": command_line(module, argv), "date": utc_timestamp(), "machine": machine_description()}


def scratch_dir(name: str) -> Path:
    """A benchmark's directory for heavy intermediate files, under the plugin's cache
    directory (``$MATRYOSHKA_CACHE``, by default ``~/.cache/matryoshka_plugin``)."""
    return cache_dir() / name


def write_json(obj, path: str | Path) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def refuse_bad_counts(args, names: Sequence[str]) -> int | None:
    """A benchmark's one-line refusal of a count below 1 or ``--test-fraction`` outside
    (0, 1): prints ``run.py: error: ...`` and returns exit code 2, or None if all is well."""
    for name in names:
        if getattr(args, name) < 1:
            print(f"run.py: error: --{name.replace('_', '-')} {getattr(args, name)} must be at least 1", file=sys.stderr)
            return 2
    if not 0 < args.test_fraction < 1:
        print(f"run.py: error: --test-fraction {args.test_fraction} must be in (0, 1)", file=sys.stderr)
        return 2
    return None


def write_markdown(lines: Sequence[str], path: str | Path) -> None:
    """Markdown ``lines``, one per line, written atomically."""
    atomic_write_text(path, "\n".join(lines) + "\n")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """``fig`` as a PNG, written atomically, then closed."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)
