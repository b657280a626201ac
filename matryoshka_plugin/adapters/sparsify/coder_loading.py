"""Loading a saved coder directory (``cfg.json`` + ``sae.safetensors``) with its metadata."""

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from sparsify import SparseCoder, SparseCoderConfig

from ...atomic import recover_path
from ...core.errors import CheckpointError, MatryoshkaConfigError
from ...core.field_types import config_problems
from .coder import (
    ADAPTED_SIZES_KEY,
    THRESHOLD_KEY,
    MatryoshkaSparseCoder,
    MatryoshkaSparseCoderConfig,
    check_coder_fields,
    coder_class,
)

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""safetensors dtypes a coder's weights may have; ``load_model`` would cast others silently."""


def read_coder_config(path: Path | str) -> tuple[dict, int]:
    """The ``cfg.json`` of a coder directory as a dict, and its ``d_in``."""
    cfg_path = Path(path) / "cfg.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found; a coder directory holds cfg.json and sae.safetensors")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid sparsify cfg.json ({e})") from None
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(
            f"{cfg_path} holds {type(cfg_dict).__name__} {cfg_dict!r:.40}; a sparsify "
            "cfg.json is a mapping of coder fields"
        )
    d_in = cfg_dict.pop("d_in", None)
    if not isinstance(d_in, int) or isinstance(d_in, bool) or d_in < 1:
        raise CheckpointError(f"{cfg_path}: d_in={d_in!r} is not allowed; expected an integer >= 1")
    return cfg_dict, d_in


def _coder_config(cfg_path: Path, cfg_dict: dict, coder_cls: type[SparseCoder]):
    """The coder config of ``cfg_dict``, every field checked; errors name ``cfg_path``."""
    cfg_cls = SparseCoderConfig if coder_cls is SparseCoder else MatryoshkaSparseCoderConfig
    if problems := config_problems(cfg_cls, cfg_dict, known_only=True):
        raise CheckpointError(f"{cfg_path}: {'; '.join(problems)}")
    try:
        cfg = cfg_cls.from_dict(cfg_dict, drop_extra_fields=True)
        check_coder_fields(cfg)
    except MatryoshkaConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    return cfg


def _weight_shapes(weights: Path) -> dict[str, tuple[list[int], str]]:
    """Each tensor's shape and dtype, from the safetensors header alone (nothing loaded)."""
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e})") from None


def load_coder(path: Path | str, device: str | torch.device = "cpu") -> SparseCoder:
    """Load a sparsify or plugin coder directory, keeping its Matryoshka metadata.

    Plain checkpoints come back as stock ``SparseCoder``; Matryoshka ones as
    ``MatryoshkaSparseCoder`` in eval mode.
    """
    path = recover_path(path)  # a crash mid checkpoint swap leaves it under a sibling name
    cfg_dict, d_in = read_coder_config(path)
    threshold = cfg_dict.pop(THRESHOLD_KEY, None)
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)):
        raise CheckpointError(f"{path / 'cfg.json'}: {THRESHOLD_KEY}={threshold!r} is not a number")
    adapted = cfg_dict.pop(ADAPTED_SIZES_KEY, None)
    coder_cls = coder_class(SimpleNamespace(**cfg_dict))
    cfg = _coder_config(path / "cfg.json", cfg_dict, coder_cls)
    weights = path / "sae.safetensors"
    shapes = _weight_shapes(weights)
    # load_model casts silently; integer or boolean weights mean a wrong file.
    if bad := {k: t for k, (_, t) in shapes.items() if t not in FLOAT_DTYPES}:
        raise CheckpointError(
            f"{weights} holds non-floating tensors {bad}; allowed dtypes: {', '.join(FLOAT_DTYPES)}"
        )
    # Checked before the coder is built: a cfg.json asking for a huge width would
    # otherwise allocate it (and could take all memory) before the mismatch shows.
    width = cfg.num_latents or d_in * cfg.expansion_factor
    encoder = shapes.get("encoder.weight", (None, None))[0]
    if encoder != [width, d_in]:
        raise CheckpointError(
            f"{weights} does not match {path / 'cfg.json'}: encoder.weight has shape "
            f"{encoder}, cfg.json asks for [{width}, {d_in}] (num_latents x d_in)"
        )
    try:
        coder = coder_cls(d_in, cfg, device=device)
    except MatryoshkaConfigError as e:  # width-dependent checks (nested sizes, k)
        raise CheckpointError(f"{path / 'cfg.json'}: {e}") from None
    try:
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
    _adopt_sizes(path / "cfg.json", coder, adapted)
    return coder.eval()


def _adopt_sizes(cfg_path: Path, coder: SparseCoder, adapted) -> None:
    """Give an adaptive coder the nested sizes its training ended with (``cfg.json``'s
    ``adapted_nested_sizes``), so prefix metrics, exports and graphs use them."""
    adaptive = isinstance(coder, MatryoshkaSparseCoder) and coder.sampler.adaptive
    if adapted is None:
        if adaptive:
            # Written before the sizes were recorded: the levels training ended with are lost.
            warnings.warn(
                f"{cfg_path} records no {ADAPTED_SIZES_KEY}; using the configured starting "
                f"sizes {coder.nested_sizes}, not those training moved to",
                UserWarning,
                stacklevel=3,
            )
        return
    if not adaptive:
        raise CheckpointError(
            f"{cfg_path}: {ADAPTED_SIZES_KEY}={adapted!r} is recorded, but the coder is not "
            "trained with matryoshka=true and prefix_schedule='adaptive'"
        )
    try:
        coder.sampler.adopt_sizes(adapted)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
