"""Prefix schedules: which prefix lengths the nested loss uses at each training step.

``fixed`` always uses the resolved nested sizes (Bussmann et al.). ``pareto`` and
``uniform`` draw new lengths every step (Nabeshima), always ending at the full width.
``adaptive`` starts from the resolved sizes and every ``adaptive_every`` steps moves
them to where the activation mass says (``adaptive_sizes``). The sampler owns its
``torch.Generator`` and statistics so a resumed run uses the same prefixes.
"""

import torch
from torch import Tensor

from .config import SAMPLED_SCHEDULES, MatryoshkaConfig
from .permutation import LatentMass


def sample_truncated_pareto(
    n: int, low: int, high: int, shape: float, generator: torch.Generator
) -> torch.Tensor:
    """``n`` integer draws from a Pareto(shape) distribution on [low, high), by inverse CDF."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    tail = (low / high) ** shape
    x = low / (1 - u * (1 - tail)) ** (1 / shape)
    return x.floor().long().clamp(low, high - 1)


def adaptive_sizes(mass: Tensor, shares: list[int], width: int) -> list[int]:
    """Nested sizes from per-latent mass: size ``l`` is the shortest prefix whose latents
    hold at least ``shares[l] / width`` of the total mass, kept strictly increasing and
    below ``width`` (which ends the list). With equal mass per latent this gives back
    ``shares`` itself; with no mass at all, too.
    """
    total = mass.sum()
    if not total > 0:
        return [*shares, width]
    # cum * width >= share * total rather than cum / total >= share / width: no division,
    # so equal integer masses give back `shares` exactly.
    cum = mass.cumsum(0) * width
    sizes, n_inner = [], len(shares)
    for level, share in enumerate(shares):
        p = int(torch.searchsorted(cum, share * total)) + 1
        low = sizes[-1] + 1 if sizes else 1
        sizes.append(min(max(p, low), width - (n_inner - level)))
    return [*sizes, width]


class PrefixSampler:
    """Yields each step's strictly increasing prefix lengths, the last being the width."""

    def __init__(self, cfg: MatryoshkaConfig, num_latents: int, k: int):
        self.cfg = cfg
        self.num_latents = num_latents
        # A plain (non-Matryoshka) coder has one level, the full width: its group
        # fractions are unused and must not reject a narrow dictionary.
        self.fixed_sizes = cfg.resolve_nested_sizes(num_latents, k) if cfg.matryoshka else [num_latents]
        self.generator = torch.Generator().manual_seed(cfg.prefix_seed)
        self.adaptive = cfg.matryoshka and cfg.prefix_schedule == "adaptive"
        # The adaptive schedule's targets: the configured sizes, as shares of the width.
        self.shares = list(self.fixed_sizes[:-1])
        self.mass = LatentMass(num_latents)
        self.steps = 0

    @property
    def sampled(self) -> bool:
        return self.cfg.prefix_schedule in SAMPLED_SCHEDULES

    def observe(self, top_acts: Tensor, top_indices: Tensor) -> None:
        """Count a training step's activations towards the adaptive schedule's next move."""
        if self.adaptive:
            self.mass.observe(top_acts, top_indices)

    def __call__(self) -> list[int]:
        """The prefix lengths for the next step (without the bias level)."""
        if self.adaptive:
            if self.steps and self.steps % self.cfg.adaptive_every == 0:
                self.fixed_sizes = adaptive_sizes(self.mass.mass, self.shares, self.num_latents)
                self.mass.reset()
            self.steps += 1
        if not self.sampled:
            return list(self.fixed_sizes)
        cfg, width = self.cfg, self.num_latents
        if cfg.prefix_schedule == "pareto":
            draws = sample_truncated_pareto(
                cfg.num_prefixes, cfg.min_prefix, width, cfg.pareto_shape, self.generator
            )
        else:
            draws = torch.randint(
                cfg.min_prefix, width, (cfg.num_prefixes,), generator=self.generator
            )
        return sorted(set(draws.tolist())) + [width]

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if self.adaptive:
            state["adaptive"] = {
                "sizes": list(self.fixed_sizes), "steps": self.steps, **self.mass.state_dict()
            }
        return state

    def adopt_sizes(self, sizes) -> None:
        """Take the nested sizes an adaptive run had moved to (a checkpoint's record).

        Raises ValueError naming ``sizes`` unless they are as many strictly increasing
        positive integers as the configured levels, ending at the width.
        """
        if not self.adaptive:
            raise ValueError(f"adapted nested sizes {sizes!r} need prefix_schedule='adaptive'")
        ints = isinstance(sizes, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)
        if not (ints and len(sizes) == len(self.fixed_sizes) and sizes[-1] == self.num_latents
                and all(a < b for a, b in zip([0, *sizes], sizes))):
            raise ValueError(
                f"adapted nested sizes {sizes!r} do not fit: expected {len(self.fixed_sizes)} "
                f"strictly increasing positive integers ending at the width {self.num_latents}"
            )
        self.fixed_sizes = list(sizes)

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.adaptive:
            adaptive = state["adaptive"]
            self.mass.load_state_dict(adaptive)
            self.adopt_sizes([int(s) for s in adaptive["sizes"]])
            self.steps = int(adaptive["steps"])
