"""BatchTopK: the k x batch largest activations over the whole batch.

Tokens then hold different numbers of active latents. To keep sparsify's
``[tokens, K]`` (values, indices) layout, every token is padded to the largest count
in the batch with copies of its own strongest latent at activation 0: decoding adds
nothing, and a "did this latent fire" count is not fooled by padding. A token with no
kept latent at all is padded with the batch's strongest kept latent, which did fire.
(Only a batch in which nothing fired has no honest padding index; it pads with
latent 0, the one case in which a fired-by-index count is wrong.)
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def select_padded(pre_acts: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """(values, indices) of the ``keep`` entries of each row, padded as described above."""
    counts = keep.sum(dim=-1)
    width = max(int(counts.max()), 1)
    # Kept entries first, strongest first, so the first column is a real latent
    # wherever a token has one.
    ranked = torch.where(keep, pre_acts, pre_acts.new_tensor(-torch.inf))
    _, indices = ranked.topk(width, dim=-1, sorted=True)
    real = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    # topk over an all -inf row returns an arbitrary latent, which sparsify's trainer
    # would then count as fired (so never dead, never revived by AuxK).
    fired = ranked.flatten().argmax() % pre_acts.shape[-1] if keep.any() else 0
    pad = torch.where(counts[:, None] > 0, indices[:, :1], fired)
    indices = torch.where(real, indices, pad)
    values = pre_acts.gather(-1, indices) * real
    return values, indices


def batch_topk(pre_acts: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Training-time BatchTopK over ``pre_acts`` (already ReLU'd), ``[tokens, latents]``.

    Returns padded (values, indices) and the smallest kept positive activation, which
    feeds the running inference threshold.
    """
    n_keep = min(k * pre_acts.shape[0], pre_acts.numel())
    flat = pre_acts.flatten()
    kept_vals, kept_idx = flat.topk(n_keep, sorted=False)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[kept_idx] = True
    keep = keep.view_as(pre_acts) & (pre_acts > 0)
    positive = kept_vals[kept_vals > 0]
    min_kept = positive.min() if positive.numel() else pre_acts.new_tensor(0.0)
    values, indices = select_padded(pre_acts, keep)
    return values, indices, min_kept.detach()


def threshold_select(pre_acts: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Inference-time BatchTopK: every activation above the running threshold."""
    return select_padded(pre_acts, pre_acts > threshold)


def encode_pre_acts(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """ReLU encoder pre-activations with ordinary autograd (BatchTopK needs them dense)."""
    return F.relu(F.linear(x, weight, bias))
