"""Activation modules for exported sparsify transcoders.

- ``TopKReLU``: sparsify's exact activation (ReLU, then the k largest per token).
  circuit-tracer ships a ``TopK`` module but applies it to raw pre-activations and has
  no loader that builds it; this subclass adds the ReLU and the plugin's loader
  (``loading.load_transcoders_dir``) constructs it.
- ``calibrate_jumprelu_thresholds``: per-latent JumpReLU thresholds that stock
  circuit-tracer loads with no plugin. It is an approximation of TopK.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from circuit_tracer.transcoder.activation_functions import TopK
from torch import Tensor


class TopKReLU(TopK):
    """ReLU then keep the ``k`` largest activations per token (sparsify's ``topk``)."""

    def forward(self, x: Tensor) -> Tensor:
        # ReLU is monotone, so TopK of the ReLU'd values keeps sparsify's latents; it
        # also makes tokens with fewer than k positive pre-activations keep zeros, not
        # negative values, which upstream ``TopK`` on raw pre-activations would keep.
        return super().forward(F.relu(x))

    def extra_repr(self) -> str:
        return f"k={self.k}"


@torch.no_grad()
def calibrate_jumprelu_thresholds(coder, x: Tensor, chunk: int = 4096) -> Tensor:
    """Per-latent thresholds under which each latent fires as often as under TopK on ``x``.

    For latent j firing on c_j of the n calibration tokens under TopK, the threshold is
    its (c_j + 1)-th largest pre-activation, so ``pre > threshold`` selects exactly c_j
    tokens of ``x``. Never-firing latents get their largest pre-activation (they stay
    off on ``x``); thresholds are at least 0, so JumpReLU never passes negatives.
    """
    x = x.to(coder.dtype)
    n = x.shape[0]
    if n == 0:
        raise ValueError("calibration needs at least one activation row")
    pre = torch.cat(
        [F.relu(F.linear(c, coder.encoder.weight, coder.encoder.bias)) for c in x.split(chunk)]
    )
    counts = torch.zeros(pre.shape[1], dtype=torch.long)
    for c in x.split(chunk):
        top_acts, top_idx, _ = coder.encode(c)
        fired = top_idx[top_acts > 0]
        counts += torch.bincount(fired.flatten().cpu(), minlength=pre.shape[1])
    ranked = pre.sort(dim=0, descending=True).values
    idx = counts.clamp(max=n - 1).to(ranked.device)
    thresholds = ranked.gather(0, idx[None]).squeeze(0)
    thresholds = torch.where(counts.to(ranked.device) >= n, torch.zeros_like(thresholds), thresholds)
    return thresholds.clamp_min(0)
