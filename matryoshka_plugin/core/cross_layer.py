"""The nested (Matryoshka) cross-layer transcoder loss, in plain torch.

A cross-layer transcoder (CLT) over ``L`` layers has one encoder per source layer and,
for source ``s``, one decoder ``W_dec[s]`` of shape ``[M, L - s, d]``: slot ``t``
writes into target layer ``s + t`` (circuit-tracer's layout). Target ``j`` is
reconstructed from every source ``s <= j``.

Prefix ``P`` keeps latents ``< P`` at every source layer. ``target_level_decodes``
decodes every prefix level at every target with one ``embedding_bag`` per target over
the active latents of all its sources: the work of one plain decode, whatever the
number of levels, and an output of ``[N, levels, L, d]`` (a per-source decode would
hold ``L (L + 1) / 2`` target slots, 15x more at 30 layers).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .nested import _sorted_level_ends, cumulative_reconstructions, level_decodes, prefix_decodes


def source_level_decodes(
    top_acts: Tensor, top_indices: Tensor, W_dec: Tensor, nested_sizes: Sequence[int]
) -> Tensor:
    """Each level's own decode into every target of one source, ``[N, levels, T, d]``.

    ``W_dec`` is the source's ``[M, T, d]`` decoder; no bias is added.
    """
    M, T, d = W_dec.shape
    flat = level_decodes(top_acts, top_indices, W_dec.reshape(M, T * d), nested_sizes)
    return flat.view(flat.shape[0], len(nested_sizes), T, d)


def target_level_decodes(
    top_acts: Sequence[Tensor],
    top_indices: Sequence[Tensor],
    W_decs: Sequence[Tensor],
    nested_sizes: Sequence[int],
) -> Tensor:
    """Each level's own decode at every target, summed over sources, ``[N, levels, L, d]``.

    ``W_decs[s]`` is source ``s``'s ``[M, L - s, d]`` decoder; no bias is added. The
    same numbers as ``gather_targets`` of per-source ``source_level_decodes``, from one
    ``embedding_bag`` whose bags are the (token, level, target) triples: a bag holds
    the level's active latents of every source ``s <= j``, each reading row
    ``(i, j - s)`` of its source's decoder, flattened in place. Nothing of size
    ``L (L + 1) / 2`` per token is materialised besides the small index lists, and the
    backward writes one decoder-sized gradient (slicing per source or target would make
    autograd fill a full-size gradient for every slice).
    """
    n_layers = len(W_decs)
    M, _, d = W_decs[0].shape
    sizes = torch.as_tensor(nested_sizes, device=top_indices[0].device)
    n_tokens, n_levels = top_indices[0].shape[0], len(nested_sizes)
    k = max(i.shape[1] for i in top_indices)
    run = torch.arange(k, device=sizes.device)
    acts, idx, valid = [], [], []
    for s in range(n_layers):
        a, i, ends = _sorted_level_ends(top_acts[s], top_indices[s], sizes)
        starts = torch.cat([ends.new_zeros(n_tokens, 1), ends[:, :-1]], dim=1)
        pad = k - i.shape[1]
        acts.append(F.pad(a, (0, pad)))
        idx.append(F.pad(i, (0, pad)))
        valid.append((run >= starts[..., None]) & (run < ends[..., None]))
    acts, idx = torch.stack(acts, dim=1), torch.stack(idx, dim=1)  # [N, L_source, k]
    valid = torch.stack(valid, dim=2)  # [N, levels, L_source, k]
    source = torch.arange(n_layers, device=sizes.device)
    n_slots = n_layers - source  # decoder slots (targets) per source
    base = torch.cat([n_slots.new_zeros(1), (M * n_slots).cumsum(0)[:-1]])
    slot = source[:, None] - source[None, :]  # [L_target, L_source]: j - s
    # Row of latent i of source s, slot j - s, in the concatenated flattened decoders.
    row = base[None, None, :, None] + idx[:, None] * n_slots[None, None, :, None] + slot[None, :, :, None]
    keep = valid[:, :, None] & (slot >= 0)[None, None, :, :, None]  # [N, levels, L_t, L_s, k]
    shape = (n_tokens, n_levels, n_layers, n_layers, k)
    rows = row[:, None].expand(shape)[keep]
    weights = acts[:, None, None].expand(shape)[keep]
    counts = keep.sum(dim=(3, 4)).flatten()
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    W = torch.cat([W.reshape(-1, d) for W in W_decs])
    out = F.embedding_bag(rows, W, offsets, mode="sum", per_sample_weights=weights.to(W.dtype))
    return out.view(n_tokens, n_levels, n_layers, d)


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

    Source ``s`` covers targets ``s..L-1``. Target ``j`` sums the unbound slot views
    ``j - s`` of every source ``s <= j``: unbind's backward is one stack per source,
    whereas in-place slice adds or selects make autograd fill and copy a full-size
    gradient per source (or per target), O(L^2) copies of the whole output.
    """
    slots = []
    for s, dec in enumerate(per_source):
        if dec.shape[2] != n_layers - s:
            raise ValueError(
                f"source {s} decodes into {dec.shape[2]} targets; expected {n_layers - s}"
            )
        slots.append(dec.unbind(2))
    targets = []
    for j in range(n_layers):
        total = slots[0][j]
        for s in range(1, j + 1):
            total = total + slots[s][j - s]
        targets.append(total)
    return torch.stack(targets, dim=2)


def cross_layer_recons(
    summed_levels: Tensor,
    b_dec: Tensor,
    *,
    stop_gradient: bool,
    cumulative: bool = True,
) -> Tensor:
    """Prefix reconstructions of every target, ``[N, levels, L, d]``.

    ``summed_levels`` are decodes already summed over sources (``target_level_decodes``
    or ``gather_targets``): per level (``cumulative=True``: level ``l`` holds only its
    own latents, summed into prefixes here, optionally with stop-gradient) or already
    whole prefixes (``cumulative=False``, prefix-specific decoders). ``b_dec`` is
    ``[L, d]`` or, per level, ``[levels, L, d]``.
    """
    if cumulative:
        n, levels = summed_levels.shape[:2]
        summed_levels = cumulative_reconstructions(
            summed_levels.reshape(n, levels, -1), stop_gradient=stop_gradient
        ).view_as(summed_levels)
    return summed_levels + b_dec


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
    per hookpoint (``nested_fvu`` on each target); the targets' losses are then summed.
    All targets are computed at once: a per-target slice would make autograd build a
    full-size gradient of ``recons`` for every target.
    """
    if total_variance is None:
        total_variance = target_variance(y)
    level_fvu = (y[:, None] - recons).pow(2).sum(dim=(0, 3)).T / total_variance[:, None]
    w = torch.as_tensor(weights, dtype=level_fvu.dtype, device=level_fvu.device)
    return (level_fvu * w).sum(), level_fvu
