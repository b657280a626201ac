"""Meta-SAE composition (seed 000, section 4.4.2; Bussmann et al.): how far a dictionary's
latents are sparse combinations of a few shared, more basic directions.

A small TopK sparse coder (the *meta-SAE*, ``meta_width`` latents, ``meta_k`` active) is
trained on the dictionary's unit-normalised decoder rows. If the rows reconstruct well
from ``meta_k`` meta-latents each, the dictionary's latents are compositions of shared
parts (e.g. "red circle" = "red" + "circle"); **a higher meta-SAE FVU means more
disentangled (more atomic) latents**. Bussmann et al. find Matryoshka dictionaries
reconstruct worse than BatchTopK ones, i.e. compose less.

One meta-SAE is trained on all rows of the dictionary; its reconstruction is reported
overall and per level, a level being the group of rows between two consecutive nested
sizes (``[0, s1), [s1, s2), ...``; not the prefixes), so an early group's number is not
diluted by the rows after it.

FVU here is the unexplained share of the rows' squared norm, ``sum |r - r̂|² / n`` (every
row has norm 1): it adds up over levels and is bounded below by ``1 - meta_width / n`` for
orthonormal rows. Pure torch: a small full-batch Adam loop, deterministic under ``seed``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.errors import UsageError
from .latent_stats import _level_bounds

META_K = 4
"""Active meta-latents per decoder row (Bussmann et al.'s meta-SAEs use 4)."""

META_WIDTH_DIVISOR = 8
"""Default meta-SAE width: the dictionary width divided by this (at least ``META_K``)."""

META_STEPS = 1500
"""Default full-batch Adam steps of the meta-SAE."""

META_LR = 1e-2
"""Default Adam learning rate of the meta-SAE."""


def unit_rows(W: Tensor) -> Tensor:
    """``W``'s rows scaled to unit norm (a zero row stays zero), as float32."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def default_meta_width(width: int) -> int:
    """``width / META_WIDTH_DIVISOR``, and at least ``META_K`` so TopK can pick k latents."""
    return max(META_K, width // META_WIDTH_DIVISOR)


class MetaSAE(torch.nn.Module):
    """TopK sparse coder without a decoder bias: a row is explained by meta-latents only."""

    def __init__(self, d: int, width: int, k: int, rows: Tensor, generator: torch.Generator):
        super().__init__()
        self.k = k
        # Decoder started on randomly chosen data rows (encoder tied to it): on a few
        # hundred rows a random start leaves many meta-latents dead.
        pick = torch.randperm(rows.shape[0], generator=generator)[:width]
        init = rows[pick] if len(pick) == width else torch.randn(width, d, generator=generator)
        init = unit_rows(init + 0.01 * torch.randn(width, d, generator=generator))
        self.W_dec = torch.nn.Parameter(init.clone())
        self.W_enc = torch.nn.Parameter(init.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(x @ self.W_enc + self.b_enc)
        acts, idx = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, acts) @ self.W_dec


def _check(name: str, value, low: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise UsageError(f"{name}={value!r} is not allowed; expected a number >= {low}")


def train_meta_sae(
    rows: Tensor,
    width: int,
    k: int = META_K,
    *,
    steps: int = META_STEPS,
    lr: float = META_LR,
    seed: int = 0,
) -> MetaSAE:
    """A meta-SAE fitted to ``rows`` (unit vectors ``[n, d]``), full batch, Adam."""
    for name, value, low in (("meta_width", width, 1), ("meta_k", k, 1), ("meta_steps", steps, 1)):
        if not isinstance(value, int):
            raise UsageError(f"{name}={value!r} is not allowed; expected an integer >= {low}")
        _check(name, value, low)
    _check("meta_lr", lr, 1e-12)
    if k > width:
        raise UsageError(f"meta_k={k} exceeds meta_width={width}; allowed: 1..{width}")
    g = torch.Generator().manual_seed(seed)
    sae = MetaSAE(rows.shape[1], width, k, rows, g)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        loss = (sae(rows) - rows).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # unit decoder rows, so activations carry the scale
            sae.W_dec.copy_(unit_rows(sae.W_dec))
    return sae.eval()


def _scores(rows: Tensor, recon: Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(rows, recon, dim=1, eps=1e-12)
    return {
        "n_rows": rows.shape[0],
        "fvu": float((rows - recon).pow(2).sum() / rows.shape[0]),
        "mean_cosine": float(cos.mean()),
    }


def meta_sae_composition(
    decoder: Tensor,
    levels: Sequence[int],
    *,
    meta_width: int | None = None,
    meta_k: int = META_K,
    steps: int = META_STEPS,
    lr: float = META_LR,
    seed: int = 0,
) -> dict:
    """Meta-SAE FVU and mean cosine of ``decoder``'s rows, overall and per level.

    ``levels`` are the ends of the groups (increasing, the last the number of rows).
    """
    rows = unit_rows(decoder).cpu()  # small enough for CPU, and the generator is a CPU one
    n = rows.shape[0]
    if list(levels) != sorted(set(levels)) or not levels or levels[0] < 1 or levels[-1] != n:
        raise UsageError(f"levels {list(levels)} must increase from 1 and end at the width {n}")
    width = default_meta_width(n) if meta_width is None else meta_width
    sae = train_meta_sae(rows, width, meta_k, steps=steps, lr=lr, seed=seed)
    with torch.no_grad():
        recon = sae(rows)
        acts, idx = torch.relu(rows @ sae.W_enc + sae.b_enc).topk(meta_k, dim=1)
    live = int(idx[acts > 0].unique().numel())
    per_level, start = [], 0
    for end in levels:
        per_level.append({"start": start, "end": end, **_scores(rows[start:end], recon[start:end])})
        start = end
    return {
        "settings": {"meta_width": width, "meta_k": meta_k, "steps": steps, "lr": lr, "seed": seed,
                     "levels": "groups of rows between consecutive nested sizes"},
        **_scores(rows, recon),
        "live_meta_latents": live,
        "fvu_meaning": "unexplained share of the unit rows' squared norm; higher = more disentangled latents",
        "levels": per_level,
    }


def coder_meta_sae(coder, levels: Sequence[int] | None = None, **options) -> dict:
    """``meta_sae_composition`` of a sparsify / Matryoshka coder's decoder.

    ``levels`` default to the coder's nested sizes (powers of two for a plain coder);
    pass a Matryoshka coder's sizes to compare a TopK coder group for group.
    """
    if coder.W_dec is None:
        raise UsageError("the coder has no decoder (W_dec); a meta-SAE needs its rows")
    return meta_sae_composition(coder.W_dec, _level_bounds(coder, levels), **options)
