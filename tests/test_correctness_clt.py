"""Issue #13 on the plugin's CLT: AuxK trains only decoders; resume files are data, not code."""

import os

import pytest
import torch

from matryoshka_plugin.clt import CLTConfig, MatryoshkaCLT


@pytest.mark.parametrize("batch_topk", [False, True])
def test_auxk_trains_only_the_decoder(batch_topk):
    """AuxK's gradient w.r.t. every encoder is exactly zero, its decoder gradient is not."""
    torch.manual_seed(0)
    cfg = CLTConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[8, 16], batch_topk=batch_topk)
    clt = MatryoshkaCLT(8, [0, 1], cfg).train()
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_()
    x, y = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    codes = clt.encode(x)
    dead = torch.ones(2, 32, dtype=torch.bool)
    # forward() returns AuxK detached; its own term is what the gradient check needs.
    auxk = clt._auxk_loss(codes, y, torch.ones(2), dead)
    assert float(auxk) > 0
    auxk.backward()
    for s in range(2):
        assert clt.W_enc[s].grad is None or not clt.W_enc[s].grad.any(), s
        assert clt.b_enc[s].grad is None or not clt.b_enc[s].grad.any(), s
    assert clt.W_dec[0].grad.abs().sum() > 0
