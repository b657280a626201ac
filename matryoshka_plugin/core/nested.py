"""The nested (Matryoshka) reconstructions and loss, from one sparse decode.

A token's k active latents are sorted by index, so the latents of each prefix level
form one contiguous run. One ``embedding_bag`` call then decodes every
(token, level) run as its own bag, and a cumulative sum over levels gives every
prefix's reconstruction. The work is that of a single plain decode, whatever the
number of levels.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _sorted_level_ends(
    top_acts: Tensor, top_indices: Tensor, sizes: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's latents sorted by index, and how many lie below each prefix length."""
    sorted_idx, perm = top_indices.sort(dim=-1)
    sorted_acts = top_acts.gather(-1, perm)
    n_tokens = sorted_idx.shape[0]
    ends = torch.searchsorted(sorted_idx, sizes.expand(n_tokens, -1).contiguous())
    return sorted_acts, sorted_idx, ends


def level_decodes(
    top_acts: Tensor, top_indices: Tensor, W_dec: Tensor, nested_sizes: Sequence[int]
) -> Tensor:
    """The decode of each level's own latents, ``[tokens, levels, d]``, without bias.

    Level ``l`` holds the latents with ``nested_sizes[l-1] <= index < nested_sizes[l]``
    (level 0 starts at 0, so a size of 0 gives an empty, bias-only level).
    """
    sizes = torch.as_tensor(nested_sizes, device=top_indices.device)
    sorted_acts, sorted_idx, ends = _sorted_level_ends(top_acts, top_indices, sizes)
    n_tokens, k = sorted_idx.shape
    starts = torch.cat([ends.new_zeros(n_tokens, 1), ends[:, :-1]], dim=1)
    token_base = torch.arange(n_tokens, device=ends.device)[:, None] * k
    bags = F.embedding_bag(
        sorted_idx.flatten(),
        W_dec,
        (starts + token_base).flatten(),
        mode="sum",
        per_sample_weights=sorted_acts.flatten().to(W_dec.dtype),
    )
    return bags.view(n_tokens, len(sizes), -1)


def prefix_decodes(
    top_acts: Tensor,
    top_indices: Tensor,
    W_decs: Sequence[Tensor],
    nested_sizes: Sequence[int],
) -> Tensor:
    """Each prefix decoded by its own decoder, ``[tokens, levels, d]``, without bias.

    ``W_decs[l]`` has at least ``nested_sizes[l]`` rows; level ``l`` decodes the
    latents below ``nested_sizes[l]`` with it. All levels go through one
    ``embedding_bag`` over the concatenated decoders.
    """
    sizes = torch.as_tensor(nested_sizes, device=top_indices.device)
    sorted_acts, sorted_idx, ends = _sorted_level_ends(top_acts, top_indices, sizes)
    n_tokens, k = sorted_idx.shape
    rows = torch.tensor([0] + [w.shape[0] for w in W_decs[:-1]], device=sizes.device)
    row_offset = rows.cumsum(0)
    keep = torch.arange(k, device=ends.device)[None, None, :] < ends[:, :, None]
    inputs = (sorted_idx[:, None, :] + row_offset[None, :, None])[keep]
    weights = sorted_acts[:, None, :].expand(-1, len(W_decs), -1)[keep]
    counts = ends.flatten()
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    W = torch.cat(list(W_decs), dim=0)
    bags = F.embedding_bag(
        inputs, W, offsets, mode="sum", per_sample_weights=weights.to(W.dtype)
    )
    return bags.view(n_tokens, len(W_decs), -1)


def cumulative_reconstructions(level_out: Tensor, *, stop_gradient: bool) -> Tensor:
    """Prefix reconstructions from per-level decodes: level ``l`` sums levels ``<= l``.

    With ``stop_gradient`` each level's loss sees the levels before it detached, so its
    gradient reaches only its own latents (the "delta" loss).
    """
    # A lower-triangular [L, L] matmul, not cumsum: on CPU cumsum along the level axis
    # (and its flip-cumsum-flip backward) cost as much as the whole sparse decode.
    n_levels = level_out.shape[1]
    ones = torch.ones(n_levels, n_levels, dtype=level_out.dtype, device=level_out.device)
    if not stop_gradient:
        return torch.matmul(ones.tril(), level_out)
    return level_out + torch.matmul(ones.tril(-1), level_out).detach()


def nested_fvu(
    recons: Tensor, y: Tensor, total_variance: Tensor, weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Weighted nested loss and the per-level FVU, given ``[tokens, levels, d]`` recons."""
    level_fvu = (y[:, None, :] - recons).pow(2).sum(dim=(0, 2)) / total_variance
    w = torch.as_tensor(weights, dtype=level_fvu.dtype, device=level_fvu.device)
    return (w * level_fvu).sum(), level_fvu
