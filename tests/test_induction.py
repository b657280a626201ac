"""Induction measurements (evaluation.induction) on the tiny Llama with its attention forced
to copy from a known position: the graph and the intervention must both find that
position and nothing at the positions the last one cannot see."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute_prefixes
from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
from matryoshka_plugin.core.errors import UsageError
from matryoshka_plugin.evaluation.induction import ablation_drop, graph_share, induction_prompt

from tiny import WIDTH, WORDS, build_exported_transcoders

# The word-level tokenizer of tiny.build_tiny_llama: <pad>, <bos>, <eos>, then WORDS.
VOCAB = range(3, 3 + len(WORDS))
N, M = 6, 3


def load_model(root):
    llama, tc = build_exported_transcoders(root)
    transcoders, _ = load_transcoders_dir(tc)
    return load_local_replacement_model(llama, transcoders)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tmp_path_factory.mktemp("induction"))


@pytest.fixture(scope="module")
def copying_model(tmp_path_factory):
    """A model of its own with every position attending to itself only, except the last,
    which splits its attention between itself and r_{m+1}'s earlier position, in every
    layer and head: a copy from one known position. Permanent hooks, so that
    circuit-tracer's attribution (which resets the others) runs with them."""
    model = load_model(tmp_path_factory.mktemp("copying"))
    source = M + 1

    def force(pattern, hook):
        forced = torch.eye(pattern.shape[-1], dtype=pattern.dtype).expand_as(pattern).clone()
        forced[:, :, -1, -1] = 0.5
        forced[:, :, -1, source] = 0.5
        return forced

    for layer in range(model.cfg.n_layers):
        model.add_hook(f"blocks.{layer}.attn.hook_pattern", force, is_permanent=True)
    return model, source


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, len(WORDS)), st.data())
def test_prompt_repeats_the_first_m_tokens(model, seed, n, data):
    m = data.draw(st.integers(1, n - 1))
    p = induction_prompt(model, VOCAB, n, m, torch.Generator().manual_seed(seed))
    first, second = p.tokens[1: n + 1], p.tokens[n + 1:]
    assert len(set(first.tolist())) == n and set(first.tolist()) <= set(VOCAB)
    assert second.tolist() == first[:m].tolist()
    # The earlier occurrence: r_m just before r_{m+1}, the token to predict.
    assert p.tokens[p.sources[0]] == p.tokens[-1] and p.tokens[p.sources[1]] == p.target


def test_bad_prompt_sizes_are_refused(model):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(UsageError, match="m=6"):
        induction_prompt(model, VOCAB, 6, 6, gen)
    with pytest.raises(UsageError, match="vocabulary of at least"):
        induction_prompt(model, VOCAB, len(WORDS) + 1, 2, gen)


def test_graph_and_ablation_find_the_copied_position(copying_model):
    model, source = copying_model
    p = induction_prompt(model, VOCAB, N, M, torch.Generator().manual_seed(1))
    assert p.sources[1] == source
    last = len(p.tokens) - 1
    unseen = [q for q in range(last) if q != source]
    graphs = attribute_prefixes(p.tokens, model, [WIDTH, 8], attribution_targets=torch.tensor([p.target]))
    for r in graphs:
        at_source = graph_share(r.graph, p.target, [source])
        elsewhere = graph_share(r.graph, p.target, unseen)
        everywhere = graph_share(r.graph, p.target, range(last + 1))
        assert at_source.tokens > 0 and at_source.position >= at_source.tokens
        # The last position sees only itself and the source: no influence from the rest.
        assert elsewhere.position == pytest.approx(0, abs=1e-9)
        assert everywhere.position == pytest.approx(1)
    # The real (forced) model agrees: switching off attention to the source moves the
    # logit; switching it off to any other position does nothing.
    assert ablation_drop(model, p.tokens, p.target, [source]).relative != pytest.approx(0, abs=1e-3)
    unseen_drop = ablation_drop(model, p.tokens, p.target, unseen)
    assert unseen_drop.ablated == pytest.approx(unseen_drop.clean, abs=1e-5)


def test_share_of_a_token_that_is_not_a_target_is_refused(model):
    p = induction_prompt(model, VOCAB, N, M, torch.Generator().manual_seed(1))
    graph = attribute_prefixes(p.tokens, model, [WIDTH], attribution_targets=torch.tensor([p.target]))[0].graph
    other = next(t for t in VOCAB if t != p.target)
    with pytest.raises(UsageError, match=f"token {other} is not a logit target"):
        graph_share(graph, other, p.sources)
