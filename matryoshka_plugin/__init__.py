"""Matryoshka sparse coders for the open interpretability stack.

- ``core``: the Matryoshka math in plain torch, with no upstream imports.
- ``adapters``: one thin adapter per upstream tool (sparsify, circuit-tracer, ...).
- ``cli``: the console scripts, one module each (options and output only).
- ``viewer``: the local attribution-graph viewer.
- Top-level modules: the jobs built on those (``fit``: training from activations,
  ``demo_job``, evaluation, CLTs, global graphs) and what they share: ``offline``
  (the offline model), ``corpus`` (the Austen texts), ``asset_cache`` (where both are
  cached) and ``atomic`` (crash-safe writing).

The sparsify adapter's main names (``load_coder``, ``MatryoshkaTrainer``, ...) are
importable from here.
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
