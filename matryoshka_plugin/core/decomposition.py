"""Coarse-to-fine decomposition of Matryoshka latents (plain torch, no upstream imports).

A latent ``i`` first exists at the smallest prefix length ``P > i`` (its level). Viewed
at prefix ``P``, the latents that *refine* it are those beyond ``P`` (``j >= P``) whose
decoder direction is close to ``i``'s and that fire on the same tokens. The reverse link,
a fine latent's coarse *parent*, is the best such latent below the fine latent's level.

Two measures, both stored so the viewer can show them side by side:

- ``cosine``: cosine similarity of the decoder rows ``W_dec[i]`` and ``W_dec[j]``;
- ``coactivation``: the overlap coefficient ``|A_i ∩ A_j| / min(|A_i|, |A_j|)`` of the
  token sets on which each latent is active. A child that fires only where its parent
  fires scores 1 however rarely it fires, which is the hierarchy Matryoshka training
  produces; a plain conditional rate would punish rare children.

Links are ranked by ``|cosine| * coactivation`` (by ``|cosine|`` alone when no corpus
activations are given); ties go to the larger ``|cosine|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Link:
    """One refinement (or parent) link from a latent to another latent of the same layer."""

    feature: int
    """The linked latent's index."""
    cosine: float
    """Cosine similarity of the two decoder rows."""
    coactivation: float | None
    """Overlap coefficient of the two latents' active-token sets (None without a corpus)."""
    score: float
    """Ranking score: |cosine| * coactivation (|cosine| without a corpus)."""
    appears_at: int
    """Smallest prefix length of the levels that contains the linked latent."""

    def to_json(self) -> dict:
        return {
            "feature": self.feature,
            "cosine": round(self.cosine, 5),
            "coactivation": None if self.coactivation is None else round(self.coactivation, 5),
            "score": round(self.score, 5),
            "appears_at": self.appears_at,
        }


def check_levels(levels: Sequence[int], width: int) -> list[int]:
    """Sorted distinct prefix lengths in ``1..width``, with ``width`` added as the last."""
    out = sorted(set(int(p) for p in levels) | {int(width)})
    if out[0] < 1 or out[-1] > width:
        raise ValueError(f"prefix lengths {sorted(levels)} must lie in 1..{width}")
    return out


def appears_at(feature: int, levels: Sequence[int]) -> int:
    """The smallest prefix length in ``levels`` (sorted) that contains latent ``feature``."""
    for p in levels:
        if feature < p:
            return p
    raise ValueError(f"latent {feature} lies beyond the largest prefix length {levels[-1]}")


def coactivation_counts(active: Iterable[Tensor], features: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``(both [F, width], count [width])`` from batches of boolean activity ``[T, width]``.

    ``both[a, j]`` counts tokens on which ``features[a]`` and ``j`` are both active;
    ``count[j]`` counts tokens on which ``j`` is active.
    """
    both = torch.zeros(len(features), width, dtype=torch.float64)
    count = torch.zeros(width, dtype=torch.float64)
    for batch in active:
        if batch.shape[-1] != width:
            raise ValueError(f"activity batch has {batch.shape[-1]} latents; expected {width}")
        a = batch.to(torch.float32)
        both += (a[:, features].T @ a).double()
        count += a.sum(0).double()
    return both, count


def _links(
    cos_row: Tensor,
    overlap_row: Tensor | None,
    candidates: Tensor,
    levels: Sequence[int],
    top_k: int,
) -> list[Link]:
    if candidates.numel() == 0:
        return []
    c = cos_row[candidates]
    if overlap_row is None:
        o = None
        score = c.abs()
    else:
        o = overlap_row[candidates]
        score = c.abs() * o
    # Lexicographic order (score, |cos|): stable sort by the tie-breaker first.
    order = torch.sort(c.abs(), descending=True, stable=True).indices
    order = order[torch.sort(score[order], descending=True, stable=True).indices][:top_k]
    return [
        Link(
            feature=int(candidates[k]),
            cosine=float(c[k]),
            coactivation=None if o is None else float(o[k]),
            score=float(score[k]),
            appears_at=appears_at(int(candidates[k]), levels),
        )
        for k in order.tolist()
    ]


def decompose(
    W_dec: Tensor,
    features: Sequence[int],
    levels: Sequence[int],
    *,
    both: Tensor | None = None,
    count: Tensor | None = None,
    top_k: int = 8,
) -> dict[int, dict]:
    """Children per prefix and parents for each latent in ``features`` of one layer.

    Args:
        W_dec: decoder rows ``[width, d]`` (one per latent).
        features: latents to decompose.
        levels: prefix lengths at which graphs exist (``width`` is added).
        both, count: co-activation counts from :func:`coactivation_counts` for exactly
            ``features``; without them links are ranked by cosine alone.
        top_k: links kept per list.

    Returns ``{feature: {"appears_at": P0, "children": {P: [link, ...]}, "parents": [...]}}``
    where ``children[P]`` (for each level ``P`` with ``feature < P < width``) lists latents
    ``j >= P`` and ``parents`` lists latents below the previous level, i.e. below the
    largest prefix length that does not contain ``feature``.
    """
    width = W_dec.shape[0]
    lv = check_levels(levels, width)
    feats = torch.as_tensor(list(features), dtype=torch.long)
    if feats.numel() and (feats.min() < 0 or feats.max() >= width):
        raise ValueError(f"latent indices must lie in 0..{width - 1}")
    if (both is None) != (count is None):
        raise ValueError("give both co-activation tensors (both, count) or neither")
    unit = F.normalize(W_dec.double(), dim=-1)
    cos = unit[feats] @ unit.T  # [F, width]
    overlap = None
    if both is not None:
        denom = torch.minimum(count[feats][:, None], count[None, :]).clamp_min(1)
        overlap = both.double() / denom
    out: dict[int, dict] = {}
    for a, i in enumerate(feats.tolist()):
        orow = None if overlap is None else overlap[a]
        start = appears_at(i, lv)
        children = {
            p: _links(cos[a], orow, torch.arange(p, width), lv, top_k)
            for p in lv
            if i < p < width
        }
        below = max([p for p in lv if p <= i], default=0)
        parents = _links(cos[a], orow, torch.arange(0, below), lv, top_k)
        out[i] = {"appears_at": start, "children": children, "parents": parents}
    return out


def decomposition_json(result: dict[int, dict]) -> dict[str, dict]:
    """The JSON form of :func:`decompose`'s result (string keys, links as dicts)."""
    return {
        str(i): {
            "appears_at": d["appears_at"],
            "children": {str(p): [l.to_json() for l in links] for p, links in d["children"].items()},
            "parents": [l.to_json() for l in d["parents"]],
        }
        for i, d in result.items()
    }
