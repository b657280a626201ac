"""circuit-tracer (0.5.0) adapter: export sparsify transcoders, load them with sparsify's
exact TopK activation, and build attribution graphs truncated to Matryoshka prefixes.

What lives where:

- ``transcoder_dir``: the transcoder directory format (``config.yaml``, model kinds,
  ``matryoshka.json``, MLP hook names);
- ``sparsify_export``: a sparsify transcoder run -> a circuit-tracer transcoder set
  (``clt_export``: the same for the plugin's cross-layer transcoders);
- ``activations``: ``TopKReLU`` (sparsify's activation) and JumpReLU calibration;
- ``loading``: local directories (TopK kind included) and hub names -> transcoders;
- ``prefix_transcoders``: truncating loaded transcoders to a prefix
  (``prefix_truncation``), and ``PrefixCrossLayerTranscoder`` with its two fixes;
- ``attribution``: ``attribute`` and ``attribute_prefixes`` (one graph per prefix);
- ``graph_files``: the ``.pt`` graphs, scores and viewer graph files a run writes;
- ``local_model``: offline HF / GGUF Llama models as a ``ReplacementModel``.

The console scripts (``matryoshka-export``, ``circuit-tracer-matryoshka``) live in
``matryoshka_plugin.cli``.
"""

from importlib import import_module

# Lazy, so that importing ``transcoder_dir`` (used by the CLT export) does not import
# circuit-tracer and TransformerLens.
_PUBLIC = {
    "export_transcoder_set": "sparsify_export",
    "TopKReLU": "activations",
    "calibrate_jumprelu_thresholds": "activations",
    "load_transcoders_dir": "loading",
    "PrefixCrossLayerTranscoder": "prefix_transcoders",
    "prefix_truncation": "prefix_transcoders",
    "set_prefix_len": "prefix_transcoders",
    "attribute": "attribution",
    "attribute_prefixes": "attribution",
    "load_local_replacement_model": "local_model",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
