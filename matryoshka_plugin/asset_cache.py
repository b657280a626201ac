"""Where the offline assets are cached: converted models and the extracted corpus.

``$MATRYOSHKA_CACHE``, by default ``~/.cache/matryoshka_plugin``. ``offline`` keeps its
converted models under ``models/``, ``corpus`` the Austen package and texts.
"""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root folder of the plugin's cached offline assets."""
    root = os.environ.get("MATRYOSHKA_CACHE") or Path.home() / ".cache" / "matryoshka_plugin"
    return Path(root)
