"""The nested cross-layer loss against a dense naive reference, and the CLT against sparsify."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify import SparseCoder, SparseCoderConfig

from matryoshka_plugin.clt import CLTConfig, MatryoshkaCLT, load_clt, save_clt
from matryoshka_plugin.adapters.sparsify import (
    MatryoshkaSparseCoder,
    MatryoshkaSparseCoderConfig,
)
from matryoshka_plugin.core.cross_layer import (
    cross_layer_nested_fvu,
    cross_layer_recons,
    gather_targets,
    source_level_decodes,
    source_prefix_decodes,
    target_level_decodes,
)

DT = torch.float64


def dense(top_acts, top_indices, M):
    return torch.zeros(top_acts.shape[0], M, dtype=top_acts.dtype).scatter_add(
        1, top_indices, top_acts
    )


def naive_loss(acts, W_dec, b_dec, y, sizes, weights, stop_gradient, W_dec_prefix=None):
    """Dense, loop-by-loop Matryoshka CLT loss and FVU [L, levels].

    ``W_dec_prefix[s][l]`` (optional) is the decoder of source s used for prefix level l.
    """
    L, M = len(W_dec), W_dec[0].shape[0]
    idx = torch.arange(M)
    fvu = torch.zeros(L, len(sizes), dtype=DT)
    loss = 0
    for j in range(L):
        tv = (y[:, j] - y[:, j].mean(0)).pow(2).sum()
        prev = None
        for lvl, size in enumerate(sizes):
            lo = sizes[lvl - 1] if lvl else 0
            recon = b_dec[j].expand_as(y[:, j])
            if W_dec_prefix is not None:
                for s in range(j + 1):
                    recon = recon + (acts[s] * (idx < size)) @ W_dec_prefix[s][lvl][:, j - s]
            elif stop_gradient:
                # Earlier levels' latents are detached; the bias is not.
                own = sum(
                    (acts[s] * ((idx >= lo) & (idx < size))) @ W_dec[s][:, j - s]
                    for s in range(j + 1)
                )
                recon = recon + own + (prev.detach() if prev is not None else 0)
                prev = own if prev is None else prev + own
            else:
                for s in range(j + 1):
                    recon = recon + (acts[s] * (idx < size)) @ W_dec[s][:, j - s]
            f = (y[:, j] - recon).pow(2).sum() / tv
            fvu[j, lvl] = f.detach()
            loss = loss + weights[lvl] * f
    return loss, fvu


@st.composite
def problems(draw):
    L = draw(st.integers(1, 3))
    N = draw(st.integers(2, 6))
    M = draw(st.integers(2, 10))
    k = draw(st.integers(1, M))
    d = draw(st.integers(1, 4))
    inner = draw(st.lists(st.integers(0, M - 1), max_size=4, unique=True))
    sizes = sorted(inner) + [M]
    seed = draw(st.integers(0, 2**16))
    return L, N, M, k, d, sizes, seed


def make_inputs(L, N, M, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    top_idx = [torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(N)]) for _ in range(L)]
    top_acts = [torch.rand(N, k, generator=g, dtype=DT).requires_grad_() for _ in range(L)]
    W_dec = [torch.randn(M, L - s, d, generator=g, dtype=DT).requires_grad_() for s in range(L)]
    b_dec = torch.randn(L, d, generator=g, dtype=DT).requires_grad_()
    y = torch.randn(N, L, d, generator=g, dtype=DT)
    return top_acts, top_idx, W_dec, b_dec, y


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@settings(max_examples=60, deadline=None)
@given(problems(), st.booleans())
def test_nested_loss_matches_dense_reference(problem, stop_gradient):
    L, N, M, k, d, sizes, seed = problem
    top_acts, top_idx, W_dec, b_dec, y = make_inputs(L, N, M, k, d, seed)
    weights = torch.rand(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()

    summed = target_level_decodes(top_acts, top_idx, W_dec, sizes)
    recons = cross_layer_recons(summed, b_dec, stop_gradient=stop_gradient)
    loss, fvu = cross_layer_nested_fvu(recons, y, weights)

    acts = [dense(a, i, M) for a, i in zip(top_acts, top_idx)]
    ref_loss, ref_fvu = naive_loss(acts, W_dec, b_dec, y, sizes, weights, stop_gradient)

    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(fvu, ref_fvu)
    params = [*W_dec, b_dec, *top_acts]
    for g, r in zip(grads(loss, params), grads(ref_loss, params)):
        torch.testing.assert_close(g, r)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_target_decode_equals_per_source_decodes_summed(problem):
    # The per-target layout must give the per-source decodes' numbers, level by level.
    L, N, M, k, d, sizes, seed = problem
    top_acts, top_idx, W_dec, _, _ = make_inputs(L, N, M, k, d, seed)
    per_source = [source_level_decodes(a, i, W, sizes) for a, i, W in zip(top_acts, top_idx, W_dec)]
    torch.testing.assert_close(
        target_level_decodes(top_acts, top_idx, W_dec, sizes), gather_targets(per_source, L)
    )


@settings(max_examples=40, deadline=None)
@given(problems())
def test_prefix_specific_decoders_match_dense_reference(problem):
    L, N, M, k, d, sizes, seed = problem
    top_acts, top_idx, W_dec, b_dec, y = make_inputs(L, N, M, k, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    W_pre = [
        [torch.randn(max(size, 1), L - s, d, generator=g, dtype=DT).requires_grad_() for size in sizes]
        for s in range(L)
    ]
    weights = [1 / len(sizes)] * len(sizes)
    per_source = [
        source_prefix_decodes(a, i, [W[: max(sz, 0)] for W, sz in zip(W_pre[s], sizes)], sizes)
        for s, (a, i) in enumerate(zip(top_acts, top_idx))
    ]
    recons = cross_layer_recons(gather_targets(per_source, len(W_pre)), b_dec, stop_gradient=False, cumulative=False)
    loss, fvu = cross_layer_nested_fvu(recons, y, weights)

    acts = [dense(a, i, M) for a, i in zip(top_acts, top_idx)]
    padded = [
        [torch.cat([W[:sz], W.new_zeros(M - sz, *W.shape[1:])]) for W, sz in zip(W_pre[s], sizes)]
        for s in range(L)
    ]
    ref_loss, ref_fvu = naive_loss(acts, W_dec, b_dec, y, sizes, weights, False, padded)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(fvu, ref_fvu)
    params = [W for Ws in W_pre for W in Ws] + [b_dec, *top_acts]
    for g_, r in zip(grads(loss, params), grads(ref_loss, params)):
        if g_ is None or r is None:
            assert (g_ is None or not g_.any()) and (r is None or not r.any())
        else:
            torch.testing.assert_close(g_, r)


def random_clt(cfg, d=6, layers=(0, 1, 2), seed=0):
    torch.manual_seed(seed)
    clt = MatryoshkaCLT(d, list(layers), cfg, dtype=DT)
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_()
        clt.b_dec.normal_()
        for b in clt.b_enc:
            b.normal_(std=0.1)
    return clt


def test_module_forward_matches_reference_on_its_own_codes():
    cfg = CLTConfig(matryoshka=True, num_latents=16, k=3, nested_sizes=[2, 7], stop_gradient=True)
    clt = random_clt(cfg).train()
    x, y = torch.randn(20, 3, 6, dtype=DT), torch.randn(20, 3, 6, dtype=DT)
    out = clt(x, y)
    codes = clt.encode(x)
    acts = [dense(c.top_acts, c.top_indices, 16) for c in codes]
    ref_loss, ref_fvu = naive_loss(acts, list(clt.W_dec), clt.b_dec, y, out.sizes, [1 / 3] * 3, True)
    torch.testing.assert_close(out.loss, ref_loss)
    torch.testing.assert_close(out.level_fvu, ref_fvu)


def test_prefix_full_is_the_plain_clt_loss():
    cfg_m = CLTConfig(matryoshka=True, num_latents=16, k=3, nested_sizes=[2, 7])
    cfg_p = CLTConfig(matryoshka=False, num_latents=16, k=3)
    clt_m, clt_p = random_clt(cfg_m), random_clt(cfg_p)
    clt_p.load_state_dict(clt_m.state_dict())
    x, y = torch.randn(20, 3, 6, dtype=DT), torch.randn(20, 3, 6, dtype=DT)
    full = clt_m.train()(x, y, sizes=[16])
    plain = clt_p.train()(x, y)
    torch.testing.assert_close(full.loss, plain.loss)
    # And the plain loss is the sum over targets of sparsify's FVU of the full reconstruction.
    recon = clt_p.reconstruct(x)
    fvu = ((y - recon).pow(2).sum(dim=(0, 2)) / (y - y.mean(0)).pow(2).sum(dim=(0, 2)))
    torch.testing.assert_close(plain.loss, fvu.sum())
    torch.testing.assert_close(plain.fvu, fvu)
    # The nested loss's last level is that same full FVU.
    nested = clt_m.train()(x, y)
    torch.testing.assert_close(nested.level_fvu[:, -1], fvu)
    assert not torch.allclose(nested.loss, plain.loss)


@pytest.mark.parametrize("matryoshka", [False, True])
def test_one_layer_clt_equals_sparsify_transcoder(matryoshka):
    d, M, k = 8, 24, 4
    torch.manual_seed(1)
    if matryoshka:
        sc_cfg = MatryoshkaSparseCoderConfig(
            matryoshka=True, num_latents=M, k=k, transcode=True, nested_sizes=[3, 10]
        )
        coder = MatryoshkaSparseCoder(d, sc_cfg, dtype=DT)
    else:
        coder = SparseCoder(d, SparseCoderConfig(num_latents=M, k=k, transcode=True), dtype=DT)
    with torch.no_grad():
        coder.W_dec.normal_()
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(std=0.1)
    clt = MatryoshkaCLT(
        d, [5], CLTConfig(matryoshka=matryoshka, num_latents=M, k=k, nested_sizes=[3, 10] if matryoshka else []),
        dtype=DT,
    )
    with torch.no_grad():
        clt.W_enc[0].copy_(coder.encoder.weight)
        clt.b_enc[0].copy_(coder.encoder.bias)
        clt.W_dec[0][:, 0].copy_(coder.W_dec)
        clt.b_dec[0].copy_(coder.b_dec)
    x, y = torch.randn(30, d, dtype=DT), torch.randn(30, d, dtype=DT)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    coder.train(), clt.train()
    ref = coder(x, y, dead_mask=dead)
    out = clt(x[:, None], y[:, None], dead_mask=dead[None])
    torch.testing.assert_close(out.recon[:, 0], ref.sae_out)
    torch.testing.assert_close(out.auxk_loss, ref.auxk_loss.detach())
    torch.testing.assert_close(out.loss, ref.fvu + clt.cfg.auxk_alpha * ref.auxk_loss)
    g_ref = torch.autograd.grad(ref.fvu + clt.cfg.auxk_alpha * ref.auxk_loss, [coder.encoder.weight, coder.W_dec])
    g_clt = torch.autograd.grad(out.loss, [clt.W_enc[0], clt.W_dec[0]])
    torch.testing.assert_close(g_clt[0], g_ref[0])
    torch.testing.assert_close(g_clt[1][:, 0], g_ref[1])


def test_plain_narrow_clt_has_one_level(tmp_path):
    # Group fractions only apply with matryoshka=True; a width-8 plain CLT must build,
    # and save and load as one level.
    clt = MatryoshkaCLT(4, [0, 1], CLTConfig(num_latents=8, k=2))
    assert clt.nested_sizes == [8]
    assert clt.step_sizes() == [8]
    assert load_clt(save_clt(clt, tmp_path / "clt")).nested_sizes == [8]
