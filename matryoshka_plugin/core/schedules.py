"""Prefix schedules: which prefix lengths the nested loss uses at each training step.

``fixed`` always uses the resolved nested sizes (Bussmann et al.). ``pareto`` and
``uniform`` draw new lengths every step (Nabeshima), always ending at the full width.
The sampler owns its ``torch.Generator`` so a resumed run draws the same prefixes.
``annealed_level_weights`` moves the level weights over training (``level_weights_final``).
"""

import torch

from .config import MatryoshkaConfig
from .prefixes import level_weights


def annealed_level_weights(cfg: MatryoshkaConfig, n_levels: int, progress: float) -> list[float]:
    """This step's level weights (summing to 1) at ``progress`` in [0, 1] of training.

    Until ``level_weights_anneal_start`` they are ``level_weights`` (equal if empty);
    then they move linearly to ``level_weights_final``, reached at the end.
    """
    start = level_weights(cfg, n_levels)
    final = list(cfg.level_weights_final)
    if not final or len(final) != n_levels:
        return start
    final = [w / sum(final) for w in final]
    t0 = cfg.level_weights_anneal_start
    t = min(max((progress - t0) / (1 - t0), 0.0), 1.0)
    return [(1 - t) * a + t * b for a, b in zip(start, final)]


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
