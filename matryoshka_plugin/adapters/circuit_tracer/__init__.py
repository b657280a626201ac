"""circuit-tracer (0.5.0) adapter: export sparsify transcoders, load them with sparsify's
exact TopK activation, and build attribution graphs truncated to Matryoshka prefixes.

Submodules: ``export`` (checkpoint -> circuit-tracer directory, shared helpers),
``activations`` (TopK-after-ReLU module, JumpReLU calibration), ``truncation``
(prefix truncation, fixed CLT subclass, loader, ``attribute``), ``local_model``
(offline HF/GGUF Llama models), ``cli`` (console scripts).
"""

from importlib import import_module

# Lazy, so that importing ``export`` (used by the CLT export) does not import
# circuit-tracer and TransformerLens.
_PUBLIC = {
    "export_transcoder_set": "export",
    "TopKReLU": "activations",
    "calibrate_jumprelu_thresholds": "activations",
    "attribute": "truncation",
    "attribute_prefixes": "truncation",
    "prefix_truncation": "truncation",
    "set_prefix_len": "truncation",
    "load_transcoders_dir": "truncation",
    "PrefixCrossLayerTranscoder": "truncation",
    "load_local_replacement_model": "local_model",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
