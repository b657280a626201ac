"""Prefix-aware causal checks of transcoder features on a circuit-tracer ``ReplacementModel``.

- ``constrained_patch``: scale features through circuit-tracer's ``feature_intervention``
  with ``constrained_layers``: in those layers the MLP outputs are frozen to their clean
  values plus the patched features' decoder change, so effects are not propagated through
  other features there (the default range runs from the patched layer to the last layer,
  i.e. every later layer stays frozen; attention patterns are frozen too).
- ``iterative_patch``: the same patch with the whole model re-run (``constrained_layers``
  None): real MLPs downstream respond, knock-on effects included.
- ``mechanistic_fidelity``: one patch (feature activation times ``factor``) applied to the
  original model and to the local replacement model (MLPs replaced by the transcoders plus
  frozen error terms), both with attention patterns and norm scales frozen; the
  downstream residual-stream changes are compared by cosine similarity and normalised MSE
  ``|d_repl - d_orig|^2 / |d_orig|^2``, per layer and at the last layer.

Every function takes ``prefix_len``: the transcoders are truncated to their first ``P``
latents (``adapters.circuit_tracer.prefix_truncation``) for the span of the call, so the
replacement model is the coarse one and the patched features must lie inside the prefix.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from .adapters.circuit_tracer.prefix_transcoders import prefix_truncation, transcoder_width
from .core.errors import CausalError
from .core.prefixes import check_prefix_len

__all__ = [
    "Feature",
    "Fidelity",
    "PatchResult",
    "constrained_patch",
    "feature_values",
    "iterative_patch",
    "mechanistic_fidelity",
    "plot_fidelity",
    "prefix_causal_report",
    "summarise_fidelity",
    "tokenize",
    "top_features",
]

Feature = tuple[int, int, int]
"""(layer, position, feature index)."""


def _context(model, prefix_len):
    return nullcontext() if prefix_len is None else prefix_truncation(model, prefix_len)


def _check(model, tokens: Tensor, features: Sequence[Feature], prefix_len: int | None) -> None:
    width = transcoder_width(model.transcoders)
    if prefix_len is not None:
        check_prefix_len(prefix_len, width, error=CausalError)
    limit = width if prefix_len is None else prefix_len
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[-1]
    if not features:
        raise CausalError("no features to patch; give at least one (layer, position, feature)")
    for layer, pos, feat in features:
        if not 0 <= layer < n_layers:
            raise CausalError(f"feature layer {layer} is out of range; allowed: 0..{n_layers - 1}")
        if not 0 <= pos < n_pos:
            raise CausalError(f"feature position {pos} is out of range; allowed: 0..{n_pos - 1}")
        if not 0 <= feat < limit:
            raise CausalError(f"feature {feat} is outside the prefix; allowed: 0..{limit - 1}")


def tokenize(model, prompt) -> Tensor:
    return model.ensure_tokenized(prompt)


@torch.no_grad()
def feature_values(model, tokens: Tensor, features: Sequence[Feature], prefix_len: int | None = None) -> Tensor:
    """Clean activations of ``features`` (after the activation and prefix truncation)."""
    _check(model, tokens, features, prefix_len)
    with _context(model, prefix_len):
        _, acts = model.get_activations(tokens)
    return torch.stack([acts[l, p, f] for l, p, f in features])


class PatchResult(NamedTuple):
    logits: Tensor
    """Patched logits ``[1, n_pos, vocab]``."""
    clean_logits: Tensor
    """Unpatched logits."""
    activations: Tensor
    """Feature activations ``[n_layers, n_pos, width]`` of the patched run."""

    def last_logit_change(self) -> Tensor:
        return self.logits[0, -1] - self.clean_logits[0, -1]


def _patch(model, tokens, features, factor, prefix_len, **kwargs) -> PatchResult:
    _check(model, tokens, features, prefix_len)
    with _context(model, prefix_len):
        clean_logits, acts = model.get_activations(tokens)
        interventions = [(l, p, f, factor * acts[l, p, f]) for l, p, f in features]
        logits, new_acts = model.feature_intervention(tokens, interventions, **kwargs)
    return PatchResult(logits, clean_logits, new_acts)


def constrained_patch(
    model,
    tokens: Tensor,
    features: Sequence[Feature],
    factor: float,
    *,
    layers: range | None = None,
    prefix_len: int | None = None,
) -> PatchResult:
    """Scale ``features`` by ``factor`` with MLP outputs frozen in ``layers`` (default: the
    first patched layer to the last layer)."""
    if layers is None:
        layers = range(min(l for l, _, _ in features), model.cfg.n_layers)
    if not isinstance(layers, range) or len(layers) == 0 or layers.start < 0 or layers.stop > model.cfg.n_layers:
        raise CausalError(f"layers {layers!r} must be a non-empty range inside 0..{model.cfg.n_layers - 1}")
    return _patch(model, tokens, features, factor, prefix_len, constrained_layers=layers)


def iterative_patch(
    model,
    tokens: Tensor,
    features: Sequence[Feature],
    factor: float,
    *,
    freeze_attention: bool = False,
    prefix_len: int | None = None,
) -> PatchResult:
    """Scale ``features`` by ``factor`` and re-run the whole model (real MLPs downstream)."""
    return _patch(
        model, tokens, features, factor, prefix_len, constrained_layers=None, freeze_attention=freeze_attention
    )


class Fidelity(NamedTuple):
    cosine: float
    """Cosine similarity of the last layer's residual change, original vs replacement."""
    nmse: float
    """``|d_repl - d_orig|^2 / |d_orig|^2`` at the last layer."""
    layer_cosine: list[float]
    """Per layer from the first patched layer on."""
    layer_nmse: list[float]
    change_norm: float
    """``|d_orig|`` at the last layer (how large the patch's effect is)."""


def _freeze_names(model) -> list[str]:
    return [n for n in model.hook_dict if n.endswith("hook_pattern") or n.endswith("hook_scale")]


def _cos_nmse(a: Tensor, b: Tensor) -> tuple[float, float]:
    a, b = a.double().flatten(), b.double().flatten()
    na = a.norm()
    if na == 0:
        return float("nan"), float("nan")
    cos = torch.dot(a, b) / (na * b.norm()).clamp_min(1e-300)
    return float(cos), float((b - a).pow(2).sum() / na.pow(2))


@torch.no_grad()
def mechanistic_fidelity(
    model,
    tokens: Tensor,
    features: Sequence[Feature],
    factor: float,
    *,
    prefix_len: int | None = None,
    errors: str = "frozen",
) -> Fidelity:
    """Downstream agreement of the original and the local replacement model under one patch.

    ``errors="frozen"`` is the local replacement model (error terms fixed at their clean
    values); ``errors="live"`` recomputes them from the real MLP on the patched run, which
    makes the replacement exact (a check of the measurement: fidelity 1).
    """
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    if errors not in ("frozen", "live"):
        raise CausalError(f"errors {errors!r} is unknown; allowed: frozen, live")
    if isinstance(model.transcoders, CrossLayerTranscoder):
        raise CausalError("mechanistic fidelity is implemented for per-layer transcoder sets, not CLTs")
    _check(model, tokens, features, prefix_len)
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    n_layers = model.cfg.n_layers
    in_names = [f"blocks.{l}.{model.feature_input_hook}" for l in range(n_layers)]
    out_names = [f"blocks.{l}.{model.feature_output_hook}" for l in range(n_layers)]
    resid_names = [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]
    freeze = _freeze_names(model)
    tc = model.transcoders
    with _context(model, prefix_len):
        keep = set(in_names + out_names + resid_names + freeze)
        _, clean = model.run_with_cache(tokens, names_filter=lambda n: n in keep)
        deltas = torch.zeros(n_layers, *clean[resid_names[0]].shape, dtype=clean[resid_names[0]].dtype)
        for l, p, f in features:
            a = tc[l].encode(clean[in_names[l]][0, p])[f]
            vec = tc._get_decoder_vectors(l, torch.tensor([f]))[0]
            deltas[l, 0, p] += (factor - 1) * a * vec.to(deltas)

        def recon(l, x):
            return tc[l](x)

        errors_clean = [clean[out_names[l]] - recon(l, clean[in_names[l]]) for l in range(n_layers)]
        freeze_hooks = [(n, lambda act, hook: clean[hook.name]) for n in freeze]

        def run(replace: bool) -> list[Tensor]:
            inputs: dict[int, Tensor] = {}
            resid: dict[int, Tensor] = {}

            def rec_in(act, hook, l):
                inputs[l] = act

            def out(act, hook, l):
                if replace:
                    err = errors_clean[l] if errors == "frozen" else act - recon(l, inputs[l])
                    act = recon(l, inputs[l]) + err
                return act + deltas[l]

            def rec_resid(act, hook, l):
                resid[l] = act

            hooks = list(freeze_hooks)
            for l in range(n_layers):
                hooks += [
                    (in_names[l], lambda a, hook, l=l: rec_in(a, hook, l)),
                    (out_names[l], lambda a, hook, l=l: out(a, hook, l)),
                    (resid_names[l], lambda a, hook, l=l: rec_resid(a, hook, l)),
                ]
            model.run_with_hooks(tokens, fwd_hooks=hooks)
            return [resid[l] - clean[resid_names[l]] for l in range(n_layers)]

        d_orig = run(replace=False)
        d_repl = run(replace=True)
    first = min(l for l, _, _ in features)
    per = [_cos_nmse(d_orig[l], d_repl[l]) for l in range(first, n_layers)]
    cos, nmse = per[-1]
    return Fidelity(cos, nmse, [c for c, _ in per], [m for _, m in per], float(d_orig[-1].norm()))


@torch.no_grad()
def top_features(
    model,
    tokens: Tensor,
    n: int,
    *,
    prefix_len: int | None = None,
    max_layer: int | None = None,
    min_position: int = 1,
) -> list[Feature]:
    """The ``n`` strongest active features inside the prefix, at layers <= ``max_layer`` and
    positions >= ``min_position``.

    Position 0 (BOS) is always left out. The first token after it carries outsized
    activations in many models, so ``min_position=2`` picks features where the prompt's
    own computation happens.
    """
    if min_position < 1 or min_position >= tokens.shape[-1]:
        raise CausalError(
            f"min_position {min_position} leaves no position; allowed: 1..{tokens.shape[-1] - 1}"
        )
    with _context(model, prefix_len):
        _, acts = model.get_activations(tokens)
    acts = acts.clone()
    acts[:, :min_position] = 0
    if max_layer is not None:
        acts[max_layer + 1 :] = 0
    vals, flat = acts.flatten().topk(min(n, acts.numel()))
    out = []
    for v, i in zip(vals.tolist(), flat.tolist()):
        if v <= 0:
            break
        l, rest = divmod(i, acts.shape[1] * acts.shape[2])
        p, f = divmod(rest, acts.shape[2])
        out.append((l, p, f))
    return out


def prefix_causal_report(
    model,
    prompts: Sequence[str],
    prefix_lens: Sequence[int | None],
    *,
    factors: Sequence[float] = (0.0, 2.0),
    n_features: int = 4,
    min_position: int = 1,
    max_layer: int | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Per prefix length: fidelity and logit effects of patching the strongest features.

    Features come from the truncated model (so they lie inside the prefix) and from
    layers up to ``max_layer`` (default: the one before the last, so there is something
    downstream; a lower one keeps features with several layers downstream, where
    fidelity is a harder test).
    """
    if max_layer is None:
        max_layer = model.cfg.n_layers - 2
    if not 0 <= max_layer <= model.cfg.n_layers - 2:
        raise CausalError(f"max_layer {max_layer} is out of range; allowed: 0..{model.cfg.n_layers - 2}")
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(prefix_lens) * len(prompts), desc="causal checks (prefix x prompt)", disable=not show_progress)
    for p in prefix_lens:
        for prompt in prompts:
            tokens = tokenize(model, prompt)
            feats = top_features(
                model, tokens, n_features, prefix_len=p, max_layer=max_layer, min_position=min_position,
            )
            for feat in feats:
                for factor in factors:
                    fid = mechanistic_fidelity(model, tokens, [feat], factor, prefix_len=p)
                    cons = constrained_patch(model, tokens, [feat], factor, prefix_len=p)
                    it = iterative_patch(model, tokens, [feat], factor, prefix_len=p)
                    rows.append(
                        dict(
                            prefix_len=p,
                            prompt=prompt,
                            layer=feat[0],
                            position=feat[1],
                            feature=feat[2],
                            factor=factor,
                            cosine=fid.cosine,
                            nmse=fid.nmse,
                            layer_cosine=fid.layer_cosine,
                            layer_nmse=fid.layer_nmse,
                            change_norm=fid.change_norm,
                            constrained_logit_change=float(cons.last_logit_change().norm()),
                            iterative_logit_change=float(it.last_logit_change().norm()),
                        )
                    )
            bar.update()
    bar.close()
    return rows


def summarise_fidelity(
    rows: Sequence[dict], prefix_lens: Sequence[int], factors: Sequence[float] = (0.0, 2.0)
) -> tuple[list[str], dict[tuple[int, float], tuple[float, float]]]:
    """A markdown table, and ``{(P, factor): (median cosine, median NMSE)}``, of report rows.

    Rows whose cosine is NaN (a patch that changed nothing downstream) are left out.
    """
    lines = [
        "| P | factor | patches | fidelity cosine (median) | cosine (min) | NMSE (median) "
        "| constrained |dlogit| (median) | iterative |dlogit| (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for p in prefix_lens:
        for f in factors:
            sel = [r for r in rows if r["prefix_len"] == p and r["factor"] == f and r["cosine"] == r["cosine"]]
            if not sel:
                continue
            cos, nmse = [r["cosine"] for r in sel], [r["nmse"] for r in sel]
            summary[(p, f)] = (statistics.median(cos), statistics.median(nmse))
            constrained = statistics.median(r["constrained_logit_change"] for r in sel)
            iterative = statistics.median(r["iterative_logit_change"] for r in sel)
            lines.append(
                f"| {p} | {f:g} | {len(sel)} | {summary[(p, f)][0]:.3f} | {min(cos):.3f} "
                f"| {summary[(p, f)][1]:.3f} | {constrained:.3f} | {iterative:.3f} |"
            )
    return lines, summary


def plot_fidelity(summary: dict, prefix_lens: Sequence[int], title: str, path) -> None:
    """Median fidelity cosine and NMSE against prefix length, one line per patch factor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    factors = sorted({f for _, f in summary})
    for f, style in zip(factors, ("o-", "s--", "^:", "d-.")):
        ps = [p for p in prefix_lens if (p, f) in summary]
        for i, ax in enumerate(axes):
            ax.semilogx(ps, [summary[(p, f)][i] for p in ps], style, base=2, label=f"factor {f:g}")
    axes[0].set(xlabel="prefix length P", ylabel="median cosine", title="mechanistic fidelity: cosine")
    axes[1].set(xlabel="prefix length P", ylabel="median normalised MSE", title="mechanistic fidelity: NMSE")
    for ax in axes:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
