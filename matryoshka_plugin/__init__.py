"""Matryoshka sparse coders for the open interpretability stack.

``matryoshka_plugin.core`` holds the math in plain torch; ``matryoshka_plugin.adapters``
holds one thin adapter per upstream tool.
"""

from .core import MatryoshkaConfig, MatryoshkaConfigError

_SPARSIFY_NAMES = (
    "MatryoshkaSparseCoder",
    "MatryoshkaSparseCoderConfig",
    "MatryoshkaTrainConfig",
    "MatryoshkaTrainer",
    "load_coder",
    "prefix_fvu",
)


def __getattr__(name):
    # Imported on first use, so that ``import matryoshka_plugin`` (and its core) works
    # whichever ``sparsify`` is installed; the sparsify adapter checks that itself.
    if name in _SPARSIFY_NAMES:
        from .adapters import sparsify

        return getattr(sparsify, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MatryoshkaConfig", "MatryoshkaConfigError", *_SPARSIFY_NAMES]
