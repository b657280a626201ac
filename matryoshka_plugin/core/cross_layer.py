"""The nested (Matryoshka) cross-layer transcoder loss, in plain torch.

A cross-layer transcoder (CLT) over ``L`` layers has one encoder per source layer and,
for source ``s``, one decoder ``W_dec[s]`` of shape ``[M, L - s, d]``: slot ``t``
writes into target layer ``s + t`` (circuit-tracer's layout). Target ``j`` is
reconstructed from every source ``s <= j``.

Prefix ``P`` keeps latents ``< P`` at every source layer. Flattening ``W_dec[s]`` to
``[M, (L - s) * d]`` makes each latent's row hold all its target decodes, so one
``level_decodes`` call per source layer (one ``embedding_bag``) gives every prefix
level at every target of that source: the work of one plain decode, whatever the
number of levels or targets.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .nested import cumulative_reconstructions, level_decodes, nested_fvu, prefix_decodes


def source_level_decodes(
    top_acts: Tensor, top_indices: Tensor, W_dec: Tensor, nested_sizes: Sequence[int]
) -> Tensor:
    """Each level's own decode into every target of one source, ``[N, levels, T, d]``.

    ``W_dec`` is the source's ``[M, T, d]`` decoder; no bias is added.
    """
    M, T, d = W_dec.shape
    flat = level_decodes(top_acts, top_indices, W_dec.reshape(M, T * d), nested_sizes)
    return flat.view(flat.shape[0], len(nested_sizes), T, d)


def source_prefix_decodes(
    top_acts: Tensor,
    top_indices: Tensor,
    W_decs: Sequence[Tensor],
    nested_sizes: Sequence[int],
) -> Tensor:
    """Each prefix decoded by its own ``[>= size, T, d]`` decoder, ``[N, levels, T, d]``."""
    T, d = W_decs[0].shape[1:]
    flat = prefix_decodes(
        top_acts, top_indices, [W.reshape(W.shape[0], T * d) for W in W_decs], nested_sizes
    )
    return flat.view(flat.shape[0], len(nested_sizes), T, d)


def gather_targets(per_source: Sequence[Tensor], n_layers: int) -> Tensor:
    """Sum source decodes into targets: ``[N, levels, L - s, d]`` each -> ``[N, levels, L, d]``.

    Source ``s`` covers targets ``s..L-1``: it is added into target slots ``s:``.
    """
    first = per_source[0]
    total = first.new_zeros(first.shape[0], first.shape[1], n_layers, first.shape[3])
    for s, dec in enumerate(per_source):
        if dec.shape[2] != n_layers - s:
            raise ValueError(
                f"source {s} decodes into {dec.shape[2]} targets; expected {n_layers - s}"
            )
        # In place on a slice: one buffer instead of a padded copy per source.
        total[:, :, s:] += dec
    return total


def cross_layer_recons(
    per_source_levels: Sequence[Tensor],
    b_dec: Tensor,
    *,
    stop_gradient: bool,
    cumulative: bool = True,
) -> Tensor:
    """Prefix reconstructions of every target, ``[N, levels, L, d]``.

    ``per_source_levels`` are per-level decodes (``cumulative=True``: level ``l`` holds
    only its own latents, summed into prefixes here, optionally with stop-gradient) or
    already whole prefixes (``cumulative=False``, prefix-specific decoders). ``b_dec``
    is ``[L, d]`` or, per level, ``[levels, L, d]``.
    """
    n_layers = b_dec.shape[-2]
    summed = gather_targets(per_source_levels, n_layers)
    if cumulative:
        n, levels = summed.shape[:2]
        summed = cumulative_reconstructions(
            summed.reshape(n, levels, -1), stop_gradient=stop_gradient
        ).view_as(summed)
    return summed + b_dec


def target_variance(y: Tensor) -> Tensor:
    """Each target's total variance over the batch, ``[L]``, from ``y`` of ``[N, L, d]``."""
    return (y - y.mean(0)).pow(2).sum(dim=(0, 2))


def cross_layer_nested_fvu(
    recons: Tensor,
    y: Tensor,
    weights: Sequence[float],
    total_variance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss summed over targets of the weighted nested FVU, and FVU ``[L, levels]``.

    FVU is normalised per target layer by that target's variance, as sparsify does
    per hookpoint; the targets' losses are then summed.
    """
    if total_variance is None:
        total_variance = target_variance(y)
    losses, level_fvus = [], []
    for j in range(y.shape[1]):
        loss_j, fvu_j = nested_fvu(recons[:, :, j], y[:, j], total_variance[j], weights)
        losses.append(loss_j)
        level_fvus.append(fvu_j)
    return torch.stack(losses).sum(), torch.stack(level_fvus)
