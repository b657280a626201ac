"""Path length of attribution graphs (evaluation.graph_paths): a hand-built graph with a
known answer, invariants on random DAGs, and the tiny model's pruned graphs against a
brute-force enumeration of their paths."""

from __future__ import annotations

import math

import pytest
import torch
from circuit_tracer.graph import prune_graph
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute_prefixes
from matryoshka_plugin.adapters.circuit_tracer.graph_files import score_rows
from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
from matryoshka_plugin.evaluation.graph_paths import (
    adjacency_path_length, embedding_nodes, logit_weights, path_length, pruned_adjacency,
)

from tiny import PROMPT, WIDTH, build_exported_transcoders

# Node order of the hand-built graph: f1, f2, emb, logit.
F1, F2, EMB, LOGIT = range(4)


def chain_with_shortcut(chain: float, direct: float) -> torch.Tensor:
    """emb -> f1 -> f2 -> logit (the last edge weighs ``chain``) plus emb -> logit
    (``direct``); rows are targets, columns sources."""
    a = torch.zeros(4, 4)
    a[F1, EMB] = 2.0
    a[F2, F1] = -0.25
    a[LOGIT, F2] = chain
    a[LOGIT, EMB] = direct
    return a


def test_hand_built_chain_and_shortcut():
    # The logit takes 3/4 of its input from the 3-step chain, 1/4 from the direct edge:
    # mean = 1/4 * 1 + 3/4 * 3 = 2.5; the two paths counted once: (1 + 3) / 2 = 2.
    weights = torch.tensor([0.0, 0.0, 0.0, 1.0])
    got = adjacency_path_length(chain_with_shortcut(-3.0, 1.0), slice(EMB, EMB + 1), weights)
    assert got.mean == pytest.approx(2.5)
    assert got.unweighted_mean == pytest.approx(2.0)
    assert got.by_length == pytest.approx((0.25, 0.0, 0.75))


def test_no_path_gives_nan():
    got = adjacency_path_length(torch.zeros(4, 4), slice(EMB, EMB + 1), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert math.isnan(got.mean) and math.isnan(got.unweighted_mean) and got.by_length == ()


def test_cycle_is_refused():
    a = chain_with_shortcut(1.0, 1.0)
    a[F1, F2] = 1.0
    with pytest.raises(ValueError, match="cycle"):
        adjacency_path_length(a, slice(EMB, EMB + 1), torch.tensor([0.0, 0.0, 0.0, 1.0]))


# -- invariants on random DAGs -----------------------------------------------------------

N_EMB, N_FEAT = 2, 5
N = N_EMB + N_FEAT + 1
EMBS = slice(0, N_EMB)


@st.composite
def dags(draw):
    """Random graphs in topological order: embeddings (no inputs), features, one logit;
    each node takes edges only from earlier nodes, and the logit has a direct edge from
    an embedding so that a path exists."""
    # No edge below 0.01 in size: circuit-tracer's normalisation leaves a node whose inputs
    # sum below 1e-10 unnormalised, so scaling is only an invariant above that.
    edge = st.one_of(st.just(0.0), st.floats(0.01, 2), st.floats(-2, -0.01))
    values = draw(st.lists(edge, min_size=N * N, max_size=N * N))
    a = torch.tensor(values, dtype=torch.float64).reshape(N, N).tril(-1)
    a[EMBS] = 0
    a[-1, 0] = draw(st.floats(0.1, 2))
    return a


WEIGHTS = torch.zeros(N, dtype=torch.float64)
WEIGHTS[-1] = 1.0


@settings(max_examples=60, deadline=None)
@given(dags())
def test_mean_is_at_least_one_and_shares_sum_to_one(a):
    got = adjacency_path_length(a, EMBS, WEIGHTS)
    assert 1 - 1e-12 <= got.mean <= N - 1
    assert 1 <= got.unweighted_mean <= N - 1
    assert sum(got.by_length) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(dags(), st.floats(1e-3, 1e3), st.floats(0.1, 10))
def test_invariant_to_scaling_all_edges(a, scale, logit_scale):
    got = adjacency_path_length(a, EMBS, WEIGHTS)
    scaled = adjacency_path_length(-scale * a, EMBS, logit_scale * WEIGHTS)
    assert scaled.mean == pytest.approx(got.mean, rel=1e-9)
    assert scaled.unweighted_mean == got.unweighted_mean


@settings(max_examples=60, deadline=None)
@given(dags(), st.floats(0, 10), st.floats(0, 10))
def test_growing_direct_edge_moves_mean_towards_one(a, w1, extra):
    def with_direct(w):
        b = a.clone()
        b[-1, 1] = w
        return adjacency_path_length(b, EMBS, WEIGHTS).mean

    small, large = with_direct(w1), with_direct(w1 + extra)
    assert 1 - 1e-12 <= large <= small + 1e-9
    assert with_direct(1e9) == pytest.approx(1.0, abs=1e-6)


# -- the tiny model's pruned graphs ----------------------------------------------------


def enumerated_mean(adjacency: torch.Tensor, embeddings: slice, weights: torch.Tensor) -> float:
    """The influence-weighted mean path length by walking every path from the logits back."""
    a = adjacency.double().abs()
    norm = a / a.sum(1, keepdim=True).clamp(min=1e-10)
    emb = set(range(embeddings.start, embeddings.stop))
    total = weighted = 0.0

    def walk(node, weight, steps):
        nonlocal total, weighted
        for src in torch.nonzero(norm[node]).flatten().tolist():
            w = weight * norm[node, src].item()
            if src in emb:
                total += w
                weighted += w * (steps + 1)
            walk(src, w, steps + 1)

    for logit in torch.nonzero(weights).flatten().tolist():
        walk(logit, weights[logit].item(), 0)
    return weighted / total


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    llama, tc = build_exported_transcoders(tmp_path_factory.mktemp("paths"))
    transcoders, _ = load_transcoders_dir(tc)
    model = load_local_replacement_model(llama, transcoders)
    return attribute_prefixes(PROMPT, model, [WIDTH, 8])


def test_tiny_model_graphs_at_two_prefix_lengths(tiny_graphs):
    for r in tiny_graphs:
        graph = r.graph
        node_mask, edge_mask, _ = prune_graph(graph)
        pruned = graph.adjacency_matrix * (edge_mask & node_mask[:, None] & node_mask[None, :])
        assert (pruned != graph.adjacency_matrix).any(), "pruning should drop something here"
        torch.testing.assert_close(pruned_adjacency(graph), pruned)
        embeddings = embedding_nodes(graph)
        # The layout circuit-tracer documents: the embeddings sit just before the logits.
        assert embeddings.stop == graph.adjacency_matrix.shape[0] - len(graph.logit_targets)
        got = path_length(graph)
        assert got.mean >= 1
        assert got.mean == pytest.approx(enumerated_mean(pruned, embeddings, logit_weights(graph)), rel=1e-9)
        # A two-layer model: at most emb -> layer-0 feature -> layer-1 feature -> logit.
        assert len(got.by_length) <= 3


def test_prefix_graphs_and_score_rows_carry_path_length(tiny_graphs):
    rows = score_rows(tiny_graphs, WIDTH, None)
    for r, row in zip(tiny_graphs, rows):
        assert r.path_length == path_length(r.graph)
        assert row["path_length"] == r.path_length.mean
