"""Decomposition links recover planted parent/child structure in a toy dictionary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from matryoshka_plugin.core.decomposition import (
    appears_at,
    coactivation_counts,
    decompose,
    decomposition_json,
)


def planted(n_parents: int, n_children: int, d: int, alpha: float, n_tokens: int, noise: float, seed: int):
    """Coarse latents 0..n_parents-1; fine latent j >= n_parents has parent (j - n_parents) % n_parents.

    A child's decoder row has cosine exactly ``alpha`` with its parent's; a child fires
    only on tokens where its parent fires; unrelated latents fire at rate ``noise``.
    """
    g = torch.Generator().manual_seed(seed)
    width = n_parents * (1 + n_children)
    parent_of = {j: (j - n_parents) % n_parents for j in range(n_parents, width)}
    W = torch.randn(width, d, generator=g)
    W = F.normalize(W, dim=-1)
    for j, p in parent_of.items():
        # The random part orthogonal to the parent: otherwise, in 48 dimensions, it alone
        # moves the child-parent cosine by about +-0.14, to near 0 for a small alpha.
        rest = F.normalize(W[j] - (W[j] @ W[p]) * W[p], dim=-1)
        W[j] = alpha * W[p] + (1 - alpha**2) ** 0.5 * rest
    active = torch.rand(n_tokens, width, generator=g) < noise
    token_parent = torch.randint(0, n_parents, (n_tokens,), generator=g)
    active[torch.arange(n_tokens), token_parent] = True
    for j, p in parent_of.items():
        fires = (token_parent == p) & (torch.rand(n_tokens, generator=g) < 0.5)
        active[:, j] = fires
    return W, active, parent_of, width


@settings(max_examples=25, deadline=None)
@given(
    n_parents=st.integers(2, 6),
    n_children=st.integers(1, 4),
    alpha=st.floats(0.3, 0.9),
    seed=st.integers(0, 10_000),
)
# Unorthogonalised, this child's decoder came out at cosine 0.002 to its parent.
@example(n_parents=2, n_children=1, alpha=0.3125, seed=2523)
def test_links_agree_with_planted_hierarchy(n_parents, n_children, alpha, seed):
    # The invariant: a child at cosine alpha >= 0.3 to its parent that fires only where
    # the parent fires (overlap 1) outscores, as |cosine| * overlap, every latent that
    # co-fires with it only at the noise rate (overlap about 0.01, |cosine| <= 1). A child
    # whose decoder is orthogonal to its parent is no refinement of it, whatever the
    # co-activation says, so the planted children are given exactly cosine alpha.
    W, active, parent_of, width = planted(n_parents, n_children, 48, alpha, 600, 0.01, seed)
    feats = list(range(width))
    both, count = coactivation_counts(active.split(128), torch.tensor(feats), width)
    res = decompose(W, feats, [n_parents], both=both, count=count, top_k=n_children)
    for p in range(n_parents):
        kids = {j for j, q in parent_of.items() if q == p}
        got = res[p]["children"][n_parents]
        assert {l.feature for l in got} == kids
        assert all(l.appears_at == width for l in got)
        assert res[p]["parents"] == []  # coarse latents have no coarser level
        assert res[p]["appears_at"] == n_parents
    for j, p in parent_of.items():
        assert res[j]["parents"][0].feature == p
        assert res[j]["parents"][0].appears_at == n_parents
        assert res[j]["children"] == {}  # nothing lies beyond the last level
        assert res[j]["appears_at"] == width


@settings(max_examples=15, deadline=None)
@given(n_parents=st.integers(2, 5), n_children=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_cosine_alone_recovers_strong_planted_parents(n_parents, n_children, seed):
    W, _, parent_of, width = planted(n_parents, n_children, 256, 0.8, 10, 0.0, seed)
    res = decompose(W, list(parent_of), [n_parents], top_k=1)
    for j, p in parent_of.items():
        link = res[j]["parents"][0]
        assert link.feature == p and link.coactivation is None
        assert link.cosine == pytest.approx(float(F.cosine_similarity(W[j], W[p], dim=0)), abs=1e-6)


@given(seed=st.integers(0, 1000), t=st.integers(1, 40), width=st.integers(2, 12))
@settings(max_examples=30, deadline=None)
def test_coactivation_counts_match_brute_force(seed, t, width):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(t, width, generator=g) < 0.4
    feats = torch.arange(0, width, 2)
    both, count = coactivation_counts(active.split(7), feats, width)
    for a, i in enumerate(feats.tolist()):
        for j in range(width):
            assert both[a, j] == sum(bool(active[r, i] and active[r, j]) for r in range(t))
    assert count.tolist() == active.sum(0).double().tolist()


def test_children_per_prefix_only_reach_beyond_that_prefix():
    W = torch.randn(16, 8)
    res = decompose(W, [1, 5, 11], [4, 8], top_k=16)
    assert set(res[1]["children"]) == {4, 8}
    for p, links in res[1]["children"].items():
        assert links and all(l.feature >= p for l in links)
        assert len(links) == 16 - p
    assert set(res[5]["children"]) == {8}
    assert all(l.feature < 4 for l in res[5]["parents"]) and len(res[5]["parents"]) == 4
    assert all(l.feature < 8 for l in res[11]["parents"]) and len(res[11]["parents"]) == 8
    assert [appears_at(i, [4, 8, 16]) for i in (0, 3, 4, 7, 8, 15)] == [4, 4, 8, 8, 16, 16]
    js = decomposition_json(res)
    assert js["5"]["children"]["8"][0]["appears_at"] == 16


def test_bad_input_names_the_value():
    W = torch.randn(8, 4)
    with pytest.raises(ValueError, match="0..7"):
        decompose(W, [8], [4])
    with pytest.raises(ValueError, match="1..8"):
        decompose(W, [1], [0, 4])
    with pytest.raises(ValueError, match="neither"):
        decompose(W, [1], [4], both=torch.zeros(1, 8))
