"""The plugin's side of the viewer patch check (stock circuit-tracer + plugin).

    python viewer_side.py OUT   # OUT: stock circuit-tracer's frontend with the plugin's text_only fixes

The patched side needs no script: its frontend is the installed patched package's.
"""

import shutil
import sys
from pathlib import Path

from matryoshka_plugin.viewer.assets import _upstream_frontend
from matryoshka_plugin.viewer.text_only import apply_fixes


def main(out: Path) -> None:
    shutil.copytree(_upstream_frontend(), out, ignore=shutil.ignore_patterns("__pycache__"))
    apply_fixes(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
