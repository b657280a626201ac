"""Which decoder serves a prefix length when levels have their own decoders.

With ``nested_decoders`` each nested size below the width trains its own decoder. At a
nested size P the prefix model uses that level's decoder; between nested sizes it uses
the decoder of the smallest nested size above P (its first P rows): that decoder was
trained to reconstruct with the fewest latents beyond P missing. Past the largest inner
size it is the full decoder, the only one trained with latents >= that size.
"""

from __future__ import annotations

from collections.abc import Sequence


def decoder_level(prefix_len: int, level_sizes: Sequence[int], width: int) -> int:
    """The nested size whose decoder serves ``prefix_len`` (``width``: the full decoder).

    ``level_sizes`` are the sizes below the width that have their own decoder.
    """
    return min((int(s) for s in level_sizes if s >= prefix_len), default=int(width))


def decoder_note(prefix_len: int, level_sizes: Sequence[int], width: int) -> str | None:
    """One line saying which decoder a prefix between nested sizes uses (None at a size)."""
    if not level_sizes:
        return None
    level = decoder_level(prefix_len, level_sizes, width)
    if level == prefix_len:
        return None
    which = "the full decoder" if level == width else f"the decoder trained for nested size {level}"
    return (
        f"prefix length {prefix_len} is not a nested size ({sorted(level_sizes)} have their own "
        f"decoders): it uses {which}, first {prefix_len} rows"
    )
