"""Matryoshka sparse coders for the open interpretability stack.

``matryoshka_plugin.core`` holds the math in plain torch; ``matryoshka_plugin.adapters``
holds one thin adapter per upstream tool.
"""

from .adapters.sparsify import (
    MatryoshkaSparseCoder,
    MatryoshkaSparseCoderConfig,
    MatryoshkaTrainConfig,
    MatryoshkaTrainer,
    load_coder,
    prefix_fvu,
)
from .core import MatryoshkaConfig, MatryoshkaConfigError

__all__ = [
    "MatryoshkaConfig",
    "MatryoshkaConfigError",
    "MatryoshkaSparseCoder",
    "MatryoshkaSparseCoderConfig",
    "MatryoshkaTrainConfig",
    "MatryoshkaTrainer",
    "load_coder",
    "prefix_fvu",
]
