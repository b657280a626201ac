"""circuit-tracer (0.5.0) adapter: export sparsify transcoders, load them with sparsify's
exact TopK activation, and build attribution graphs truncated to Matryoshka prefixes.

Submodules: ``export`` (checkpoint -> circuit-tracer directory, shared helpers),
``activations`` (TopK-after-ReLU module, JumpReLU calibration), ``truncation``
(prefix truncation, fixed CLT subclass, loader, ``attribute``), ``local_model``
(offline HF/GGUF Llama models), ``cli`` (console scripts).
"""
