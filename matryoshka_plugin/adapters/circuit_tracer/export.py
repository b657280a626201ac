"""Export sparsify transcoders to circuit-tracer's transcoder directory format.

circuit-tracer (0.5.0) reads a directory holding ``config.yaml`` and, for per-layer
transcoders, ``layer_{i}.safetensors`` with ``W_enc (d_tc, d_model)``, ``W_dec (d_tc,
d_model)``, ``b_enc``, ``b_dec`` and optionally ``W_skip`` and
``activation_function.threshold``. sparsify stores the same matrices in the same
orientation (``encoder.weight [M, d_in]``, ``W_dec [M, d_in]``) and a transcoder encodes
``x`` without subtracting ``b_dec``, as circuit-tracer's ``encode`` does, so the tensors
are copied unchanged and the round trip is exact.

The small helpers at the top (hook-name mapping, ``config.yaml`` writing, nested-size
recording, atomic directory writing) are shared with the cross-layer transcoder export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from ...atomic import atomic_dir
from ...core.errors import CheckpointError
from ..sparsify import load_coder
from ...core.errors import ExportError

NESTED_SIZES_FILE = "matryoshka.json"
CONFIG_FILE = "config.yaml"

# circuit-tracer's ``load_transcoders`` dispatches on ``model_kind`` and raises on an
# unknown one. TopK exports get their own kind so that stock circuit-tracer refuses
# them loudly instead of loading them as plain ReLU transcoders (it has no TopK loader).
TOPK_KIND_PREFIX = "matryoshka_topk_"
BASE_MODEL_KINDS = ("transcoder_set", "cross_layer_transcoder")
ACTIVATIONS = ("topk", "jumprelu")



# -- hook names -------------------------------------------------------------------

_MLP_HOOKPOINT = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp$")

#: TransformerLens hooks around a block's MLP, as circuit-tracer names them.
TL_MLP_INPUT_HOOK = "mlp.hook_in"
TL_MLP_OUTPUT_HOOK = "mlp.hook_out"


def hookpoint_layer(hookpoint: str) -> int:
    """Layer index of a sparsify MLP hookpoint (``layers.3.mlp``, ``model.layers.3.mlp``)."""
    m = _MLP_HOOKPOINT.match(hookpoint)
    if m is None:
        raise ExportError(
            f"hookpoint {hookpoint!r} is not an MLP hookpoint; allowed: layers.N.mlp, "
            "model.layers.N.mlp (transcoders replace MLPs in circuit-tracer)"
        )
    return int(m.group(1))


def tl_mlp_hooks(hookpoint: str | None = None) -> tuple[str, str]:
    """(feature_input_hook, feature_output_hook) for an MLP transcoder in circuit-tracer."""
    if hookpoint is not None:
        hookpoint_layer(hookpoint)
    return TL_MLP_INPUT_HOOK, TL_MLP_OUTPUT_HOOK


def model_kind_for(base_kind: str, activation: str) -> str:
    """The ``model_kind`` written to ``config.yaml`` for a base kind and activation."""
    if base_kind not in BASE_MODEL_KINDS:
        raise ExportError(f"model kind {base_kind!r} is unknown; allowed: {', '.join(BASE_MODEL_KINDS)}")
    return TOPK_KIND_PREFIX + base_kind if activation == "topk" else base_kind


def base_model_kind(model_kind: str) -> tuple[str, bool]:
    """(circuit-tracer's model kind, whether the activation is the plugin's TopK)."""
    topk = model_kind.startswith(TOPK_KIND_PREFIX)
    base = model_kind[len(TOPK_KIND_PREFIX):] if topk else model_kind
    if base not in BASE_MODEL_KINDS:
        raise ExportError(
            f"model_kind {model_kind!r} is unknown; allowed: "
            + ", ".join([*BASE_MODEL_KINDS, *(TOPK_KIND_PREFIX + k for k in BASE_MODEL_KINDS)])
        )
    return base, topk


# -- config.yaml and nested sizes ---------------------------------------------------


def write_config_yaml(
    out_dir: Path | str,
    *,
    base_kind: str,
    activation: str,
    feature_input_hook: str = TL_MLP_INPUT_HOOK,
    feature_output_hook: str = TL_MLP_OUTPUT_HOOK,
    k: int | None = None,
    model_name: str | None = None,
    scan: str | None = None,
) -> dict:
    """Write circuit-tracer's ``config.yaml``; returns what was written.

    circuit-tracer reads ``model_kind``, the two hooks, ``scan`` and ``model_name`` and
    ignores other keys, so ``topk_k`` rides along for the plugin's loader.
    """
    config: dict = {
        "model_kind": model_kind_for(base_kind, activation),
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "scan": scan if scan is not None else f"matryoshka-export-{Path(out_dir).name}",
    }
    if model_name:
        config["model_name"] = model_name
    if activation == "topk":
        if k is None:
            raise ExportError("a TopK export needs k")
        config["topk_k"] = int(k)
    (Path(out_dir) / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def write_nested_sizes(
    out_dir: Path | str,
    nested_sizes: list[int] | None,
    width: int,
    **extra,
) -> None:
    """Record the Matryoshka prefix lengths (ending at ``width``) in ``matryoshka.json``.

    ``nested_sizes=None`` records a plain (non-Matryoshka) dictionary, so a reader can
    tell "no nested sizes" from "file missing".
    """
    sizes = None if nested_sizes is None else [int(s) for s in nested_sizes]
    if sizes is not None and (sizes[-1] != width or any(b <= a for a, b in zip(sizes, sizes[1:]))):
        raise ExportError(f"nested sizes {sizes} must increase strictly and end at the width {width}")
    record = {"nested_sizes": sizes, "width": int(width), **extra}
    (Path(out_dir) / NESTED_SIZES_FILE).write_text(json.dumps(record, indent=2))


def read_nested_sizes(transcoder_dir: Path | str) -> dict | None:
    """The ``matryoshka.json`` record of an exported directory, or None if absent."""
    path = Path(transcoder_dir) / NESTED_SIZES_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None


# -- atomic directory writing ---------------------------------------------------------


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
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ExportError(
            f"{root} has no transcoder for layers {missing}; circuit-tracer needs one for "
            "every layer from 0 up"
        )
    return found


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


def export_transcoder_set(
    checkpoint_dir: Path | str,
    out_dir: Path | str,
    activation: str = "topk",
    calibration: Mapping[int, Tensor] | None = None,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a sparsify transcoder run directory into a circuit-tracer transcoder set.

    ``activation="topk"`` keeps sparsify's exact TopK-after-ReLU (needs the plugin's
    loader); ``"jumprelu"`` writes per-latent thresholds calibrated on ``calibration``
    (``{layer: MLP inputs [n, d_model]}``) that stock circuit-tracer loads. BatchTopK
    coders are thresholded at inference, so both choices export their exact threshold.
    """
    from .activations import calibrate_jumprelu_thresholds

    if activation not in ACTIVATIONS:
        raise ExportError(f"activation {activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    coders = {layer: (hp, load_coder(path)) for layer, (hp, path) in find_coder_dirs(checkpoint_dir).items()}
    first = coders[0][1]
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
        )
    return Path(out_dir)


__all__ = [
    "ACTIVATIONS",
    "CheckpointError",
    "ExportError",
    "NESTED_SIZES_FILE",
    "base_model_kind",
    "coder_nested_sizes",
    "coder_tensors",
    "export_transcoder_set",
    "find_coder_dirs",
    "hookpoint_layer",
    "model_kind_for",
    "read_nested_sizes",
    "tl_mlp_hooks",
    "write_config_yaml",
    "write_nested_sizes",
]
