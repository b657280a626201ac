"""Prefix truncation: keep latents below P, zero the rest.

Truncation happens after the activation has been computed over the full width (TopK
picks from all latents first), so a prefix model is the full model with its later
latents switched off, and anything they carried becomes reconstruction error.
"""

import torch
from torch import Tensor, nn


def truncate_dense(acts: Tensor, prefix_len: int) -> Tensor:
    """Dense activations ``[..., width]`` with every latent ``>= prefix_len`` zeroed."""
    keep = torch.arange(acts.shape[-1], device=acts.device) < prefix_len
    return acts * keep


def truncate_sparse(
    top_acts: Tensor, top_indices: Tensor, prefix_len: int
) -> tuple[Tensor, Tensor]:
    """Sparse (values, indices) with the values of latents ``>= prefix_len`` zeroed."""
    return top_acts * (top_indices < prefix_len), top_indices


class PrefixActivation(nn.Module):
    """Wraps an activation module and zeroes every output latent ``>= prefix_len``."""

    def __init__(self, base: nn.Module, prefix_len: int | None = None):
        super().__init__()
        self.base = base
        self.prefix_len = prefix_len

    def forward(self, pre_acts: Tensor) -> Tensor:
        acts = self.base(pre_acts)
        if self.prefix_len is None or self.prefix_len >= acts.shape[-1]:
            return acts
        return truncate_dense(acts, self.prefix_len)
