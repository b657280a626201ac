"""Prefix graphs derived from one finer attribution against direct attribution at each
prefix length (circuit-tracer 0.5.0, CPU): node for node and edge for edge."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute, attribute_prefixes
from matryoshka_plugin.adapters.circuit_tracer.derived_graphs import recording_error_deltas

# Module fixtures shared with the attribution tests (a tiny Llama, its exported
# per-layer transcoders, and two circuit-tracer CLTs).
from test_circuit_tracer import clt_models, export_dir, llama_dir, plt_model, run_dir  # noqa: F401
from tiny import NESTED, PROMPT, WIDTH

SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LADDERS = st.lists(st.one_of(st.none(), st.integers(1, WIDTH)), min_size=2, max_size=4, unique=True)


def assert_same_graph(derived, direct):
    assert torch.equal(derived.active_features, direct.active_features)
    assert torch.equal(derived.activation_values, direct.activation_values)
    assert torch.equal(derived.selected_features, direct.selected_features)
    assert derived.logit_targets == direct.logit_targets
    assert torch.equal(derived.logit_probabilities, direct.logit_probabilities)
    assert derived.adjacency_matrix.shape == direct.adjacency_matrix.shape
    # Float sums in another order: e.J.(e + D) against e.J.e + e.J.D.
    torch.testing.assert_close(derived.adjacency_matrix, direct.adjacency_matrix, atol=2e-5, rtol=1e-4)


def check_derived_equals_direct(model, ladder):
    tokens = model.ensure_tokenized(PROMPT)
    derived = attribute_prefixes(tokens, model, ladder)
    direct = attribute_prefixes(tokens, model, ladder, derive=False)
    finest = max(ladder, key=lambda p: WIDTH if p is None else p)
    assert [r.prefix_len for r in derived] == list(ladder)
    for d, a in zip(derived, direct):
        assert d.derived == (d.prefix_len != finest) and not a.derived
        assert_same_graph(d.graph, a.graph)
        assert d.replacement == pytest.approx(a.replacement, abs=1e-5)
        assert d.completeness == pytest.approx(a.completeness, abs=1e-5)


@SETTINGS
@given(ladder=LADDERS)
def test_derived_equals_direct_per_layer(plt_model, ladder):
    check_derived_equals_direct(plt_model, ladder)


@pytest.mark.parametrize("kind", ["relu", "jumprelu"])
@SETTINGS
@given(ladder=LADDERS)
def test_derived_equals_direct_clt(clt_models, kind, ladder):
    check_derived_equals_direct(clt_models[kind], ladder)


def test_one_attribution_serves_every_prefix(plt_model):
    calls = []
    plain = plt_model.run_forward_pass

    def counting(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    plt_model.run_forward_pass = counting
    try:
        attribute_prefixes(PROMPT, plt_model, [None, NESTED[1], NESTED[0], 2])
    finally:
        del plt_model.run_forward_pass
    assert len(calls) == 1


def test_per_layer_deltas_are_the_removed_columns(plt_model):
    """For per-layer transcoders, what the hooks record is the sum of the removed features'
    columns into their own layer's and position's error node: the merge in the finer graph."""
    tokens = plt_model.ensure_tokenized(PROMPT)
    p = NESTED[0]
    with recording_error_deltas(plt_model, [p]) as recorder:
        graph = attribute(tokens, plt_model)
    deltas, why_not = recorder.error_deltas(graph)
    assert why_not == ""
    layer, pos, latent = graph.active_features.T
    removed = torch.nonzero(latent >= p).flatten()
    assert len(removed) > 0
    merged = torch.zeros_like(deltas[p])
    merged.index_add_(1, layer[removed] * graph.n_pos + pos[removed], graph.adjacency_matrix[:, removed])
    torch.testing.assert_close(deltas[p], merged, atol=2e-5, rtol=1e-4)


def test_pruning_falls_back_to_direct_attribution(plt_model):
    tokens = plt_model.ensure_tokenized(PROMPT)
    ladder = [None, NESTED[0]]
    with pytest.warns(UserWarning, match=r"attributed directly.*max_feature_nodes pruned the finer graph to 3 of"):
        results = attribute_prefixes(tokens, plt_model, ladder, max_feature_nodes=3)
    direct = attribute(tokens, plt_model, prefix_len=NESTED[0], max_feature_nodes=3)
    assert not any(r.derived for r in results)
    assert torch.equal(results[1].graph.adjacency_matrix, direct.adjacency_matrix)
    assert torch.equal(results[1].graph.selected_features, direct.selected_features)


def test_cli_prefix_len_derives_and_says_when_it_cannot(tmp_path):
    from circuit_tracer.graph import Graph

    from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
    from matryoshka_plugin.cli.circuit_tracer import main
    from tiny import build_exported_transcoders

    llama, tc = build_exported_transcoders(tmp_path)
    argv = ["attribute", "--model", str(llama), "--transcoder_set", str(tc), "-p", PROMPT, "--prefix-len"]
    main([*argv, str(WIDTH), str(NESTED[0]), "-o", str(tmp_path / "g.pt")])
    saved = Graph.from_pt(str(tmp_path / f"g-p{NESTED[0]}.pt"))
    model = load_local_replacement_model(llama, load_transcoders_dir(tc)[0])
    assert_same_graph(saved, attribute(PROMPT, model, prefix_len=NESTED[0]))
    with pytest.warns(UserWarning, match="attributed directly, not derived"):
        main([*argv, str(WIDTH), "2", "--max_feature_nodes", "2", "-o", str(tmp_path / "h.pt")])
