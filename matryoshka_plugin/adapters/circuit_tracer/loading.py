"""Loading transcoders for circuit-tracer: local exported directories and hub names.

A local directory (``config.yaml`` + safetensors, see ``transcoder_dir``) is checked file by file
so that a missing or corrupt file is a one-line ``CheckpointError``, then loaded with
circuit-tracer's own ``load_transcoder_set`` / ``load_clt``; the plugin's TopK kind gets
its ``TopKReLU``. Anything else is a hub name for circuit-tracer's
``load_transcoder_from_hub``. Cross-layer transcoders always come back as
``PrefixCrossLayerTranscoder``. Level decoders (``nested_decoders`` exports) are attached
to each per-layer transcoder, or to the CLT, for ``prefix_transcoders`` to use at their
prefix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from safetensors import SafetensorError, safe_open

from ...core.errors import CheckpointError, ExportError, UsageError
from .activations import TopKReLU
from .transcoder_dir import CONFIG_FILE, base_model_kind, level_decoder_keys, level_decoder_path, read_nested_sizes
from .prefix_transcoders import Transcoders, as_prefix_clt, attach_level_decoders


def _check_safetensors(path: Path, keys: Sequence[str]) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            have = set(f.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({msg})") from None
    missing = [k for k in keys if k not in have]
    if missing:
        raise CheckpointError(f"{path} lacks tensors {missing}")


def _numbered_files(root: Path, prefix: str) -> dict[int, Path]:
    """``{i: root/prefix{i}.safetensors}`` for i = 0..N-1; a stray, non-canonical
    (``layer_01``) or missing number is refused, since circuit-tracer reads ``prefix{i}``."""
    files: dict[int, Path] = {}
    for p in sorted(root.glob(f"{prefix}*.safetensors")):
        number = p.name[len(prefix) : -len(".safetensors")]
        if not number.isdigit() or str(int(number)) != number:
            raise CheckpointError(
                f"{p} is not a layer file name; allowed: {prefix}0.safetensors, {prefix}1.safetensors, ... "
                "(no leading zeros); move it out of the transcoder directory"
            )
        files[int(number)] = p
    if sorted(files) != list(range(len(files))):
        raise CheckpointError(f"{root} must hold {prefix}0.safetensors .. {prefix}N.safetensors; found {sorted(files)}")
    return files


def load_transcoders_dir(
    transcoder_dir: Path | str,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype = torch.float32,
    lazy_encoder: bool = False,
    lazy_decoder: bool = True,
) -> tuple[Transcoders, dict]:
    """Load a local circuit-tracer transcoder directory, including the plugin's TopK kind.

    Uses circuit-tracer's own ``load_transcoder_set`` / ``load_clt`` and then installs
    the plugin's ``TopKReLU`` where ``config.yaml`` asks for it. CLTs come back as
    ``PrefixCrossLayerTranscoder``. ``config["matryoshka"]`` holds the nested-size record
    (None if the directory has none).
    """
    root = Path(transcoder_dir).absolute()
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found; a transcoder directory holds config.yaml")
    try:
        config = yaml.safe_load(cfg_path.read_text())
        kind, topk = base_model_kind(str(config["model_kind"]))
        in_hook, out_hook = config["feature_input_hook"], config["feature_output_hook"]
    except (yaml.YAMLError, KeyError, TypeError, ExportError) as e:
        raise CheckpointError(f"{cfg_path} is not a usable circuit-tracer config ({e})") from None
    common = dict(
        scan=config.get("scan") or str(root),
        feature_input_hook=in_hook,
        feature_output_hook=out_hook,
        device=torch.device(device) if device is not None else None,
        dtype=dtype,
        lazy_encoder=lazy_encoder,
        lazy_decoder=lazy_decoder,
    )
    if kind == "transcoder_set":
        files = _numbered_files(root, "layer_")
        if not files:
            raise CheckpointError(f"{root} must hold layer_0.safetensors .. layer_N.safetensors; found none")
        for p in files.values():
            _check_safetensors(p, ["W_enc", "W_dec", "b_enc", "b_dec"])
        transcoders: Transcoders = load_transcoder_set({i: str(p) for i, p in files.items()}, **common)
        widths = {t.d_transcoder for t in transcoders}
    else:
        n = len(_numbered_files(root, "W_enc_"))
        if n == 0 or len(_numbered_files(root, "W_dec_")) != n:
            raise CheckpointError(f"{root} must hold W_enc_0 .. W_enc_N and W_dec_0 .. W_dec_N.safetensors (N >= 0)")
        for i in range(n):
            _check_safetensors(root / f"W_enc_{i}.safetensors", [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"])
            _check_safetensors(root / f"W_dec_{i}.safetensors", [f"W_dec_{i}"])
        transcoders = as_prefix_clt(load_clt(str(root), **common))
        widths = {transcoders.d_transcoder}
    if topk:
        k = config.get("topk_k")
        if not isinstance(k, int) or k <= 0:
            raise CheckpointError(f"{cfg_path}: model_kind {config['model_kind']} needs a positive integer topk_k, got {k!r}")
        if k > min(widths):
            raise CheckpointError(f"{cfg_path}: topk_k={k} exceeds the transcoder width {min(widths)}; allowed: 1..{min(widths)}")
        if kind == "transcoder_set":
            for t in transcoders:
                t.activation_function = TopKReLU(k)
        else:
            transcoders.activation_function = TopKReLU(k)
    try:
        config["matryoshka"] = read_nested_sizes(root)
    except ExportError as e:
        raise CheckpointError(str(e)) from None
    record = config["matryoshka"]
    if record is not None and record.get("width") not in widths:
        raise CheckpointError(f"{root / 'matryoshka.json'} says width {record.get('width')}, the tensors have {sorted(widths)}")
    sizes = (record or {}).get("level_decoders") or []
    if sizes:
        width = min(widths)
        bad = [s for s in sizes if not isinstance(s, int) or not 0 < s < width]
        if bad:
            raise CheckpointError(f"{root / 'matryoshka.json'} lists level decoders {bad}; allowed: sizes in 1..{width - 1}")
        if kind == "transcoder_set":
            for layer, transcoder in enumerate(transcoders):
                levels = _read_level_decoders(root, layer, sizes, (transcoder.d_model,), device, dtype)
                attach_level_decoders(transcoder, levels)
        else:
            n, d = transcoders.n_layers, transcoders.d_model
            per_layer = [_read_level_decoders(root, i, sizes, (n - i, d), device, dtype) for i in range(n)]
            attach_level_decoders(transcoders, {
                s: ([layer[s][0] for layer in per_layer], torch.stack([layer[s][1] for layer in per_layer]))
                for s in sizes
            })
    return transcoders, config


def _read_level_decoders(root: Path, layer: int, sizes: Sequence[int], row_shape: tuple, device, dtype) -> dict[int, tuple]:
    """``{P: (W_dec [P, *row_shape], b_dec [d])}`` of one layer, each checked against its
    shape (``row_shape``: ``(d,)`` per layer, ``(n_layers - layer, d)`` for a CLT)."""
    from safetensors.torch import load_file

    path = level_decoder_path(root, layer)
    keys = [k for s in sizes for k in level_decoder_keys(s)]
    _check_safetensors(path, keys)
    tensors = load_file(str(path), device=str(device or "cpu"))
    out = {}
    for s in sizes:
        w_key, b_key = level_decoder_keys(s)
        W, b = tensors[w_key], tensors[b_key]
        want_W, want_b = (s, *row_shape), row_shape[-1:]
        if tuple(W.shape) != want_W or tuple(b.shape) != want_b:
            raise CheckpointError(
                f"{path}: {w_key} {tuple(W.shape)} / {b_key} {tuple(b.shape)}; expected {want_W} / {want_b}"
            )
        out[int(s)] = (W.to(dtype), b.to(dtype))
    return out


def load_transcoders(
    spec: str,
    dtype: torch.dtype = torch.float32,
    lazy_encoder: bool = False,
    lazy_decoder: bool = True,
) -> tuple[Transcoders, dict]:
    """``--transcoder_set``: a local directory (``load_transcoders_dir``) or a hub name.

    A path-like ``spec`` that is not a directory is refused here rather than sent to the
    hub, where it would fail after a long wait with an unrelated message.
    """
    if Path(spec).is_dir():
        return load_transcoders_dir(spec, dtype=dtype, lazy_encoder=lazy_encoder, lazy_decoder=lazy_decoder)
    if Path(spec).exists() or spec.startswith(("/", "./", "../")):
        raise UsageError(f"--transcoder_set {spec} is not a directory holding config.yaml")
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    transcoders, config = load_transcoder_from_hub(
        spec, dtype=dtype, lazy_encoder=lazy_encoder, lazy_decoder=lazy_decoder
    )
    config.setdefault("matryoshka", None)
    return as_prefix_clt(transcoders), config


def nested_sizes_of(config: dict) -> list[int] | None:
    """The nested sizes recorded with loaded transcoders (None: not Matryoshka)."""
    record = config.get("matryoshka")
    return None if record is None else record.get("nested_sizes")


def warn_if_not_matryoshka(config: dict, prefix_lens: Sequence[int] | None) -> None:
    """Warn when prefixes are asked of a dictionary that was not trained nested."""
    if prefix_lens and not nested_sizes_of(config):
        warnings.warn(
            "the transcoders record no Matryoshka nested sizes: prefixes of a "
            "non-Matryoshka dictionary are arbitrary subsets of its latents",
            UserWarning,
            stacklevel=2,
        )
