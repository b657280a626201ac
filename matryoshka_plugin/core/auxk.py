"""Matryoshka-aware AuxK: dead latents learn what each prefix level fails to reconstruct.

sparsify's AuxK (Gao et al., appendix B.1) has the top ``k_aux`` dead latents of each
token reconstruct the full-width residual, with gradients into the decoder only, so a
dead latent's encoder never moves and it stays dead. Here each level does the same with
its own residual and its own dead latents (those below the level's prefix length), and
the dead latents' pre-activations carry gradients into the encoder. A dead latent in an
early group is thus pulled towards what that group's prefix misses.
"""

from collections.abc import Sequence

import torch
from torch import Tensor


def nested_auxk_loss(
    dead_pre_acts: Tensor,
    dead_indices: Tensor,
    W_dec: Tensor,
    residuals: Tensor,
    sizes: Sequence[int],
    weights: Sequence[float],
    total_variance: Tensor,
    k_aux: int,
) -> Tensor:
    """Weighted sum over levels of each level's AuxK loss.

    ``dead_pre_acts`` ``[tokens, n_dead]`` are the (ReLU'd) pre-activations of the dead
    latents ``dead_indices`` (sorted); ``residuals`` ``[tokens, levels, d]`` what each
    level leaves of the target (detached here). A level of size ``s`` uses the dead
    latents below ``s``: its top ``min(k_aux, n)`` of them per token decode its residual,
    and its loss is scaled by ``min(n / k_aux, 1)`` as in sparsify.
    """
    total = dead_pre_acts.new_zeros(())
    residuals = residuals.detach()
    counts = torch.searchsorted(dead_indices, torch.as_tensor(list(sizes), device=dead_indices.device))
    for level, (n, w) in enumerate(zip(counts.tolist(), weights)):
        if n == 0 or w == 0:
            continue
        k = min(k_aux, n)
        acts, pick = dead_pre_acts[:, :n].topk(k, dim=1, sorted=False)
        # Dense, not gathered rows: [tokens, n] is the size of dead_pre_acts already,
        # while gathered decoder rows would be [tokens, k, d].
        kept = torch.zeros_like(dead_pre_acts[:, :n]).scatter(1, pick, acts)
        recon = kept @ W_dec[dead_indices[:n]]
        loss = (recon - residuals[:, level]).pow(2).sum() / total_variance
        total = total + w * min(n / k_aux, 1.0) * loss
    return total
