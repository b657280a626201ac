"""The one place where a console script turns a user's mistake into its one-line exit.

Every console script runs its body through ``run``: a ``MatryoshkaError`` (a bad flag,
config field, path or checkpoint, a missing local asset; see
``matryoshka_plugin.core.errors``) prints
``prog: error: <message>`` on one line and gives exit code 2; Ctrl-C gives 130 with
one line. Anything else is a bug and keeps its traceback.
"""

import sys
from collections.abc import Callable

from ..core.errors import MatryoshkaError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def error_line(prog: str, error: BaseException) -> str:
    """``prog: error: message`` on one line (a multi-line message keeps its first line)."""
    lines = str(error).strip().splitlines()
    return f"{prog}: error: {lines[0] if lines else type(error).__name__}"


def run(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body()`` and return its exit code (0 for None), reporting user errors in one line."""
    try:
        return body() or 0
    except MatryoshkaError as e:
        print(error_line(prog, e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
