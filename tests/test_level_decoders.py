"""Issue #15 part 2: with nested_decoders, a prefix at a nested size is decoded by the
decoder trained for it (evaluation, export, circuit-tracer), and between sizes by the
decoder of the next nested size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, prefix_fvu
from matryoshka_plugin.core.level_decoders import decoder_level, decoder_note
from matryoshka_plugin.evaluation import prefix_curve, reconstruct

D_IN = 12


def nested_coder(seed=0, skip=True, **kwargs) -> MatryoshkaSparseCoder:
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=48, k=6, nested_sizes=[6, 24], nested_decoders=True,
        transcode=True, skip_connection=skip, **kwargs,
    )
    torch.manual_seed(seed)
    coder = MatryoshkaSparseCoder(D_IN, cfg)
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_()
    return coder


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 60), sizes=st.lists(st.integers(1, 47), max_size=4, unique=True))
def test_decoder_level_is_the_smallest_own_decoder_at_or_above_p(p, sizes):
    width = 48
    p = min(p, width)
    level = decoder_level(p, sizes, width)
    assert level >= p and (level == width or level in sizes)
    assert not [s for s in sizes if p <= s < level]
    assert (decoder_note(p, sizes, width) is None) == (not sizes or level == p)


def test_eval_at_a_nested_size_matches_the_training_level_loss():
    # The training forward's level FVU is the loss each level decoder was trained on:
    # evaluation at that nested size must report exactly it.
    coder = nested_coder()
    x, y = torch.randn(64, D_IN), torch.randn(64, D_IN)
    coder.train()
    coder(x, y)
    trained = coder.last_level_fvu.tolist()
    coder.eval()
    got = prefix_fvu(coder, x, y, coder.nested_sizes)
    assert list(got.values()) == pytest.approx(trained, rel=1e-5)
    curve = prefix_curve(coder, x, y, coder.nested_sizes, rsa_samples=0)
    assert [r["fvu"] for r in curve] == pytest.approx(trained, rel=1e-5)


def test_between_sizes_the_next_levels_decoder_is_used():
    coder = nested_coder()
    x = torch.randn(32, D_IN)
    coder.eval()
    # P = 10 lies between 6 and 24: rows of the level-24 decoder, with its bias.
    acts, idx, _ = coder.encode(x)
    keep = (idx < 10).to(acts.dtype) * acts
    W, b = coder.W_dec_levels[1], coder.b_dec + coder.b_dec_levels[1]
    dense = torch.zeros(32, 48).scatter_add_(1, idx, keep)[:, :24]
    expected = dense @ W + b + x @ coder.W_skip.mT
    torch.testing.assert_close(reconstruct(coder, x, 10), expected, rtol=1e-5, atol=1e-5)
    # Past the last inner size it is the full decoder.
    full = coder.decode(acts * (idx < 30), idx) + x @ coder.W_skip.mT
    torch.testing.assert_close(reconstruct(coder, x, 30), full)
