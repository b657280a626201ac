"""Prefix lengths and levels: the one place that checks them and lays out the defaults.

A prefix length P keeps latents ``0 .. P-1`` of a width-``W`` dictionary; it is valid
for ``1 <= P <= W``. A Matryoshka coder's loss runs over *levels*: its nested sizes,
optionally preceded by the bias level (size 0, the decoder bias alone).
"""

import operator
from collections.abc import Iterable, Sequence

from .errors import UsageError


def check_prefix_len(prefix_len, width: int, what: str = "prefix length", error=UsageError) -> int:
    """``prefix_len`` as an int if it is a valid prefix of ``width`` latents, else ``error``.

    Integer-like values (numpy or torch integers) are accepted; bools and floats are not.
    """
    if not isinstance(prefix_len, bool):
        try:
            prefix_len = operator.index(prefix_len)
        except TypeError:
            pass
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise error(f"{what} {prefix_len!r} must be an integer in 1..{width}")
    if not 1 <= prefix_len <= width:
        raise error(f"{what} {prefix_len} is out of range; allowed: 1..{width}")
    return prefix_len


def check_prefix_lens(
    prefix_lens: Iterable, width: int, what: str = "prefix length", error=UsageError
) -> list[int]:
    """Each of ``prefix_lens`` checked, in the order given; none may repeat or be missing."""
    lens = [check_prefix_len(p, width, what, error) for p in prefix_lens]
    if not lens:
        raise error(f"no {what} given; give at least one in 1..{width}")
    if len(set(lens)) != len(lens):
        raise error(f"{what}s {lens} repeat a value; give each once")
    return lens


def default_prefix_ladder(width: int, nested_sizes: Sequence[int] = ()) -> list[int]:
    """The prefix lengths to report when none are asked for.

    A Matryoshka coder's nested sizes (they end at the width); otherwise powers of two
    below the width, then the width.
    """
    sizes = list(nested_sizes or [])
    if len(sizes) > 1:
        return sizes
    ladder, p = [], 1
    while p < width:
        ladder.append(p)
        p *= 2
    return ladder + [width]


def with_bias_level(sizes: Sequence[int], bias_level: bool) -> list[int]:
    """The levels of one step: ``sizes``, with the bias level (size 0) first if enabled."""
    return ([0] if bias_level else []) + list(sizes)


def level_weights(cfg, n_levels: int) -> list[float]:
    """Per-level loss weights summing to 1.

    The configured ``level_weights`` when they match this step's levels (fixed
    schedules), equal weights otherwise (sampled prefixes draw a varying number).
    """
    if cfg.level_weights and len(cfg.level_weights) == n_levels:
        return cfg.normalised_level_weights(n_levels)
    return [1.0 / n_levels] * n_levels
