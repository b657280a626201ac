"""The plugin's own Matryoshka cross-layer transcoders (CLT training path 1, CPU or GPU).

- ``model``: ``MatryoshkaCLT`` and ``CLTConfig`` (the nested cross-layer loss on
  sparsify's encoder), ``save_clt`` / ``load_clt``.
- ``cache``: ``cache_activations`` writes chosen layers' MLP inputs and outputs of a
  Hugging Face model to disk; ``ActivationCache`` reads them back.
- ``train``: ``train_clt`` and its ``CLTTrainConfig``: the training loop, checkpoints,
  held-out FVU per prefix.

``export_clt`` (circuit-tracer's CLT format) lives with the circuit-tracer adapter
(``adapters.circuit_tracer.clt_export``) and is importable from here too. The console
script is ``matryoshka-clt`` (``cli.clt``). EleutherAI's clt-training fork (training
path 2) has its own adapter, ``adapters.clt_training_fork``.
"""

from .cache import ActivationCache, cache_activations
from .model import CLTConfig, MatryoshkaCLT, load_clt, save_clt
from .train import CLTTrainConfig, train_clt

__all__ = [
    "ActivationCache",
    "CLTConfig",
    "CLTTrainConfig",
    "MatryoshkaCLT",
    "cache_activations",
    "export_clt",
    "load_clt",
    "save_clt",
    "train_clt",
]


def __getattr__(name):
    # On first use: the export module imports ``clt.model`` from this package, so an
    # import at the top would be circular when the export is imported first.
    if name == "export_clt":
        from ..adapters.circuit_tracer.clt_export import export_clt

        return export_clt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
