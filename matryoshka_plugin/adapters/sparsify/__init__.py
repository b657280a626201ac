"""The adapter to EleutherAI sparsify (PyPI ``eai-sparsify``): Matryoshka training inside it.

- ``coder``: ``MatryoshkaSparseCoderConfig`` (sparsify's coder config plus the
  Matryoshka fields), ``MatryoshkaSparseCoder`` and ``prefix_fvu``.
- ``trainer``: ``MatryoshkaTrainConfig`` and ``MatryoshkaTrainer``, sparsify's
  ``Trainer`` building Matryoshka coders and saving/restoring their extra state.
- ``coder_loading``: ``load_coder``, any sparsify or plugin checkpoint with its metadata.
- ``run_config``: ``MatryoshkaRunConfig``, the options of ``sparsify-matryoshka``, and
  the strict reading of its ``--config_path`` files.
- ``training_run``: one run of sparsify's own CLI flow (``sparsify.__main__.run``) with
  the plugin's device, model and dataset loading and checkpoint folder.

Checkpoints keep sparsify's layout. With the shared decoder they hold exactly
sparsify's tensors, so stock ``SparseCoder.load_from_disk`` loads them.
"""

from ..installed_sparsify import require_pypi_sparsify

# Before any ``import sparsify``: clt-training's package import fails on Triton.
require_pypi_sparsify()

from .coder import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, prefix_fvu  # noqa: E402
from .coder_loading import load_coder  # noqa: E402
from .trainer import MatryoshkaTrainConfig, MatryoshkaTrainer  # noqa: E402

__all__ = [
    "MatryoshkaSparseCoder",
    "MatryoshkaSparseCoderConfig",
    "MatryoshkaTrainConfig",
    "MatryoshkaTrainer",
    "load_coder",
    "prefix_fvu",
]
