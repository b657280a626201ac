"""Loading a saved coder directory (``cfg.json`` + ``sae.safetensors``) with its metadata."""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from sparsify import SparseCoder, SparseCoderConfig

from ...atomic import recover_path
from ...core.errors import CheckpointError
from .coder import THRESHOLD_KEY, MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, coder_class

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""safetensors dtypes a coder's weights may have; ``load_model`` would cast others silently."""


def read_coder_config(path: Path | str) -> tuple[dict, int]:
    """The ``cfg.json`` of a coder directory as a dict, and its ``d_in``."""
    cfg_path = Path(path) / "cfg.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found; a coder directory holds cfg.json and sae.safetensors")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
        d_in = int(cfg_dict.pop("d_in"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid sparsify cfg.json ({e})") from None
    return cfg_dict, d_in


def load_coder(path: Path | str, device: str | torch.device = "cpu") -> SparseCoder:
    """Load a sparsify or plugin coder directory, keeping its Matryoshka metadata.

    Plain checkpoints come back as stock ``SparseCoder``; Matryoshka ones as
    ``MatryoshkaSparseCoder`` in eval mode.
    """
    path = recover_path(path)  # a crash mid checkpoint swap leaves it under a sibling name
    cfg_dict, d_in = read_coder_config(path)
    threshold = cfg_dict.pop(THRESHOLD_KEY, None)
    coder_cls = coder_class(SimpleNamespace(**cfg_dict))
    cfg_cls = SparseCoderConfig if coder_cls is SparseCoder else MatryoshkaSparseCoderConfig
    cfg = cfg_cls.from_dict(cfg_dict, drop_extra_fields=True)
    weights = path / "sae.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    coder = coder_cls(d_in, cfg, device=device)
    try:
        # load_model casts silently; integer or boolean weights mean a wrong file.
        with safe_open(str(weights), "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        if bad := {k: t for k, t in dtypes.items() if t not in FLOAT_DTYPES}:
            raise CheckpointError(
                f"{weights} holds non-floating tensors {bad}; allowed dtypes: "
                f"{', '.join(FLOAT_DTYPES)}"
            )
        load_model(coder, str(weights), device=str(device), strict=True)
    except SafetensorError as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e})") from None
    except RuntimeError as e:
        hint = (
            " (it holds Matryoshka tensors: load it with matryoshka_plugin.load_coder, "
            "whose cfg.json must keep matryoshka: true)"
            if "_levels" in str(e)
            else ""
        )
        msg = str(e).replace("\n", " ").replace("\t", "")
        raise CheckpointError(f"{weights} does not match {path / 'cfg.json'}{hint}: {msg}") from None
    if threshold is not None and isinstance(coder, MatryoshkaSparseCoder):
        coder.batch_topk_threshold.fill_(float(threshold))
    return coder.eval()
