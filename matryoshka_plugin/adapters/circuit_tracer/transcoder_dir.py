"""The circuit-tracer (0.5.0) transcoder directory, as the plugin writes and reads it.

circuit-tracer reads a directory holding ``config.yaml`` and, for per-layer
transcoders, ``layer_{i}.safetensors`` (cross-layer: ``W_enc_{i}`` / ``W_dec_{i}``
files). The plugin adds its own TopK model kinds (``topk_k`` rides along in
``config.yaml``), ``matryoshka.json``, the nested-size record, and for coders trained with
``nested_decoders`` each level's own decoder in ``level_decoders/layer_{i}.safetensors``
(a subdirectory, which circuit-tracer never reads: it loads the full-width files). Both exports
(``sparsify_export``, ``clt_export``) write this format and ``loading`` reads it; this
module needs neither circuit-tracer nor sparsify.
"""

from __future__ import annotations

import json

from pathlib import Path

import yaml

from ...core.errors import ExportError

NESTED_SIZES_FILE = "matryoshka.json"
#: Per-layer files of the level decoders, per level P: ``W_dec_{P}`` (per-layer transcoders
#: ``[P, d]``; a CLT ``[P, n_layers - i, d]``, the layout of its ``W_dec_{i}``) and the level's
#: full bias ``b_dec_{P} [d]`` at layer ``i``.
LEVEL_DECODER_DIR = "level_decoders"
CONFIG_FILE = "config.yaml"
#: How far a calibrated JumpReLU export is from the TopK code it replaces, per layer.
CALIBRATION_FILE = "jumprelu_calibration.json"

# circuit-tracer's ``load_transcoders`` dispatches on ``model_kind`` and raises on an
# unknown one. TopK exports get their own kind so that stock circuit-tracer refuses
# them loudly instead of loading them as plain ReLU transcoders (it has no TopK loader).
TOPK_KIND_PREFIX = "matryoshka_topk_"
BASE_MODEL_KINDS = ("transcoder_set", "cross_layer_transcoder")
ACTIVATIONS = ("topk", "jumprelu")


# -- hook names -------------------------------------------------------------------

#: TransformerLens hooks around a block's MLP, as circuit-tracer names them.
TL_MLP_INPUT_HOOK = "mlp.hook_in"
TL_MLP_OUTPUT_HOOK = "mlp.hook_out"


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


def level_decoder_path(transcoder_dir: Path | str, layer: int) -> Path:
    """Where layer ``layer``'s level decoders live in a transcoder directory."""
    return Path(transcoder_dir) / LEVEL_DECODER_DIR / f"layer_{layer}.safetensors"


def level_decoder_keys(size: int) -> tuple[str, str]:
    """The tensor names of level ``size``'s decoder and its full bias."""
    return f"W_dec_{size}", f"b_dec_{size}"


def write_calibration_report(out_dir: Path | str, layers: dict[str, dict], exact_layers: list[int]) -> None:
    """Record ``jumprelu_agreement`` per calibrated layer in ``jumprelu_calibration.json``.

    ``exact_layers`` are BatchTopK layers, whose threshold is their own activation.
    """
    record = {
        "note": "measured on the calibration tokens the thresholds were fitted to; "
        "fvu_* are against the true MLP outputs when they were given",
        "exact_layers": [int(l) for l in exact_layers],
        "layers": layers,
    }
    (Path(out_dir) / CALIBRATION_FILE).write_text(json.dumps(record, indent=2))


def read_calibration_report(transcoder_dir: Path | str) -> dict | None:
    """The ``jumprelu_calibration.json`` record of an exported directory, or None if absent."""
    path = Path(transcoder_dir) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None
