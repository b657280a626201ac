"""Property tests of the nested decode: one embedding_bag equals naive per-prefix decodes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.core import (
    cumulative_reconstructions,
    level_decodes,
    nested_fvu,
    prefix_decodes,
    truncate_dense,
    truncate_sparse,
)



@pytest.fixture(autouse=True, scope="module")
def float64_default():
    """Exact-ish comparisons in float64, without leaking the default to other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@st.composite
def sparse_codes(draw):
    """Random TopK-style codes: per token, k distinct latent indices with activations."""
    width = draw(st.integers(2, 40))
    k = draw(st.integers(1, width))
    n_tokens = draw(st.integers(1, 6))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(width, generator=g)[:k] for _ in range(n_tokens)])
    acts = torch.rand(n_tokens, k, generator=g) + 0.1
    W = torch.randn(width, d, generator=g)
    inner = draw(st.lists(st.integers(1, width - 1), unique=True, max_size=6)) if width > 1 else []
    sizes = sorted(inner) + [width]
    if draw(st.booleans()):
        sizes = [0, *sizes]  # a bias-only level
    return acts, indices, W, sizes


def naive_prefix_decode(acts, indices, W, p):
    """Dense decode with every latent >= p zeroed."""
    dense = torch.zeros(acts.shape[0], W.shape[0]).scatter(1, indices, acts)
    return truncate_dense(dense, p) @ W


@settings(max_examples=60, deadline=None)
@given(sparse_codes())
def test_cumulative_single_decode_equals_naive_per_prefix(codes):
    acts, indices, W, sizes = codes
    recons = cumulative_reconstructions(
        level_decodes(acts, indices, W, sizes), stop_gradient=False
    )
    for level, p in enumerate(sizes):
        torch.testing.assert_close(recons[:, level], naive_prefix_decode(acts, indices, W, p))


@settings(max_examples=40, deadline=None)
@given(sparse_codes())
def test_single_decode_gradients_equal_naive(codes):
    acts, indices, W, sizes = codes
    y = torch.randn(acts.shape[0], W.shape[1])
    weights = torch.rand(len(sizes)).tolist()

    def loss_fast(a, w):
        recons = cumulative_reconstructions(level_decodes(a, indices, w, sizes), stop_gradient=False)
        return nested_fvu(recons, y, torch.tensor(1.0), weights)[0]

    def loss_naive(a, w):
        recons = torch.stack([naive_prefix_decode(a, indices, w, p) for p in sizes], dim=1)
        return sum(wt * (y - recons[:, i]).pow(2).sum() for i, wt in enumerate(weights))

    grads = []
    for fn in (loss_fast, loss_naive):
        a, w = acts.clone().requires_grad_(), W.clone().requires_grad_()
        value = fn(a, w)
        value.backward()
        grads.append((value.detach(), a.grad, w.grad))
    for fast, naive in zip(*grads):
        torch.testing.assert_close(fast, naive)


@settings(max_examples=40, deadline=None)
@given(sparse_codes())
def test_sparse_truncation_equals_zeroing_latents(codes):
    acts, indices, W, sizes = codes
    for p in sizes[1:]:
        t_acts, t_idx = truncate_sparse(acts, indices, p)
        sparse = torch.zeros(acts.shape[0], W.shape[0]).scatter(1, t_idx, t_acts)
        torch.testing.assert_close(sparse @ W, naive_prefix_decode(acts, indices, W, p))
        assert (t_acts[t_idx >= p] == 0).all()


@settings(max_examples=40, deadline=None)
@given(sparse_codes())
def test_stop_gradient_keeps_values_and_confines_gradients(codes):
    acts, indices, W, sizes = codes
    levels = level_decodes(acts, indices, W, sizes)
    plain = cumulative_reconstructions(levels, stop_gradient=False)
    delta = cumulative_reconstructions(levels, stop_gradient=True)
    torch.testing.assert_close(delta, plain)

    # The loss of level l must only move the latents of level l.
    for level in range(len(sizes)):
        a = acts.clone().requires_grad_()
        recons = cumulative_reconstructions(
            level_decodes(a, indices, W, sizes), stop_gradient=True
        )
        recons[:, level].pow(2).sum().backward()
        lo = sizes[level - 1] if level else 0
        outside = (indices < lo) | (indices >= sizes[level])
        assert (a.grad[outside] == 0).all()


@settings(max_examples=40, deadline=None)
@given(sparse_codes(), st.integers(0, 2**31 - 1))
def test_prefix_specific_decoders_equal_naive(codes, seed):
    acts, indices, W, sizes = codes
    g = torch.Generator().manual_seed(seed)
    decoders = [torch.randn(p, W.shape[1], generator=g) for p in sizes]
    recons = prefix_decodes(acts, indices, decoders, sizes)
    for level, (p, W_p) in enumerate(zip(sizes, decoders)):
        padded = torch.cat([W_p, torch.zeros(W.shape[0] - p, W.shape[1])])
        torch.testing.assert_close(recons[:, level], naive_prefix_decode(acts, indices, padded, p))
