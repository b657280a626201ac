"""BatchTopK padding never marks a latent as fired that did not fire (issue #13, item 4).

sparsify's trainer (and the CLT loop) count a latent as fired when its index appears in
``latent_indices``, whatever the value there. Padding must therefore only repeat latents
that really fired.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.core.batch_topk import batch_topk_encode, threshold_select


def batch_topk(pre, k):
    """BatchTopK of given non-negative pre-activations (an identity encoder)."""
    width = pre.shape[1]
    values, indices, _, min_kept = batch_topk_encode(pre, torch.eye(width), torch.zeros(width), k)
    return values, indices, min_kept


def _fired(pre_acts, values, indices):
    """Latents that hold a positive value in the (values, indices) output."""
    return set(indices[values > 0].tolist())


def test_empty_token_is_padded_with_a_latent_that_fired():
    # Token 1 has no positive pre-activation; token 0 holds the batch's 2 kept latents.
    pre = torch.zeros(2, 8)
    pre[0, 1], pre[0, 2] = 3.0, 2.0
    values, indices, _ = batch_topk(pre, k=1)
    assert values[1].eq(0).all()
    assert set(indices.flatten().tolist()) <= {1, 2}, indices


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6), st.integers(2, 12), st.integers(1, 4), st.floats(0.0, 0.9), st.integers(0, 2**16)
)
def test_every_index_in_the_output_fired(n_tokens, width, k, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    pre = torch.rand(n_tokens, width, generator=g)
    pre = pre * (torch.rand(n_tokens, width, generator=g) > sparsity)  # many zero rows
    for values, indices in (batch_topk(pre, k)[:2], threshold_select(pre, torch.tensor(0.5))):
        fired = _fired(pre, values, indices)
        if fired:
            assert set(indices.flatten().tolist()) <= fired
        # Padding never adds to a decode.
        dense = torch.zeros_like(pre).scatter_add_(1, indices, values)
        assert torch.equal(dense > 0, (dense > 0) & (pre > 0))
