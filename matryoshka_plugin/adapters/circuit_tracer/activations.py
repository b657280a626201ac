"""Activation modules for exported sparsify transcoders.

- ``TopKReLU``: sparsify's exact activation (ReLU, then the k largest per token).
  circuit-tracer ships a ``TopK`` module but applies it to raw pre-activations and has
  no loader that builds it; this subclass adds the ReLU and the plugin's loader
  (``loading.load_transcoders_dir``) constructs it.
- ``calibrate_jumprelu_thresholds``: per-latent JumpReLU thresholds that stock
  circuit-tracer loads with no plugin. It is an approximation of TopK.
- ``jumprelu_agreement``: how far that approximation is from TopK on given rows (shared
  active sets, Jaccard, L0 spread, FVU), which ``matryoshka-export`` prints and stores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from circuit_tracer.transcoder.activation_functions import TopK
from torch import Tensor


class TopKReLU(TopK):
    """ReLU then keep the ``k`` largest activations per token (sparsify's ``topk``)."""

    def forward(self, x: Tensor) -> Tensor:
        # ReLU is monotone, so TopK of the ReLU'd values keeps sparsify's latents; it
        # also makes tokens with fewer than k positive pre-activations keep zeros, not
        # negative values, which upstream ``TopK`` on raw pre-activations would keep.
        return super().forward(F.relu(x))

    def extra_repr(self) -> str:
        return f"k={self.k}"


@torch.no_grad()
def calibrate_jumprelu_thresholds(coder, x: Tensor, chunk: int = 4096) -> Tensor:
    """Per-latent thresholds under which each latent fires as often as under TopK on ``x``.

    For latent j firing on c_j of the n calibration tokens under TopK, the threshold lies
    midway between its c_j-th and (c_j + 1)-th largest pre-activations, so
    ``pre > threshold`` selects exactly c_j tokens of ``x`` (barring ties). Midway, not
    at the (c_j + 1)-th value itself: pre-activations recomputed in another batch shape
    differ in the last bits, which would switch that token on. Never-firing latents get
    just above their largest pre-activation (they stay off on ``x``); thresholds are at
    least 0, so JumpReLU never passes negatives.
    """
    x = x.to(coder.dtype)
    n = x.shape[0]
    if n == 0:
        raise ValueError("calibration needs at least one activation row")
    pre = torch.cat(
        [F.relu(F.linear(c, coder.encoder.weight, coder.encoder.bias)) for c in x.split(chunk)]
    )
    counts = torch.zeros(pre.shape[1], dtype=torch.long)
    for c in x.split(chunk):
        top_acts, top_idx, _ = coder.encode(c)
        fired = top_idx[top_acts > 0]
        counts += torch.bincount(fired.flatten().cpu(), minlength=pre.shape[1])
    ranked = pre.sort(dim=0, descending=True).values
    counts = counts.to(ranked.device)
    below = ranked.gather(0, counts.clamp(max=n - 1)[None]).squeeze(0)
    above = ranked.gather(0, (counts - 1).clamp(min=0, max=n - 1)[None]).squeeze(0)
    # A latent TopK never picked has no value above its largest; a relative 1e-4 margin
    # (float32 recomputation moves values by ~1e-7) keeps it off on every row of x.
    thresholds = torch.where(counts > 0, (above + below) / 2, below * (1 + 1e-4))
    thresholds = torch.where(counts >= n, torch.zeros_like(thresholds), thresholds)
    return thresholds.clamp_min(0)


def _dense_topk(coder, x: Tensor) -> Tensor:
    """sparsify's TopK activations of ``x`` as a dense ``[n, width]`` matrix."""
    top_acts, top_idx, _ = coder.encode(x)
    return torch.zeros(x.shape[0], coder.num_latents, dtype=top_acts.dtype, device=top_acts.device).scatter_(
        1, top_idx, top_acts
    )


def _transcoder_out(coder, acts: Tensor, x: Tensor) -> Tensor:
    """The transcoder output of dense latent activations, skip connection included."""
    out = acts @ coder.W_dec + coder.b_dec
    return out + x @ coder.W_skip.mT if coder.W_skip is not None else out


@torch.no_grad()
def jumprelu_agreement(coder, x: Tensor, thresholds: Tensor, y: Tensor | None = None, chunk: int = 4096) -> dict:
    """How far the JumpReLU code with ``thresholds`` is from the coder's TopK code on ``x``.

    Returns ``tokens``, ``k``, ``same_active_set`` (fraction of tokens whose set of firing
    latents equals TopK's), ``mean_jaccard`` (two empty sets count as 1), the JumpReLU L0
    per token (``l0_mean``, ``l0_std`` over tokens, ``l0_min``, ``l0_max``) next to TopK's
    ``topk_l0_mean``, and ``fvu_jumprelu_vs_topk`` (the JumpReLU output's squared error
    against the TopK output over the TopK output's variance). With the true outputs
    ``y`` it adds ``fvu_topk`` and ``fvu_jumprelu``, each against ``y``. An FVU is None
    where the reference does not vary.
    """
    x = x.to(coder.dtype)
    if x.shape[0] == 0:
        raise ValueError("the agreement needs at least one activation row")
    thresholds = thresholds.to(x.device, coder.dtype)
    same = jaccard = 0.0
    l0s, topk_l0s = [], []
    # Sums in float64 so that the variances of long calibration sets do not cancel.
    sums = {"sq_diff": 0.0, "sq_topk": 0.0, "sq_jump": 0.0}
    moments = {"ref": [0.0, 0.0], "y": [0.0, 0.0]}  # [sum, sum of squares]

    def add_moments(name: str, t: Tensor) -> None:
        t = t.double()
        moments[name][0] = moments[name][0] + t.sum(0)
        moments[name][1] += float(t.square().sum())

    for i in range(0, x.shape[0], chunk):
        xc = x[i : i + chunk]
        topk = _dense_topk(coder, xc)
        pre = F.relu(F.linear(xc, coder.encoder.weight, coder.encoder.bias))
        jump = pre * (pre > thresholds)
        on_t, on_j = topk > 0, jump > 0
        inter, union = (on_t & on_j).sum(1), (on_t | on_j).sum(1)
        same += float((on_t == on_j).all(1).sum())
        jaccard += float(torch.where(union > 0, inter / union.clamp_min(1), 1.0).sum())
        l0s.append(on_j.sum(1))
        topk_l0s.append(on_t.sum(1))
        out_t, out_j = _transcoder_out(coder, topk, xc), _transcoder_out(coder, jump, xc)
        sums["sq_diff"] += float((out_j - out_t).double().square().sum())
        add_moments("ref", out_t)
        if y is not None:
            yc = y[i : i + chunk].to(out_t)
            sums["sq_topk"] += float((out_t - yc).double().square().sum())
            sums["sq_jump"] += float((out_j - yc).double().square().sum())
            add_moments("y", yc)

    n = x.shape[0]

    def total_variance(name: str) -> float:
        s, sq = moments[name]
        return sq - float(s.square().sum()) / n

    def ratio(num: float, den: float) -> float | None:
        return num / den if den > 0 else None  # undefined for constant outputs

    l0 = torch.cat(l0s).double()
    stats = {
        "tokens": n,
        "k": int(coder.cfg.k),
        "same_active_set": same / n,
        "mean_jaccard": jaccard / n,
        "l0_mean": float(l0.mean()),
        "l0_std": float(l0.std(correction=0)),
        "l0_min": int(l0.min()),
        "l0_max": int(l0.max()),
        "topk_l0_mean": float(torch.cat(topk_l0s).double().mean()),
        "fvu_jumprelu_vs_topk": ratio(sums["sq_diff"], total_variance("ref")),
    }
    if y is not None:
        stats["fvu_topk"] = ratio(sums["sq_topk"], total_variance("y"))
        stats["fvu_jumprelu"] = ratio(sums["sq_jump"], total_variance("y"))
    return stats
