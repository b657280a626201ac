"""Running latent importance, and reordering latents with everything that indexes them.

``LatentMass`` sums each latent's activation over the tokens it has seen: the adaptive
prefix schedule reads it to place level boundaries, ``permute_every`` to sort latents
by it. ``permute_latents`` reorders the latent axis of parameters in place and, with
them, every optimizer state tensor of those parameters (Adam's moments, ScheduleFree's
``z``, Muon's momentum): an optimizer step after the permutation is then the permuted
result of the step without it. (Nabeshima's ``permute_latents`` moves the weights but
leaves Adam's moments in the old order, so each latent is stepped with another's.)
"""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .errors import MatryoshkaConfigError


class LatentMass:
    """Each latent's summed activation since the last ``reset`` (float64, on the acts' device)."""

    def __init__(self, num_latents: int):
        self.mass = torch.zeros(num_latents, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, top_acts: Tensor, top_indices: Tensor) -> None:
        if self.mass.device != top_acts.device:
            self.mass = self.mass.to(top_acts.device)
        self.mass.index_add_(0, top_indices.flatten(), top_acts.detach().flatten().double())

    def reset(self) -> None:
        self.mass.zero_()

    def order(self) -> Tensor:
        """Latent indices by mass, largest first; ties keep their current order."""
        return self.mass.argsort(descending=True, stable=True)

    def permute(self, perm: Tensor) -> None:
        """Follow latents moved so that new latent ``i`` is old latent ``perm[i]``."""
        self.mass = self.mass[perm.to(self.mass.device)]

    def state_dict(self) -> dict:
        return {"mass": self.mass.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        mass = state["mass"]
        if mass.shape != self.mass.shape:
            raise ValueError(f"latent mass of shape {tuple(mass.shape)}, expected {tuple(self.mass.shape)}")
        self.mass = mass.to(self.mass.device, torch.float64).clone()


@torch.no_grad()
def permute_latents(
    tensors: Sequence[tuple[Tensor, int]],
    perm: Tensor,
    optimizers: Iterable = (),
) -> None:
    """Reorder ``dim`` of each ``(tensor, dim)`` in place so that new index ``i`` holds old
    index ``perm[i]``, and the same for each parameter's gradient and optimizer state.

    Parameters keep their identity (optimizers key their state by it). An optimizer
    state tensor shaped like its parameter is permuted; a scalar (Adam's step) is
    shared by all latents and kept; any other shape (a blockwise-quantised state) has
    no per-latent layout to follow and is refused.
    """
    states = [opt.state for opt in optimizers]
    for t, dim in tensors:
        index = perm.to(t.device)
        t.copy_(t.index_select(dim, index))
        if isinstance(t, torch.nn.Parameter) and t.grad is not None:
            t.grad.copy_(t.grad.index_select(dim, index))
        for state in states:
            for key, value in state.get(t, {}).items():
                if not isinstance(value, Tensor) or value.numel() == 1 and t.numel() != 1:
                    continue
                if value.shape != t.shape:
                    raise MatryoshkaConfigError(
                        f"permute_every: the optimizer keeps state {key!r} of shape "
                        f"{tuple(value.shape)} for a parameter of shape {tuple(t.shape)}, with no "
                        "per-latent layout to reorder; use adam, signum or muon, or permute_every=0"
                    )
                value.copy_(value.index_select(dim, index.to(value.device)))
