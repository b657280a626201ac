"""Prefix schedules: which prefix lengths the nested loss uses at each training step.

``fixed`` always uses the resolved nested sizes (Bussmann et al.). ``pareto`` and
``uniform`` draw new lengths every step (Nabeshima), always ending at the full width.
The sampler owns its ``torch.Generator`` so a resumed run draws the same prefixes.
"""

import torch

from .config import MatryoshkaConfig


def sample_truncated_pareto(
    n: int, low: int, high: int, shape: float, generator: torch.Generator
) -> torch.Tensor:
    """``n`` integer draws from a Pareto(shape) distribution on [low, high), by inverse CDF."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    tail = (low / high) ** shape
    x = low / (1 - u * (1 - tail)) ** (1 / shape)
    return x.floor().long().clamp(low, high - 1)


class PrefixSampler:
    """Yields each step's strictly increasing prefix lengths, the last being the width."""

    def __init__(self, cfg: MatryoshkaConfig, num_latents: int, k: int):
        self.cfg = cfg
        self.num_latents = num_latents
        # A plain (non-Matryoshka) coder has one level, the full width: its group
        # fractions are unused and must not reject a narrow dictionary.
        self.fixed_sizes = cfg.resolve_nested_sizes(num_latents, k) if cfg.matryoshka else [num_latents]
        self.generator = torch.Generator().manual_seed(cfg.prefix_seed)

    @property
    def sampled(self) -> bool:
        return self.cfg.prefix_schedule != "fixed"

    def __call__(self) -> list[int]:
        """The prefix lengths for the next step (without the bias level)."""
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
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
