"""Turning a vanilla coder into a progressive one by sorting its latents (seed 003, section 4).

Latents are conditionally independent, so a permuted coder gives the same outputs; only
which latents a prefix keeps changes.
"""

import copy

import torch
from torch import Tensor

from ..core.errors import UsageError
from ..core.permutation import permute_latents as reorder_in_place
from .latent_stats import latent_activation_sums
from .prefix_metrics import DEFAULT_CHUNK


@torch.no_grad()
def permute_latents(coder, perm: Tensor):
    """A copy of ``coder`` whose latent ``i`` is the original's latent ``perm[i]``.

    Encoder rows, encoder bias and decoder rows move together, so every output is
    unchanged.
    """
    width = coder.num_latents
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (width,) or not torch.equal(perm.sort().values, torch.arange(width)):
        raise UsageError(f"perm must be a permutation of 0..{width - 1}")
    if len(getattr(coder, "W_dec_levels", ())):
        raise UsageError(
            "cannot permute a coder with nested_decoders: its per-level decoders "
            "are tied to the latent order it was trained with"
        )
    new = copy.deepcopy(coder)
    rows = [(new.encoder.weight, 0), (new.encoder.bias, 0)]
    if new.W_dec is not None:
        rows.append((new.W_dec, 0))
    reorder_in_place(rows, perm)
    return new


@torch.no_grad()
def reorder_by_mean_squared_activation(
    coder, x: Tensor, *, chunk_size: int = DEFAULT_CHUNK
) -> tuple[object, Tensor]:
    """The coder with latents sorted by descending mean squared activation on ``x``.

    Returns the reordered copy and the permutation (new index -> old index). Ties keep
    the original order, so the result is deterministic.
    """
    _, sumsq, _ = latent_activation_sums(coder, x, chunk_size=chunk_size)
    perm = torch.sort(-sumsq, stable=True).indices
    return permute_latents(coder, perm), perm
