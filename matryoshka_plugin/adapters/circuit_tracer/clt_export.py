"""Export the plugin's CLT (``matryoshka_plugin.clt``) to circuit-tracer's directory formats.

- ``export_clt``: circuit-tracer's cross-layer transcoder (``W_enc_{i}`` /
  ``W_dec_{i}.safetensors`` for every model layer, ``config.yaml``, nested sizes).
- ``export_per_layer``: one-layer CLTs as circuit-tracer's per-layer transcoder set
  (``layer_{i}.safetensors``), for comparing CLTs with per-layer transcoders trained by
  the same trainer.

A CLT trained with ``nested_decoders`` also gets each level's decoder in
``level_decoders/layer_{i}.safetensors`` (``transcoder_dir``): a CLT's ``W_dec_{P}
[P, n_layers - i, d]`` in the layout of ``W_dec_{i}``, a per-layer export's ``[P, d]``,
and the level's full bias at layer ``i``. The stock files keep the full decoder, so
stock circuit-tracer loads the export as before.

``config.yaml`` and the nested-size record are written by the shared helpers of
``export`` (the sparsify transcoder export).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...atomic import atomic_dir
from ...clt.model import MatryoshkaCLT, load_clt
from ...core.errors import ExportError
from .transcoder_dir import (
    ACTIVATIONS,
    level_decoder_keys,
    level_decoder_path,
    write_config_yaml,
    write_nested_sizes,
)


def clt_tensors(clt: MatryoshkaCLT, n_model_layers: int) -> dict[int, tuple[dict, dict]]:
    """circuit-tracer's per-layer ``(W_enc_i file, W_dec_i file)`` tensors.

    circuit-tracer's CLT spans every model layer: untrained layers get zero encoders
    and decoders (no latent fires there; their MLP output goes to the error nodes).
    The tensors keep their orientation: circuit-tracer encodes ``x @ W_enc_i.T`` and
    decodes ``act @ W_dec_i[:, j - i]``, as the plugin's CLT does.
    """
    if max(clt.layers) >= n_model_layers:
        raise ExportError(
            f"the CLT covers layers {clt.layers}, beyond the model's {n_model_layers} layers"
        )
    M, d = clt.num_latents, clt.d_model
    slot = {layer: s for s, layer in enumerate(clt.layers)}
    out = {}
    for i in range(n_model_layers):
        W_enc = torch.zeros(M, d)
        b_enc = torch.zeros(M)
        b_dec = torch.zeros(d)
        if i in slot:
            s = slot[i]
            W_enc, b_enc, b_dec = clt.W_enc[s], clt.b_enc[s], clt.b_dec[s]
        enc = {f"W_enc_{i}": W_enc, f"b_enc_{i}": b_enc, f"b_dec_{i}": b_dec}
        out[i] = (
            {k: v.detach().float().cpu().contiguous() for k, v in enc.items()},
            {f"W_dec_{i}": _model_layer_decoder(clt, list(clt.W_dec), i, n_model_layers)},
        )
    return out


def _model_layer_decoder(clt: MatryoshkaCLT, W_by_source: list[Tensor], i: int, n_model_layers: int) -> Tensor:
    """Model layer ``i``'s decoder ``[rows, n_model_layers - i, d]`` from the CLT's per-source
    decoders ``[rows, L - s, d]``: zero for an untrained layer and for untrained targets."""
    rows = W_by_source[0].shape[0]
    W_dec = torch.zeros(rows, n_model_layers - i, clt.d_model)
    if i in clt.layers:
        s = clt.layers.index(i)
        for t in range(clt.n_layers - s):
            W_dec[:, clt.layers[s + t] - i] = W_by_source[s][:, t].detach().float().cpu()
    return W_dec.contiguous()


def clt_level_decoders(clt: MatryoshkaCLT, n_model_layers: int) -> dict[int, dict[str, Tensor]]:
    """``{model layer i: level_decoders/layer_{i} tensors}`` of a ``nested_decoders`` CLT
    (``{}`` without): per nested size P, ``W_dec_{P}`` in ``W_dec_{i}``'s layout and the
    level's full bias at target layer ``i`` (zero at an untrained layer)."""
    out: dict[int, dict[str, Tensor]] = {i: {} for i in range(n_model_layers)} if clt.inner_sizes else {}
    for size in clt.inner_sizes:
        W_by_source, b_dec = clt.level_decoder(size)
        w_key, b_key = level_decoder_keys(size)
        for i, tensors in out.items():
            tensors[w_key] = _model_layer_decoder(clt, W_by_source, i, n_model_layers)
            b = b_dec[clt.layers.index(i)] if i in clt.layers else torch.zeros(clt.d_model)
            tensors[b_key] = b.detach().float().cpu().contiguous()
    return out


def _one_layer_level_decoders(clt: MatryoshkaCLT) -> dict[str, Tensor]:
    """A one-layer CLT's level decoders in the per-layer layout (``[P, d]``: its one target)."""
    out = {}
    for size in clt.inner_sizes:
        (W,), b_dec = clt.level_decoder(size)
        w_key, b_key = level_decoder_keys(size)
        out[w_key], out[b_key] = W[:, 0].detach().float().contiguous(), b_dec[0].detach().float().contiguous()
    return out


def _save_level_decoders(tmp: Path, levels: dict[int, dict[str, Tensor]]) -> None:
    for i, tensors in levels.items():
        level_decoder_path(tmp, i).parent.mkdir(exist_ok=True)
        save_file(tensors, str(level_decoder_path(tmp, i)))


@torch.no_grad()
def export_clt(
    clt: MatryoshkaCLT | str | Path,
    out_dir: str | Path,
    *,
    n_model_layers: int | None = None,
    activation: str = "topk",
    calibration: Tensor | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write circuit-tracer's cross-layer transcoder directory for a (Matryoshka) CLT.

    - TopK CLTs keep their exact activation (``activation="topk"``): ``config.yaml``
      says ``matryoshka_topk_cross_layer_transcoder`` with ``topk_k``, which the
      plugin's ``load_transcoders_dir`` turns into a ``cross_layer_transcoder`` with a
      ReLU-then-TopK activation. ``activation="jumprelu"`` writes per-latent
      thresholds calibrated on ``calibration`` (MLP inputs ``[n, L, d]``), which stock
      circuit-tracer loads (an approximation of TopK).
    - BatchTopK CLTs are thresholded at inference: written as JumpReLU with their exact
      per-layer threshold, ``model_kind: cross_layer_transcoder`` either way.
    - ``nested_decoders`` CLTs also write every level's decoder (``clt_level_decoders``).
    """
    if not isinstance(clt, MatryoshkaCLT):
        clt = load_clt(clt)
    clt = clt.cpu().float().eval()
    if activation not in ACTIVATIONS:
        raise ExportError(f"activation {activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    n_model_layers = n_model_layers or clt.source.get("n_model_layers") or max(clt.layers) + 1
    tensors = clt_tensors(clt, int(n_model_layers))
    M = clt.num_latents
    thresholds = None
    if clt.cfg.batch_topk:
        written = "jumprelu"
        thresholds = clt.batch_topk_threshold.clamp_min(0).float()
    elif activation == "jumprelu":
        if calibration is None:
            raise ExportError("activation jumprelu needs calibration MLP inputs [n, layers, d_model]")
        clt._check_input(calibration, "calibration")
        thresholds = _calibrate(clt, calibration)
        written = "jumprelu"
    else:
        written = "topk"
    if thresholds is not None:
        slot = {layer: s for s, layer in enumerate(clt.layers)}
        for i, (enc, _) in tensors.items():
            t = thresholds[slot[i]] if i in slot else torch.zeros(())
            enc[f"threshold_{i}"] = (t.expand(M) if t.ndim == 0 else t).contiguous().clone()
    sizes = clt.nested_sizes if clt.cfg.matryoshka else None
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        for i, (enc, dec) in tensors.items():
            save_file(enc, str(tmp / f"W_enc_{i}.safetensors"))
            save_file(dec, str(tmp / f"W_dec_{i}.safetensors"))
        _save_level_decoders(tmp, clt_level_decoders(clt, int(n_model_layers)))
        _write_metadata(
            tmp, clt, "cross_layer_transcoder", written, model_name, f"matryoshka-clt-{Path(out_dir).name}",
            sizes, M,
            trained_layers=clt.layers,
            n_layers=int(n_model_layers),
            prefix_schedule=clt.cfg.prefix_schedule if clt.cfg.matryoshka else None,
            level_decoders=clt.inner_sizes,
        )
    return Path(out_dir)


@torch.no_grad()
def export_per_layer(
    clts: list[MatryoshkaCLT | str | Path],
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one-layer CLTs as circuit-tracer's per-layer transcoder set.

    A one-layer CLT is a transcoder (same encoder, one decoder slot), so
    ``layer_{i}.safetensors`` holds its tensors unchanged and circuit-tracer attributes
    through it with its per-layer code path. This is how the plugin's CLT-vs-per-layer
    comparison trains both dictionaries with one trainer. TopK CLTs are written as
    exact TopK (the plugin's loader), BatchTopK ones as JumpReLU with their threshold.
    """
    clts = [c if isinstance(c, MatryoshkaCLT) else load_clt(c) for c in clts]
    if not clts:
        raise ExportError("export_per_layer needs at least one one-layer CLT")
    by_layer: dict[int, MatryoshkaCLT] = {}
    for c in clts:
        if c.n_layers != 1:
            raise ExportError(f"a CLT over layers {c.layers} is not a per-layer transcoder; allowed: one layer each")
        if c.layers[0] in by_layer:
            raise ExportError(f"two CLTs for layer {c.layers[0]}; allowed: one per layer")
        by_layer[c.layers[0]] = c.cpu().float().eval()
    first = clts[0]

    def shape_of(c):
        return c.num_latents, c.cfg.k, c.cfg.batch_topk, c.nested_sizes if c.cfg.matryoshka else None, c.inner_sizes

    shape = shape_of(first)
    for layer, c in by_layer.items():
        got = shape_of(c)
        if got != shape:
            raise ExportError(
                f"layer {layer}: (width, k, batch_topk, nested sizes, level decoders) {got} differ "
                f"from {shape}; circuit-tracer needs one shape for all layers"
            )
    written = "jumprelu" if first.cfg.batch_topk else "topk"
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        for layer, c in sorted(by_layer.items()):
            tensors = {"W_enc": c.W_enc[0], "b_enc": c.b_enc[0], "W_dec": c.W_dec[0][:, 0], "b_dec": c.b_dec[0]}
            if c.cfg.batch_topk:
                tensors["activation_function.threshold"] = c.batch_topk_threshold[0].clamp_min(0).expand(c.num_latents)
            save_file({k: v.detach().float().contiguous().clone() for k, v in tensors.items()}, str(tmp / f"layer_{layer}.safetensors"))
        _save_level_decoders(tmp, {layer: _one_layer_level_decoders(c) for layer, c in by_layer.items() if c.inner_sizes})
        _write_metadata(
            tmp, first, "transcoder_set", written, model_name, f"matryoshka-clt-per-layer-{Path(out_dir).name}",
            shape[3], first.num_latents,
            hookpoints={str(layer): c.source.get("hookpoints", {}).get(str(layer), "") for layer, c in by_layer.items()},
            level_decoders=first.inner_sizes,
        )
    return Path(out_dir)


def _write_metadata(tmp: Path, clt, base_kind: str, written: str, model_name, scan: str, sizes, width: int, **extra) -> None:
    """``config.yaml`` and ``matryoshka.json`` of an export of ``clt`` (or its layers)."""
    write_config_yaml(
        tmp,
        base_kind=base_kind,
        activation=written,
        k=clt.cfg.k,
        model_name=model_name or clt.source.get("model") or None,
        scan=scan,
    )
    write_nested_sizes(tmp, sizes, width, activation=written, k=clt.cfg.k, **extra)


def _calibrate(clt: MatryoshkaCLT, x: Tensor) -> Tensor:
    """Per-layer JumpReLU thresholds from the circuit-tracer helper's calibration."""
    # Imported here: ``activations`` imports circuit-tracer, which a TopK export never needs.
    from .activations import calibrate_jumprelu_thresholds

    out = []
    for s in range(clt.n_layers):
        shim = SimpleNamespace(
            dtype=clt.b_dec.dtype,
            encoder=SimpleNamespace(weight=clt.W_enc[s], bias=clt.b_enc[s]),
            encode=lambda c, s=s: clt.encode_layer(c, s),
        )
        out.append(calibrate_jumprelu_thresholds(shim, x[:, s]))
    return torch.stack(out)
