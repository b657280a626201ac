"""Export a sparsify transcoder run to a circuit-tracer transcoder set.

circuit-tracer's per-layer files hold ``W_enc (d_tc, d_model)``, ``W_dec (d_tc,
d_model)``, ``b_enc``, ``b_dec`` and optionally ``W_skip`` and
``activation_function.threshold``. sparsify stores the same matrices in the same
orientation (``encoder.weight [M, d_in]``, ``W_dec [M, d_in]``) and a transcoder encodes
``x`` without subtracting ``b_dec``, as circuit-tracer's ``encode`` does, so the tensors
are copied unchanged and the round trip is exact. The directory layout is
``transcoder_dir``'s. Only ``export_transcoder_set`` needs the sparsify adapter, so it
imports it itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...atomic import atomic_dir
from ...core.errors import ExportError, UsageError
from ...hooks import hookpoint_layer
from .transcoder_dir import ACTIVATIONS, write_config_yaml, write_nested_sizes


# -- finding and converting sparsify coders ----------------------------------------------


def find_coder_dirs(checkpoint_dir: Path | str) -> dict[int, tuple[str, Path]]:
    """``{layer: (hookpoint, coder_dir)}`` of a sparsify run directory.

    A run directory holds one ``<hookpoint>/cfg.json + sae.safetensors`` per hookpoint.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ExportError(f"checkpoint directory {root} does not exist")
    found: dict[int, tuple[str, Path]] = {}
    for cfg in sorted(root.glob("*/cfg.json")):
        hookpoint = cfg.parent.name
        layer = hookpoint_layer(hookpoint)
        if layer in found:
            raise ExportError(f"two coders for layer {layer}: {found[layer][0]} and {hookpoint}")
        found[layer] = (hookpoint, cfg.parent)
    if not found:
        raise ExportError(f"{root} holds no <hookpoint>/cfg.json coder directories")
    return found


def empty_layers(found: Mapping[int, object], n_layers: int | None) -> list[int]:
    """Layers below ``n_layers`` (default: up to the last coder's) that have no coder.

    circuit-tracer needs a transcoder for every model layer from 0 up; the export writes
    these as zero transcoders, so no latent fires there and the layer's MLP output goes
    to the error nodes, as the CLT export does for untrained layers.
    """
    top = max(found) + 1
    if n_layers is None:
        n_layers = top
    if n_layers < top:
        raise ExportError(f"--n-layers={n_layers} is below the coders' layers (up to {top - 1}); allowed: at least {top}")
    return sorted(set(range(n_layers)) - set(found))


def zero_tensors(like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A zero transcoder with the tensors (names, shapes) of an exported layer."""
    return {name: torch.zeros_like(t) for name, t in like.items()}


def coder_tensors(coder) -> dict[str, Tensor]:
    """circuit-tracer per-layer tensors of a sparsify transcoder (same orientation)."""
    if not coder.cfg.transcode:
        raise ExportError(
            "the coder is an SAE (transcode=False): circuit-tracer needs transcoders "
            "(MLP input -> MLP output)"
        )
    tensors = {
        "W_enc": coder.encoder.weight.detach(),
        "b_enc": coder.encoder.bias.detach(),
        "W_dec": coder.W_dec.detach(),
        "b_dec": coder.b_dec.detach(),
    }
    if coder.W_skip is not None:
        tensors["W_skip"] = coder.W_skip.detach()
    return {k: v.float().contiguous().cpu() for k, v in tensors.items()}


def coder_nested_sizes(coder) -> list[int] | None:
    """The Matryoshka nested sizes of a coder, or None for a plain sparsify coder."""
    return list(coder.nested_sizes) if hasattr(coder, "nested_sizes") else None


def batch_topk_threshold(coder) -> float | None:
    """The inference threshold of a BatchTopK coder (its exact activation), else None."""
    if not getattr(coder.cfg, "batch_topk", False):
        return None
    return float(coder.batch_topk_threshold.clamp_min(0))


def read_calibration(path: str | Path) -> dict[int, Tensor]:
    """``{layer: MLP inputs [n, d_model]}`` from a safetensors file for JumpReLU calibration.

    Keys are layer numbers or MLP hookpoint names (``layers.3.mlp``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UsageError(f"calibration file {path} not found")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"calibration file {path} is not a readable safetensors file ({e})") from None
    by_layer = {}
    for key, value in tensors.items():
        layer = int(key) if key.isdigit() else hookpoint_layer(key)
        if value.ndim != 2:
            raise UsageError(f"calibration tensor {key!r} has shape {tuple(value.shape)}; expected [n, d_model]")
        by_layer[layer] = value
    return by_layer


def export_transcoder_set(
    checkpoint_dir: Path | str,
    out_dir: Path | str,
    activation: str = "topk",
    calibration: Mapping[int, Tensor] | None = None,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    n_layers: int | None = None,
) -> Path:
    """Convert a sparsify transcoder run directory into a circuit-tracer transcoder set.

    ``n_layers`` (the model's depth; default: up to the last coder's layer): layers
    without a coder are written as zero transcoders (``empty_layers``).

    ``activation="topk"`` keeps sparsify's exact TopK-after-ReLU (needs the plugin's
    loader); ``"jumprelu"`` writes per-latent thresholds calibrated on ``calibration``
    (``{layer: MLP inputs [n, d_model]}``) that stock circuit-tracer loads. BatchTopK
    coders are thresholded at inference, so both choices export their exact threshold.
    """
    from ..sparsify import load_coder
    from .activations import calibrate_jumprelu_thresholds

    if activation not in ACTIVATIONS:
        raise ExportError(f"activation {activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    found = find_coder_dirs(checkpoint_dir)
    empty = empty_layers(found, n_layers)
    coders = {layer: (hp, load_coder(path)) for layer, (hp, path) in found.items()}
    first = coders[min(coders)][1]
    width, d_in, k = first.num_latents, first.d_in, first.cfg.k
    sizes = coder_nested_sizes(first)
    for layer, (hp, coder) in coders.items():
        if (coder.num_latents, coder.d_in) != (width, d_in):
            raise ExportError(
                f"{hp}: width {coder.num_latents}, d_in {coder.d_in} differ from layer 0's "
                f"{width}, {d_in}; circuit-tracer needs one width for all layers"
            )
        if coder_nested_sizes(coder) != sizes:
            raise ExportError(f"{hp}: nested sizes {coder_nested_sizes(coder)} differ from layer 0's {sizes}")
        if getattr(coder.cfg, "activation", "topk") != "topk":
            raise ExportError(f"{hp}: activation {coder.cfg.activation!r} cannot be exported; allowed: topk")
    exact_threshold = any(batch_topk_threshold(c) is not None for _, c in coders.values())
    if activation == "jumprelu" and not exact_threshold:
        if calibration is None:
            raise ExportError("--activation jumprelu needs calibration activations (MLP inputs per layer)")
        missing = sorted(set(coders) - set(calibration))
        if missing:
            raise ExportError(f"calibration activations lack layers {missing}")

    written_activation = "jumprelu" if exact_threshold else activation
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        for layer, (hp, coder) in coders.items():
            tensors = coder_tensors(coder)
            if exact_threshold:
                t = batch_topk_threshold(coder)
                tensors["activation_function.threshold"] = torch.full((width,), t)
            elif activation == "jumprelu":
                tensors["activation_function.threshold"] = calibrate_jumprelu_thresholds(
                    coder, calibration[layer]
                ).float()
            save_file(tensors, str(tmp / f"layer_{layer}.safetensors"))
        for layer in empty:  # same tensor names and shapes as the coder layers just written
            save_file(zero_tensors(tensors), str(tmp / f"layer_{layer}.safetensors"))
        write_config_yaml(
            tmp,
            base_kind="transcoder_set",
            activation=written_activation,
            k=k,
            model_name=model_name,
            scan=f"matryoshka-export-{Path(out_dir).name}",
        )
        write_nested_sizes(
            tmp,
            sizes,
            width,
            activation=written_activation,
            k=k,
            source=str(Path(checkpoint_dir).absolute()),
            hookpoints={str(layer): hp for layer, (hp, _) in coders.items()},
            empty_layers=empty,
        )
    return Path(out_dir)
