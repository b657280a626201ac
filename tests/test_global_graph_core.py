"""Global graph core: sparse virtual weights / ERA / TWERA against dense references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.core.edge_scores import (
    CoactivationStats,
    dense_era_reference,
    era_edges,
    topk_per_source,
    virtual_weight_topk,
)
from matryoshka_plugin.core.errors import GlobalGraphError


def _sparse_codes(dense: torch.Tensor, k: int):
    acts, idx = dense.topk(k, dim=1)
    return acts, idx


def _topk_dense(x: torch.Tensor, k: int) -> torch.Tensor:
    acts, idx = x.relu().topk(k, dim=1)
    return torch.zeros_like(x).scatter(1, idx, acts)


@settings(max_examples=20, deadline=None)
@given(
    n_src=st.integers(1, 24),
    n_tgt=st.integers(1, 24),
    d=st.integers(1, 8),
    k=st.integers(1, 30),
    p=st.integers(1, 24),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_virtual_weight_topk_matches_dense(n_src, n_tgt, d, k, p, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(n_src, d, generator=g, dtype=torch.float64)
    enc = torch.randn(n_tgt, d, generator=g, dtype=torch.float64)
    p = min(p, n_src)
    src, tgt, w = virtual_weight_topk(dec, enc, prefix_len=p, k=k, chunk=chunk)
    dense = dec @ enc.T
    torch.testing.assert_close(w, dense[src, tgt])
    assert (src < p).all() and (tgt < min(p, n_tgt)).all()
    sub = dense[:p, : min(p, n_tgt)].abs()
    kk = min(k, sub.shape[1])
    # Each source keeps exactly its kk largest |V| (ties allowed by value).
    for i in range(p):
        kept = w[src == i].abs().sort(descending=True).values
        want = sub[i].sort(descending=True).values[:kk]
        torch.testing.assert_close(kept, want)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 40),
    w_a=st.integers(2, 12),
    w_b=st.integers(2, 12),
    k=st.integers(1, 4),
    d=st.integers(1, 6),
    flush=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_era_twera_match_dense_reference(n, w_a, w_b, k, d, flush, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(k, w_a, w_b)
    dense = {0: _topk_dense(torch.randn(n, w_a, generator=g), k), 1: _topk_dense(torch.randn(n, w_b, generator=g), k)}
    dec = torch.randn(w_a, d, generator=g, dtype=torch.float64)
    enc = torch.randn(w_b, d, generator=g, dtype=torch.float64)
    stats = CoactivationStats({0: w_a, 1: w_b}, flush_every=flush)
    # Two updates: the running merge must equal one pass over everything.
    half = n // 2
    for part in (slice(0, half), slice(half, n)):
        stats.update({l: _sparse_codes(dense[l][part], k) for l in dense})
    v, era, twera = dense_era_reference(dense, 0, 1, dec, enc)
    e = era_edges(stats, 0, 1, dec, enc, k=None, threshold=-1.0)
    co = (dense[0].T > 0).double() @ (dense[1] > 0).double()
    # Exactly the co-active pairs, with the dense scores.
    assert e.source.numel() == int((co > 0).sum())
    torch.testing.assert_close(e.virtual_weight, v[e.source, e.target])
    torch.testing.assert_close(e.era, era[e.source, e.target])
    torch.testing.assert_close(e.twera, twera[e.source, e.target])
    torch.testing.assert_close(e.coactive_count.double(), co[e.source, e.target])


def test_era_recovers_planted_coactivation_edges():
    """Pairs planted to fire together (and aligned decoder->encoder) come out on top,
    although unrelated pairs with larger virtual weights exist that never co-occur."""
    g = torch.Generator().manual_seed(0)
    width, d, n = 64, 32, 3000
    dec = torch.nn.functional.normalize(torch.randn(width, d, generator=g), dim=1)
    enc = torch.nn.functional.normalize(torch.randn(width, d, generator=g), dim=1)
    planted = {(3, 10), (7, 2), (20, 33), (41, 5)}
    for i, j in planted:
        enc[j] = 0.5 * dec[i] + 0.5 * enc[j]
    # Decoys: huge virtual weights between features that never fire together.
    decoys = {(50, 60), (51, 61)}
    for i, j in decoys:
        enc[j] = 3 * dec[i]
    a = torch.zeros(n, width)
    b = torch.zeros(n, width)
    for t in range(n):
        i, j = sorted(planted)[t % len(planted)]
        a[t, i] = 1 + torch.rand(1, generator=g).item()
        b[t, j] = 1 + torch.rand(1, generator=g).item()
        # Background noise features, never the decoy pairs together.
        a[t, torch.randint(0, 40, (1,), generator=g)] += 0.1
        b[t, torch.randint(0, 40, (1,), generator=g)] += 0.1
    # Decoys fire on extra tokens of their own, sources and targets never together.
    extra = torch.zeros(400, width)
    a = torch.cat([a, extra, extra])
    b = torch.cat([b, extra, extra])
    a[n : n + 400, [50, 51]] = 1.0
    b[n + 400 :, [60, 61]] = 1.0
    n = a.shape[0]
    stats = CoactivationStats({0: width, 1: width})
    for part in torch.arange(n).split(500):
        stats.update({0: _sparse_codes(a[part], 4), 1: _sparse_codes(b[part], 4)})
    for rank_by in ("era", "twera"):
        e = era_edges(stats, 0, 1, dec, enc, k=None, rank_by=rank_by)
        top = {(int(s), int(t)) for s, t in zip(e.source[:4], e.target[:4])}
        assert top == planted, rank_by
        assert not any((int(s), int(t)) in decoys for s, t in zip(e.source, e.target))
    # Plain virtual weights rank the decoys first: the corpus weighting is what removes them.
    src, tgt, _ = virtual_weight_topk(dec, enc, k=1)
    vw_top = {(int(s), int(t)) for s, t in zip(src, tgt)}
    assert decoys <= vw_top


def test_prefix_restriction_keeps_only_pairs_inside_prefix():
    g = torch.Generator().manual_seed(1)
    n, w, d = 200, 16, 8
    dense = {0: _topk_dense(torch.randn(n, w, generator=g), 3), 1: _topk_dense(torch.randn(n, w, generator=g), 3)}
    dec, enc = torch.randn(w, d, generator=g), torch.randn(w, d, generator=g)
    stats = CoactivationStats({0: w, 1: w})
    stats.update({l: _sparse_codes(dense[l], 3) for l in dense})
    full = era_edges(stats, 0, 1, dec, enc, k=None, threshold=-1)
    for p in (1, 4, 9, 16):
        e = era_edges(stats, 0, 1, dec, enc, prefix_len=p, k=None, threshold=-1)
        assert (e.source < p).all() and (e.target < p).all()
        inside = (full.source < p) & (full.target < p)
        assert e.source.numel() == int(inside.sum())
        got = dict(zip(zip(e.source.tolist(), e.target.tolist()), e.twera.tolist()))
        want = dict(zip(zip(full.source[inside].tolist(), full.target[inside].tolist()), full.twera[inside].tolist()))
        assert got == pytest.approx(want)


def test_topk_per_source_keeps_k_largest_per_group():
    source = torch.tensor([0, 0, 0, 1, 1, 2])
    score = torch.tensor([0.1, -3.0, 2.0, 0.5, -0.2, 0.05])
    keep = topk_per_source(source, score, k=2, threshold=0.07)
    assert sorted(keep.tolist()) == [1, 2, 3, 4]
    keep = topk_per_source(source, score, k=1, threshold=0.0)
    assert sorted(keep.tolist()) == [1, 3, 5]


def test_bad_inputs_raise_one_line_errors():
    stats = CoactivationStats({0: 8, 1: 8})
    dec = enc = torch.randn(8, 4)
    with pytest.raises(GlobalGraphError, match="no tokens"):
        era_edges(stats, 0, 1, dec, enc)
    stats.update({0: (torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)), 1: (torch.ones(2, 1), torch.ones(2, 1, dtype=torch.long))})
    for p in (0, 9, -1):
        with pytest.raises(GlobalGraphError, match=r"out of range; allowed: 1\.\.8"):
            era_edges(stats, 0, 1, dec, enc, prefix_len=p)
    with pytest.raises(GlobalGraphError, match="not an ordered pair"):
        era_edges(stats, 1, 0, dec, enc)
    with pytest.raises(GlobalGraphError, match="rank_by"):
        era_edges(stats, 0, 1, dec, enc, rank_by="bogus")
    with pytest.raises(GlobalGraphError, match="expected"):
        stats.update({0: (torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))})
