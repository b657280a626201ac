"""The Matryoshka options, as a plain dataclass that any upstream config can mix in.

Width-independent checks run in ``__post_init__`` (so a config fails when it is
loaded); checks that need the dictionary width run in ``resolve_nested_sizes``.
"""

import math
from dataclasses import dataclass, field
from typing import Literal
from .errors import MatryoshkaConfigError

PrefixScheduleName = Literal["fixed", "pareto", "uniform", "adaptive"]
PREFIX_SCHEDULES: tuple[str, ...] = ("fixed", "pareto", "uniform", "adaptive")
SAMPLED_SCHEDULES: tuple[str, ...] = ("pareto", "uniform")
"""The schedules that draw new prefix lengths every step (the others keep a fixed number of levels)."""

# Bussmann et al. (2025): groups of 1/16, 1/16, 1/8, 1/4 and 1/2 of the width.
BUSSMANN_GROUP_FRACTIONS: tuple[float, ...] = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)



@dataclass
class MatryoshkaConfig:
    matryoshka: bool = False
    """Train with Matryoshka nested prefix losses; False trains exactly as plain sparsify."""

    nested_sizes: list[int] = field(default_factory=list)
    """Explicit prefix lengths, strictly increasing and below the width (the full width is implied)."""

    group_fractions: list[float] = field(default_factory=list)
    """Group widths as fractions of the width summing to 1, used when nested_sizes is empty; empty means Bussmann's 1/16,1/16,1/8,1/4,1/2."""

    prefix_schedule: PrefixScheduleName = "fixed"
    """How each step's prefixes are chosen: fixed nested sizes, pareto/uniform samples drawn every step, or adaptive (see adaptive_every)."""

    adaptive_every: int = 100
    """prefix_schedule='adaptive': every this many training steps, move each nested size to the shortest prefix holding its share (size / width of the configured sizes) of the activation mass seen since the last move."""

    num_prefixes: int = 10
    """Prefix lengths drawn per step by a sampled schedule, before duplicates are dropped."""

    min_prefix: int = 1
    """Smallest prefix length a sampled schedule may draw."""

    pareto_shape: float = 0.5
    """Shape (alpha) of the truncated-Pareto prefix distribution (survival (min_prefix/l)^alpha); larger puts more mass on short prefixes."""

    prefix_seed: int = 0
    """Seed of the prefix sampler's own random generator."""

    level_weights: list[float] = field(default_factory=list)
    """Loss weight of each level (the bias level first, if any); empty means equal; normalised to sum to 1."""

    stop_gradient: bool = False
    """Detach the previous level's reconstruction in each level's loss (the "delta" loss)."""

    bias_level: bool = False
    """Add a level with no latents that reconstructs from the decoder bias alone, as Bussmann et al. count it."""

    nested_decoders: bool = False
    """Give each prefix level its own decoder and bias (seed 000, section 4.3); the full-width model uses the full decoder, a prefix at a nested size its level's."""

    batch_topk: bool = False
    """Keep the k x batch largest activations over the whole batch (BatchTopK) instead of k per token."""

    batch_topk_momentum: float = 0.99
    """EMA momentum of the BatchTopK inference threshold, reached after 10 / (1 - momentum) batches; until then the EMA spans the last tenth of the batches seen."""

    permute_every: int = 0
    """Every this many optimizer steps, reorder latents by their activation mass since the last reorder, largest first (0: never)."""

    def __post_init__(self):
        self.validate_matryoshka()

    def validate_matryoshka(self) -> None:
        """Check every option that does not depend on the dictionary width."""
        bad = MatryoshkaConfigError
        if self.nested_decoders and self.stop_gradient:
            raise bad(
                "stop_gradient=True needs the shared decoder; with nested_decoders=True "
                "each level already has its own decoder"
            )
        if self.prefix_schedule not in PREFIX_SCHEDULES:
            raise bad(
                f"prefix_schedule={self.prefix_schedule!r} is unknown; "
                f"allowed: {', '.join(PREFIX_SCHEDULES)}"
            )
        sizes = list(self.nested_sizes)
        if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
            raise bad(f"nested_sizes={sizes} must be positive integers")
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise bad(f"nested_sizes={sizes} must be strictly increasing")
        if sizes and self.group_fractions:
            raise bad(
                f"nested_sizes={sizes} and group_fractions={self.group_fractions} "
                "contradict each other; give one of them"
            )
        fracs = list(self.group_fractions)
        # `not f > 0` (rather than f <= 0) also refuses NaN, which passes every comparison.
        if any(not f > 0 for f in fracs) or (fracs and not abs(sum(fracs) - 1) <= 1e-6):
            raise bad(
                f"group_fractions={fracs} must be positive and sum to 1 "
                "(each is one group's share of the width)"
            )
        sampled = self.prefix_schedule in SAMPLED_SCHEDULES
        if sampled and (sizes or fracs):
            raise bad(
                f"nested_sizes/group_fractions apply to prefix_schedule='fixed', "
                f"not {self.prefix_schedule!r}, whose prefixes are drawn every step"
            )
        if self.num_prefixes < 1:
            raise bad(f"num_prefixes={self.num_prefixes} must be at least 1")
        if self.min_prefix < 1:
            raise bad(f"min_prefix={self.min_prefix} must be at least 1")
        if not self.pareto_shape > 0:
            raise bad(f"pareto_shape={self.pareto_shape} must be > 0")
        weights = self.level_weights
        if any(not 0 <= w < math.inf for w in weights) or (weights and not sum(weights) > 0):
            raise bad(
                f"level_weights={weights} must be finite, non-negative and with a positive sum"
            )
        if sampled and weights:
            raise bad(
                f"level_weights={weights} need prefix_schedule='fixed'; "
                f"{self.prefix_schedule!r} draws a different number of levels each step"
            )
        if sampled and self.nested_decoders:
            raise bad(
                f"nested_decoders=True needs prefix_schedule='fixed'; "
                f"{self.prefix_schedule!r} draws new prefix lengths every step"
            )
        for name, low in (("adaptive_every", 1), ("permute_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(f"{name}={value!r} is not allowed; expected an integer >= {low}")
        adaptive = self.prefix_schedule == "adaptive"
        if adaptive and self.nested_decoders:
            raise bad(
                "prefix_schedule='adaptive' moves the nested sizes; nested_decoders=True "
                "gives each level a decoder of fixed width: use one of them"
            )
        if adaptive and weights:
            raise bad(
                f"level_weights={weights} weight levels whose sizes prefix_schedule='adaptive' "
                "moves during training; use prefix_schedule='fixed' or drop level_weights"
            )
        if self.permute_every and not self.matryoshka:
            raise bad(
                f"permute_every={self.permute_every} orders latents for the nested loss; "
                "it needs matryoshka=true"
            )
        if self.permute_every and self.nested_decoders:
            raise bad(
                f"permute_every={self.permute_every} would move latents across the levels, "
                "but nested_decoders=True holds rows only for each level's own prefix"
            )
        if not 0 <= self.batch_topk_momentum < 1:
            raise bad(
                f"batch_topk_momentum={self.batch_topk_momentum} must be in [0, 1)"
            )

    def resolve_nested_sizes(self, num_latents: int, k: int) -> list[int]:
        """The fixed prefix lengths for a dictionary of ``num_latents``, ending at the width.

        For sampled schedules this is the full width alone; the sampler adds the rest. For
        the adaptive schedule these are the sizes it starts from.
        """
        bad = MatryoshkaConfigError
        if k > num_latents:
            raise bad(f"k={k} exceeds the width num_latents={num_latents}")
        if self.prefix_schedule in SAMPLED_SCHEDULES:
            if self.min_prefix >= num_latents:
                raise bad(
                    f"min_prefix={self.min_prefix} must be below the width "
                    f"num_latents={num_latents}"
                )
            return [num_latents]
        if self.nested_sizes:
            sizes = list(self.nested_sizes)
            if sizes[-1] == num_latents:
                sizes.pop()
            if sizes and sizes[-1] > num_latents:
                raise bad(
                    f"nested_sizes={list(self.nested_sizes)} exceed the width "
                    f"num_latents={num_latents}"
                )
            sizes.append(num_latents)
        else:
            fracs = self.group_fractions or BUSSMANN_GROUP_FRACTIONS
            sizes, total = [], 0.0
            for f in fracs:
                total += f
                sizes.append(round(total * num_latents))
            sizes[-1] = num_latents
            if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
                raise bad(
                    f"group_fractions={list(fracs)} give empty groups at width "
                    f"num_latents={num_latents} (sizes {sizes}); use a wider "
                    "dictionary or fewer groups"
                )
        n_levels = len(sizes) + int(self.bias_level)
        if self.level_weights and len(self.level_weights) != n_levels:
            raise bad(
                f"level_weights has {len(self.level_weights)} entries but there are "
                f"{n_levels} levels (nested sizes {sizes}"
                f"{' plus the bias level' if self.bias_level else ''})"
            )
        return sizes

    def normalised_level_weights(self, n_levels: int) -> list[float]:
        """Per-level loss weights summing to 1 (equal unless ``level_weights`` is set)."""
        weights = list(self.level_weights) or [1.0] * n_levels
        total = sum(weights)
        return [w / total for w in weights]
