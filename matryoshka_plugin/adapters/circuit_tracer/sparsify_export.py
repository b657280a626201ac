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
from .transcoder_dir import (
    ACTIVATIONS,
    level_decoder_keys,
    level_decoder_path,
    write_calibration_report,
    write_config_yaml,
    write_nested_sizes,
)


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


def coder_level_decoders(coder) -> dict[str, Tensor]:
    """A ``nested_decoders`` coder's level decoders, each with its full bias (the shared
    ``b_dec`` plus the level's offset, as the coder's training forward adds them)."""
    tensors = {}
    for W, b_offset in zip(getattr(coder, "W_dec_levels", ()), getattr(coder, "b_dec_levels", ())):
        w_key, b_key = level_decoder_keys(W.shape[0])
        tensors[w_key] = W.detach().float().contiguous().cpu()
        tensors[b_key] = (coder.b_dec + b_offset).detach().float().contiguous().cpu()
    return tensors


def coder_nested_sizes(coder) -> list[int] | None:
    """The Matryoshka nested sizes of a coder, or None for a plain sparsify coder."""
    return list(coder.nested_sizes) if hasattr(coder, "nested_sizes") else None


def batch_topk_threshold(coder) -> float | None:
    """The inference threshold of a BatchTopK coder (its exact activation), else None."""
    if not getattr(coder.cfg, "batch_topk", False):
        return None
    return float(coder.batch_topk_threshold.clamp_min(0))


def check_coder_values(hookpoint: str, coder) -> None:
    """Refuse a coder whose weights are not finite.

    sparsify loads them without complaint; exported, they give NaN graphs far from the
    checkpoint that caused them. (``k`` was checked when the coder was loaded:
    ``adapters.sparsify.coder_loading``.)
    """
    values = dict(coder.state_dict())
    if getattr(coder.cfg, "batch_topk", False):
        values["batch_topk_threshold (cfg.json)"] = coder.batch_topk_threshold
    for name, t in values.items():
        bad = ~torch.isfinite(t)
        if bad.any():
            where = [int(i) for i in bad.nonzero()[0]]
            raise ExportError(
                f"{hookpoint}: {name} holds {int(bad.sum())} NaN/Inf values (first {t[bad][0].item()} "
                f"at {where}); allowed: finite weights"
            )


def _check_calibration(what: str, layer: int, t: Tensor, width: int, rows: int | None = None) -> None:
    """One line naming the layer when calibration rows do not fit the coder."""
    if t.shape[1] != width:
        raise ExportError(f"{what} for layer {layer} has {t.shape[1]} columns; the coder needs {width}")
    if rows is not None and t.shape[0] != rows:
        raise ExportError(f"{what} for layer {layer} has {t.shape[0]} rows; the MLP inputs have {rows}")
    if t.shape[0] == 0:
        raise ExportError(f"{what} for layer {layer} has no rows")
    if not torch.isfinite(t).all():
        raise ExportError(f"{what} for layer {layer} holds NaN/Inf values; allowed: finite activations")


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
    calibration_outputs: Mapping[int, Tensor] | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    n_layers: int | None = None,
) -> Path:
    """Convert a sparsify transcoder run directory into a circuit-tracer transcoder set.

    ``n_layers`` (the model's depth; default: up to the last coder's layer): layers
    without a coder are written as zero transcoders (``empty_layers``).

    ``activation="topk"`` keeps sparsify's exact TopK-after-ReLU (needs the plugin's
    loader); ``"jumprelu"`` writes per-latent thresholds calibrated on ``calibration``
    (``{layer: MLP inputs [n, d_model]}``) that stock circuit-tracer loads, and records
    how far that code is from TopK in ``jumprelu_calibration.json`` (with the true MLP
    outputs ``calibration_outputs``, row for row, also both FVUs). BatchTopK coders are
    thresholded at inference, so both choices export their exact threshold.

    circuit-tracer 0.5.0 picks the activation per layer file (a threshold means JumpReLU),
    so a set mixing BatchTopK and TopK layers exports as JumpReLU: exact thresholds for
    the BatchTopK layers, calibrated ones for the TopK layers. The plugin's TopK kind puts
    one ``TopKReLU(k)`` on every layer, so ``"topk"`` refuses such a set (and one whose
    layers differ in ``k``).

    A coder trained with ``nested_decoders`` also exports each level's decoder
    (``transcoder_dir.LEVEL_DECODER_DIR``); the layer files keep the full decoder, so
    stock circuit-tracer loads the directory as before.
    """
    from ..sparsify import load_coder
    from .activations import calibrate_jumprelu_thresholds, jumprelu_agreement

    if activation not in ACTIVATIONS:
        raise ExportError(f"activation {activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    found = find_coder_dirs(checkpoint_dir)
    empty = empty_layers(found, n_layers)
    coders = {layer: (hp, load_coder(path)) for layer, (hp, path) in found.items()}
    first = coders[min(coders)][1]
    width, d_in, k = first.num_latents, first.d_in, first.cfg.k
    sizes = coder_nested_sizes(first)
    for layer, (hp, coder) in coders.items():
        check_coder_values(hp, coder)
        if (coder.num_latents, coder.d_in) != (width, d_in):
            raise ExportError(
                f"{hp}: width {coder.num_latents}, d_in {coder.d_in} differ from layer 0's "
                f"{width}, {d_in}; circuit-tracer needs one width for all layers"
            )
        if coder_nested_sizes(coder) != sizes:
            raise ExportError(f"{hp}: nested sizes {coder_nested_sizes(coder)} differ from layer 0's {sizes}")
        if getattr(coder.cfg, "activation", "topk") != "topk":
            raise ExportError(f"{hp}: activation {coder.cfg.activation!r} cannot be exported; allowed: topk")
    level_sizes = [int(W.shape[0]) for W in getattr(first, "W_dec_levels", ())]
    for hp, coder in coders.values():
        if [int(W.shape[0]) for W in getattr(coder, "W_dec_levels", ())] != level_sizes:
            raise ExportError(f"{hp}: its level decoders differ from layer 0's ({level_sizes}); train all layers alike")
    batch_layers = sorted(layer for layer, (_, c) in coders.items() if batch_topk_threshold(c) is not None)
    topk_layers = sorted(set(coders) - set(batch_layers))
    if activation == "topk" and batch_layers and topk_layers:
        raise ExportError(
            f"layers {batch_layers} are BatchTopK and layers {topk_layers} TopK: the exact topk "
            "export gives every layer one TopK activation; use --activation jumprelu (BatchTopK "
            "layers keep their exact threshold, TopK layers get calibrated ones)"
        )
    if activation == "topk" and len({coders[l][1].cfg.k for l in topk_layers}) > 1:
        ks = {coders[l][0]: coders[l][1].cfg.k for l in topk_layers}
        raise ExportError(f"the layers' k differ ({ks}): the exact topk export writes one k for all layers")
    if calibration_outputs is not None and activation != "jumprelu":
        raise ExportError(f"calibration outputs are used only by activation jumprelu, not {activation!r}")
    calibrated = topk_layers if activation == "jumprelu" else []
    if calibrated:
        if calibration is None:
            raise ExportError("--activation jumprelu needs calibration activations (MLP inputs per layer)")
        missing = sorted(set(calibrated) - set(calibration))
        if missing:
            raise ExportError(f"calibration activations lack layers {missing}")
        for layer in calibrated:
            _check_calibration("calibration", layer, calibration[layer], d_in)
            if calibration_outputs is not None:
                if layer not in calibration_outputs:
                    raise ExportError(f"calibration outputs lack layer {layer}")
                rows, d_out = calibration[layer].shape[0], coders[layer][1].W_dec.shape[1]
                _check_calibration("calibration outputs", layer, calibration_outputs[layer], d_out, rows)

    written_activation = "jumprelu" if batch_layers else activation
    agreement = {}
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        for layer, (hp, coder) in coders.items():
            tensors = coder_tensors(coder)
            if layer in batch_layers:
                t = batch_topk_threshold(coder)
                tensors["activation_function.threshold"] = torch.full((width,), t)
            elif layer in calibrated:
                thresholds = calibrate_jumprelu_thresholds(coder, calibration[layer]).float()
                tensors["activation_function.threshold"] = thresholds
                y = None if calibration_outputs is None else calibration_outputs[layer]
                agreement[str(layer)] = jumprelu_agreement(coder, calibration[layer], thresholds, y)
            save_file(tensors, str(tmp / f"layer_{layer}.safetensors"))
            levels = coder_level_decoders(coder) if level_sizes else None
            if levels:
                level_decoder_path(tmp, layer).parent.mkdir(exist_ok=True)
                save_file(levels, str(level_decoder_path(tmp, layer)))
        for layer in empty:  # same tensor names and shapes as the coder layers just written
            save_file(zero_tensors(tensors), str(tmp / f"layer_{layer}.safetensors"))
            if levels:
                save_file(zero_tensors(levels), str(level_decoder_path(tmp, layer)))
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
            level_decoders=level_sizes,
            empty_layers=empty,
        )
        if agreement:
            write_calibration_report(tmp, agreement, exact_layers=batch_layers)
    return Path(out_dir)
