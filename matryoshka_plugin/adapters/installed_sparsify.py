"""Which ``sparsify`` is installed: PyPI eai-sparsify, or EleutherAI's clt-training fork.

Both distributions are called ``eai-sparsify`` and import as ``sparsify``. The fork
imports Triton at package import and needs CUDA, so it is located, never imported, and
the plugin's PyPI adapters refuse it with one line before any ``import sparsify``;
``adapters.clt_training_fork`` is the adapter for the fork.
"""

import importlib.metadata
import importlib.util
from pathlib import Path

from ..core.errors import CLTTrainingInstalledError


def detect_clt_training(package_dirs: list[str] | None = None) -> str | None:
    """The clt-training version if that fork is the installed ``sparsify``, else None.

    clt-training also ships as ``eai-sparsify`` (1.1.x); its ``kernels.py`` (Triton)
    is the tell. ``package_dirs`` overrides where ``sparsify`` lives.
    """
    if package_dirs is None:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            return None
        package_dirs = list(spec.submodule_search_locations)
    has_kernels = any(Path(p, "kernels.py").is_file() for p in package_dirs)
    try:
        version = importlib.metadata.version("eai-sparsify")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if has_kernels or version.startswith("1.1."):
        return version
    return None


def require_pypi_sparsify() -> None:
    """Raise a one-line error when clt-training is installed instead of eai-sparsify."""
    version = detect_clt_training()
    if version is not None:
        raise CLTTrainingInstalledError(
            f"the installed sparsify is EleutherAI clt-training (eai-sparsify {version}); "
            "matryoshka-plugin's sparsify and CLT adapters need PyPI eai-sparsify==1.3.3 "
            "(pip install eai-sparsify==1.3.3). To train Matryoshka CLTs with clt-training's "
            "own CUDA/Triton trainer, use matryoshka_plugin.adapters.clt_training_fork (CLT "
            "training path 2)"
        )
