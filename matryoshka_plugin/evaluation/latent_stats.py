"""Latent statistics: firing counts, L0, dead and dense latents, frequency per level.

A level is the group of latents between two consecutive nested sizes; comparing levels
shows whether a Matryoshka coder really puts its most used latents first.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .prefix_metrics import DEFAULT_CHUNK, default_prefix_lens, row_chunks


@torch.no_grad()
def latent_activation_sums(
    coder, x: Tensor, *, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-latent firing counts and summed squared activations, and active latents per row."""
    width = coder.num_latents
    counts = torch.zeros(width, dtype=torch.float64)
    sumsq = torch.zeros(width, dtype=torch.float64)
    per_row = []
    for sl in row_chunks(x.shape[0], chunk_size):
        top_acts, top_indices, _ = coder.encode(x[sl])
        # BatchTopK pads rows with repeated indices at activation 0: count only firing.
        fired = top_acts > 0
        counts += torch.bincount(top_indices[fired], minlength=width).double()
        sumsq += torch.bincount(
            top_indices.flatten(), weights=top_acts.double().pow(2).flatten(), minlength=width
        )
        per_row.append(fired.sum(dim=1))
    return counts, sumsq, torch.cat(per_row)


def _level_bounds(coder, levels: Sequence[int] | None) -> list[int]:
    """The end of each level; the last level always ends at the full width."""
    sizes = list(levels) if levels is not None else default_prefix_lens(coder)
    if not sizes or sizes[-1] != coder.num_latents:
        sizes = [s for s in sizes if s < coder.num_latents] + [coder.num_latents]
    return sizes


@torch.no_grad()
def latent_stats(
    coder,
    x: Tensor,
    levels: Sequence[int] | None = None,
    *,
    dense_threshold: float = 0.1,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict:
    """L0, dead and dense latents overall and per level (group between nested sizes).

    A latent is dead if it never fires on ``x`` and dense if it fires on more than
    ``dense_threshold`` of the rows.
    """
    counts, _, per_row = latent_activation_sums(coder, x, chunk_size=chunk_size)
    freq = counts / x.shape[0]
    bounds = _level_bounds(coder, levels)
    per_level, start = [], 0
    for end in bounds:
        f = freq[start:end]
        per_level.append({
            "start": start,
            "end": end,
            "mean_frequency": float(f.mean()),
            "l0_share": float(counts[start:end].sum() / max(counts.sum(), 1)),
            "dead": int((f == 0).sum()),
            "dense": int((f > dense_threshold).sum()),
        })
        start = end
    return {
        "l0": float(per_row.double().mean()),
        "dead": int((freq == 0).sum()),
        "dense": int((freq > dense_threshold).sum()),
        "dense_threshold": dense_threshold,
        "levels": per_level,
        "frequency": freq.tolist(),
    }
