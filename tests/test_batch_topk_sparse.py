"""The ragged BatchTopK encoder against the dense reference it replaced (issue #21).

The reference is the former implementation's definition: the k x tokens largest
entries of ``relu(x @ W.T + b)`` over the whole batch (positive ones only),
differentiated by plain autograd through the dense pre-activations. The fast path must
give the same kept values (exactly) and the same gradients for x, W and b.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.core.batch_topk import batch_topk_encode, batch_topk_indices


def dense_reference(x, W, b, k):
    pre = torch.relu(torch.nn.functional.linear(x, W, b))  # as the former encode_pre_acts
    n_keep = min(k * pre.shape[0], pre.numel())
    keep = torch.zeros(pre.numel(), dtype=torch.bool)
    keep[pre.flatten().topk(n_keep, sorted=False).indices] = True
    return pre * (keep.view_as(pre) & (pre > 0))


def as_dense(values, indices, width):
    return torch.zeros(values.shape[0], width, dtype=values.dtype).scatter_add(1, indices, values)


def leaves(seed, n, d, m, sparsity, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    W = torch.randn(m, d, generator=g, dtype=dtype)
    b = torch.randn(m, generator=g, dtype=dtype) - sparsity  # a negative bias: many zeros
    return [t.requires_grad_() for t in (x, W, b)], torch.randn(n, m, generator=g, dtype=dtype)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 12), st.integers(1, 6), st.integers(1, 20), st.integers(1, 5),
    st.floats(0.0, 4.0), st.integers(0, 2**16),
)
def test_values_and_gradients_equal_dense_autograd(n, d, m, k, sparsity, seed):
    (x, W, b), G = leaves(seed, n, d, m, sparsity)
    values, indices, pre_acts, min_kept = batch_topk_encode(x, W, b, k)
    got = as_dense(values, indices, m)
    ref = dense_reference(x, W, b, k)
    assert torch.equal(got.detach(), ref.detach())  # same entries, bit for bit
    assert not pre_acts.requires_grad
    if (ref > 0).any():
        assert float(min_kept.detach()) == float(ref[ref > 0].min())
    fast = torch.autograd.grad((got * G).sum(), (x, W, b))
    slow = torch.autograd.grad((ref * G).sum(), (x, W, b))
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 20), st.integers(1, 5), st.integers(0, 2**16))
def test_each_token_holds_its_kept_latents_in_ascending_order_then_padding(n, m, k, seed):
    (x, W, b), _ = leaves(seed, n, 4, m, 1.0)
    values, indices, _, _ = batch_topk_encode(x, W, b, k)
    for row_v, row_i in zip(values, indices):
        real = row_i[row_v > 0]
        assert torch.equal(real, real.sort().values)
        # real entries first: padding (value 0) only after them
        assert torch.equal(row_v > 0, torch.arange(len(row_v)) < len(real))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_gradients_keep_the_parameter_dtypes(dtype):
    (x, W, b), G = leaves(0, 16, 8, 32, 0.5, dtype=dtype)
    values, indices, _, _ = batch_topk_encode(x, W, b, 3)
    grads = torch.autograd.grad((as_dense(values, indices, 32) * G).sum(), (x, W, b))
    assert [g.dtype for g in grads] == [dtype] * 3


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 16), st.integers(1, 40), st.integers(1, 6), st.floats(0.0, 3.0),
    st.integers(0, 6), st.integers(0, 2**16),
)
def test_kept_set_equals_one_topk_over_the_flat_batch(n, m, k, skew, zeros, seed):
    # Skewed rows (one token far stronger) make rows hold many more than k, so the
    # deeper search runs; zeros make fewer positive entries than k x tokens.
    g = torch.Generator().manual_seed(seed)
    pre = torch.rand(n, m, generator=g, dtype=torch.float64) * torch.logspace(0, skew, n, dtype=torch.float64)[:, None]
    pre[:, : min(zeros, m)] = 0
    flat = pre.flatten()
    vals, idx = flat.topk(min(k * n, flat.numel()), sorted=False)
    expected = idx[vals > 0].sort().values
    assert torch.equal(batch_topk_indices(pre, k), expected)


def test_one_token_holding_the_whole_budget():
    pre = torch.rand(8, 64)
    pre[3] += 10  # token 3 beats every other entry: all 4 x 8 kept entries are its own
    idx = batch_topk_indices(pre, 4)
    assert torch.equal(idx, (3 * 64 + pre[3].topk(32).indices).sort().values)
