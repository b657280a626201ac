"""BatchTopK: the k x batch largest activations over the whole batch.

Tokens then hold different numbers of active latents. The selection is kept ragged:
one flat list of (token, latent, value) entries in row-major order, so every piece of
work that scales with ``d`` (the encoder backward here, the decode) touches only the
kept entries, never a token's padding. Only the ``[tokens, K]`` (values, indices)
interface that sparsify's forward and trainer read is padded, to the largest count in
the batch, with copies of a latent the token itself kept (its lowest-index one) at
activation 0: decoding adds nothing, and a "did this latent fire" count is not fooled
by padding. A token with no kept latent at all is padded with the batch's strongest
kept latent, which did fire. (Only a batch in which nothing fired has no honest
padding index; it pads with latent 0, the one case in which a fired-by-index count is
wrong.)

Training differentiates the kept values through ``BatchTopKEncoder``, whose backward
is sparse like sparsify's ``FusedEncoder``: gradients equal those of dense autograd
through ``relu(linear(x))`` (up to summation order), at a cost of kept entries x d
instead of tokens x width x d.

Inference keeps every activation above a running threshold (``update_threshold``), so a
token's kept latents depend on that token alone, never on the rest of its batch. The
output is then ragged the same way: ``[tokens, K]`` with ``K`` the most latents any
token of this batch keeps, so ``K`` changes from batch to batch while each row's
(latent, value) entries do not. Decode it, or scatter it into a dense
``[tokens, width]`` matrix (padding adds 0); do not concatenate batches column-wise.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


class Ragged:
    """Kept entries in row-major order: ``tokens``, ``latents`` (both ``[M]``), and
    each kept entry's column ``slot`` in the padded ``[n_tokens, width]`` layout."""

    def __init__(self, flat_idx: Tensor, n_tokens: int, n_latents: int):
        self.tokens = flat_idx.div(n_latents, rounding_mode="floor")
        self.latents = flat_idx - self.tokens * n_latents
        self.counts = torch.bincount(self.tokens, minlength=n_tokens)
        self.starts = self.counts.cumsum(0) - self.counts
        self.slot = torch.arange(flat_idx.numel(), device=flat_idx.device) - self.starts[self.tokens]
        self.n_tokens = n_tokens
        self.width = max(int(self.counts.max()), 1) if n_tokens else 1

    def padded_indices(self, strongest: Tensor | int) -> Tensor:
        """``[n_tokens, width]`` latent indices, padded as the module docstring says."""
        first = torch.as_tensor(strongest, device=self.tokens.device).expand(self.n_tokens)
        if self.latents.numel():
            own = self.latents[self.starts.clamp_max(self.latents.numel() - 1)]
            first = torch.where(self.counts > 0, own, first)
        indices = first[:, None].expand(-1, self.width).clone()
        indices[self.tokens, self.slot] = self.latents
        return indices

    def padded_values(self, values: Tensor) -> Tensor:
        """``[n_tokens, width]`` values, 0 at padding; differentiable in ``values``."""
        out = values.new_zeros(self.n_tokens, self.width)
        return out.index_put((self.tokens, self.slot), values)


def _select(pre_acts: Tensor, flat_idx: Tensor) -> tuple[Ragged, Tensor]:
    """The entries at sorted flat indices ``flat_idx``, and the padding latent for empty
    tokens (the strongest selected one, or 0 if none)."""
    n_tokens, n_latents = pre_acts.shape
    ragged = Ragged(flat_idx, n_tokens, n_latents)
    vals = pre_acts.flatten()[flat_idx]
    strongest = ragged.latents[vals.argmax()] if vals.numel() else 0
    return ragged, strongest


def batch_topk_indices(pre_acts: Tensor, k: int) -> Tensor:
    """Sorted flat indices of the ``k * tokens`` largest positive entries of ``pre_acts``.

    The same set as ``pre_acts.flatten().topk(k * tokens)`` (less its zeros), found
    without that call, which on CPU costs several times a per-row TopK: each row's
    top-2k candidates settle the threshold, and only rows whose every candidate clears
    it (which may hold more kept entries) are searched again, deeper. Sorted flat
    indices are row-major: tokens in order, each token's latents ascending.
    """
    n_tokens, width = pre_acts.shape
    n_keep = min(k * n_tokens, pre_acts.numel())
    rows = torch.arange(n_tokens, device=pre_acts.device)
    depth = torch.full((n_tokens,), min(2 * k, width), device=pre_acts.device)
    searched = rows  # the rows whose candidates are (re)computed this round
    cand_vals = cand_idx = pre_acts.new_empty(0)
    while True:
        source = pre_acts if searched is rows else pre_acts[searched]  # no copy at first
        vals, cols = source.topk(int(depth[searched].max()), dim=-1, sorted=False)
        stale = torch.isin(cand_idx.div(width, rounding_mode="floor"), searched)
        cand_vals = torch.cat([cand_vals[~stale], vals.flatten()])
        cand_idx = torch.cat([cand_idx[~stale].long(), (searched[:, None] * width + cols).flatten()])
        if searched is rows:
            row_min = vals.amin(dim=-1)
        else:
            row_min[searched] = vals.amin(dim=-1)
        n = min(n_keep, cand_vals.numel())
        tau = cand_vals.kthvalue(cand_vals.numel() - n + 1).values if n else cand_vals.new_tensor(1.0)
        # A row may hide kept entries beyond its candidates only if even its weakest
        # candidate reaches the threshold (and is positive: zeros are never kept).
        deeper = (row_min >= tau) & (row_min > 0) & (depth < width)
        if not deeper.any():
            break
        searched = rows[deeper]
        depth[searched] = (depth[searched] * 2).clamp_max(width)
    # Exactly n_keep entries, as topk keeps: all above the threshold, then ties at it.
    above, tied = (cand_vals > tau).nonzero().squeeze(1), (cand_vals == tau).nonzero().squeeze(1)
    chosen = torch.cat([above, tied[: max(n - above.numel(), 0)]])
    chosen = chosen[cand_vals[chosen] > 0]
    return cand_idx[chosen].sort().values


class BatchTopKEncoder(torch.autograd.Function):
    """``relu(linear(x))``, BatchTopK over it, padded values with a sparse backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int):
        pre_acts = F.relu(F.linear(x, weight, bias))
        flat_idx = batch_topk_indices(pre_acts, k)
        kept_vals = pre_acts.flatten()[flat_idx]
        min_kept = kept_vals.min() if kept_vals.numel() else pre_acts.new_tensor(0.0)
        ragged, strongest = _select(pre_acts, flat_idx)
        values = ragged.padded_values(pre_acts.flatten()[flat_idx])
        ctx.save_for_backward(x, weight, ragged.tokens, ragged.latents, ragged.slot, ragged.starts)
        ctx.mark_non_differentiable(pre_acts)
        return values, ragged.padded_indices(strongest), pre_acts, min_kept

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, _grad_pre, _grad_min):
        x, weight, tokens, latents, slot, starts = ctx.saved_tensors
        # Every kept value is positive, so relu passes its gradient through unchanged.
        g = grad_values[tokens, slot]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # One bag per token over its kept latents: no [M, d] temporary.
            grad_x = F.embedding_bag(
                latents, weight, starts, mode="sum", per_sample_weights=g.to(weight.dtype)
            )
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            # One bag per latent over the tokens that kept it: no [M, d] temporary.
            order = latents.argsort(stable=True)
            per_latent = torch.bincount(latents, minlength=weight.shape[0])
            grad_w = F.embedding_bag(
                tokens[order], x.to(weight.dtype), per_latent.cumsum(0) - per_latent,
                mode="sum", per_sample_weights=g[order].to(weight.dtype),
            )
        if ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, latents, g.to(weight.dtype))
        return grad_x, grad_w, grad_b, None


def batch_topk_encode(
    x: Tensor, weight: Tensor, bias: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-time BatchTopK of ``relu(x @ weight.T + bias)`` with a sparse backward.

    Returns padded (values, indices), the pre-activations (no gradient) and the
    smallest kept positive activation, which feeds the running inference threshold.
    """
    values, indices, pre_acts, min_kept = BatchTopKEncoder.apply(x, weight, bias, k)
    return values, indices, pre_acts, min_kept.detach()


THRESHOLD_WINDOW = 0.1
"""The running threshold averages over the last tenth of the updates so far (see
``update_threshold``)."""


@torch.no_grad()
def update_threshold(threshold: Tensor, updates: Tensor, min_kept: Tensor, momentum: float) -> None:
    """Fold one training batch's smallest kept activation into the inference threshold.

    In place on ``threshold`` and on ``updates`` (how many batches it has seen). An EMA
    whose window is a tenth of the updates so far, at most ``1 / (1 - momentum)``: the
    first batch sets it, and after ``10 / (1 - momentum)`` updates it is the plain EMA
    at ``momentum``. A fixed momentum of 0.99 from the first batch lags the smallest
    kept activation while training still moves it fast: on the hard toy (width 192,
    k 6), held-out L0 was 0.59 k at step 64 and 0.92 k at step 512 of 1024, against
    0.91-1.04 k from step 16 on with this window
    (``benchmarks/quality/BATCHTOPK_SECTION.md``). Tensor arithmetic only, so a CUDA
    step does not wait on the host.
    """
    updates += 1
    # At least float32: a bfloat16 count would round the window of a long run.
    dtype = torch.promote_types(threshold.dtype, torch.float32)
    window = (updates.to(dtype) * THRESHOLD_WINDOW).clamp_min(1)
    beta = (1 - 1 / window).clamp_max(momentum)
    threshold.copy_(beta * threshold + (1 - beta) * min_kept)


def threshold_select(pre_acts: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Inference-time BatchTopK: every activation above the running threshold."""
    flat_idx = (pre_acts > threshold).flatten().nonzero().squeeze(1)  # row-major
    ragged, strongest = _select(pre_acts.detach(), flat_idx)
    values = ragged.padded_values(pre_acts.flatten()[flat_idx])
    return values, ragged.padded_indices(strongest)


def encode_pre_acts(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """ReLU encoder pre-activations with ordinary autograd (inference-time BatchTopK)."""
    return F.relu(F.linear(x, weight, bias))
