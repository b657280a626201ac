"""Issue #15 part 1: supernodes from the Matryoshka nesting (properties, a planted
hierarchy, and the attribute CLI writing them)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.adapters.circuit_tracer.hierarchy import (
    assign_parents,
    feature_nodes,
    hierarchy_sidecar,
    with_supernodes,
)
from matryoshka_plugin.core.decomposition import coactivation_counts

from test_viewer_decomposition import planted


def graph_json(nodes: list[tuple[int, int, int]]) -> dict:
    """A graph file as circuit-tracer writes it: feature nodes, an error node, a few links."""
    feats = [
        {"node_id": f"{l}_{f}_{p}", "feature_type": "cross layer transcoder", "layer": str(l), "ctx_idx": p}
        for l, f, p in nodes
    ]
    error = {"node_id": "0_1_2", "feature_type": "mlp reconstruction error", "layer": "1", "ctx_idx": 2}
    ids = [n["node_id"] for n in feats] + [error["node_id"]]
    links = [{"source": a, "target": b, "weight": 0.5} for a, b in zip(ids, ids[1:])]
    return {
        "metadata": {"slug": "g-p16", "node_threshold": 0.8},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": [*feats, error],
        "links": links,
    }


def sidecar_for(g: dict, W: dict[int, torch.Tensor], coarse: int, p: int, activity=None) -> dict:
    parents = {}
    for layer in {l for _, l, _, _ in feature_nodes(g)}:
        kids = sorted({f for _, l, f, _ in feature_nodes(g) if l == layer and f >= coarse})
        if not kids:
            continue
        both = count = None
        if activity is not None:
            both, count = coactivation_counts([activity[layer]], torch.tensor(kids), W[layer].shape[0])
        parents[layer] = assign_parents(W[layer], kids, coarse, both=both, count=count)
    return hierarchy_sidecar(g, parents, p, coarse, slug="g-p16", parent_slug="g-p4", score="test")


node_lists = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 15), st.integers(0, 5)), min_size=1, max_size=30, unique=True
)


@settings(max_examples=40, deadline=None)
@given(nodes=node_lists, coarse=st.integers(1, 15), seed=st.integers(0, 1000), corpus=st.booleans())
def test_supernode_invariants(nodes, coarse, seed, corpus):
    g = torch.Generator().manual_seed(seed)
    W = {l: torch.randn(16, 8, generator=g) for l in range(3)}
    activity = {l: torch.rand(50, 16, generator=g) < 0.3 for l in range(3)} if corpus else None
    graph = graph_json(nodes)
    before = copy.deepcopy(graph)
    side = sidecar_for(graph, W, coarse, 16, activity)
    out = with_supernodes(graph, side)

    ids = {n["node_id"] for n in graph["nodes"]}
    groups = [set(s[1:]) for s in side["supernodes"]]
    members = [m for s in side["supernodes"] for m in s[1:]]
    # Disjoint, members are nodes of the graph, and exactly the nodes at or beyond P'.
    assert len(members) == len(set(members)) and set(members) <= ids
    assert set(members) == {f"{l}_{f}_{p}" for l, f, p in nodes if f >= coarse} == set(side["parents"])
    # Every parent lies below the coarser prefix, in the node's own layer; a group shares one.
    assert all(0 <= q < coarse for q in side["parents"].values())
    for grp in groups:
        assert len({side["parents"][m] for m in grp}) == 1
        assert len({(m.split("_")[0], m.split("_")[2]) for m in grp}) == 1
    # Grouping never changes nodes, edges or scores; the input is not mutated.
    assert graph == before
    assert out["nodes"] == before["nodes"] and out["links"] == before["links"]
    assert out["metadata"] == before["metadata"]
    assert out["qParams"]["supernodes"] == side["supernodes"]
    assert set(members) <= set(out["qParams"]["pinnedIds"])


@settings(max_examples=15, deadline=None)
@given(n_parents=st.integers(2, 6), n_children=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_planted_hierarchy_parents_are_recovered(n_parents, n_children, seed):
    W, active, parent_of, width = planted(n_parents, n_children, 48, 0.5, 600, 0.01, seed)
    # Every child latent fires at two positions of a graph at the full width, parents at P' = n_parents.
    graph = graph_json([(0, j, pos) for j in parent_of for pos in (1, 3)] + [(0, 0, 2)])
    side = sidecar_for(graph, {0: W}, n_parents, width, {0: active})
    for j, p in parent_of.items():
        for pos in (1, 3):
            assert side["parents"][f"0_{j}_{pos}"] == p
    # One supernode per (parent, position) with children in the graph.
    assert len(side["supernodes"]) == 2 * len(set(parent_of.values()))


def test_children_below_the_parent_prefix_are_refused():
    with pytest.raises(ValueError, match="must all be >= the parent prefix length 4"):
        assign_parents(torch.randn(8, 3), [2, 5], 4)


# -- the attribute CLI --------------------------------------------------------------------

from tiny import CORPUS, NESTED, PROMPT, WIDTH, WORDS, build_exported_transcoders  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hier")
    return root, *build_exported_transcoders(root)


def _attribute(llama, tc, gdir, *extra):
    from matryoshka_plugin.cli.circuit_tracer import main

    main(["attribute", "--model", str(llama), "--transcoder_set", str(tc), "-p", PROMPT,
          "--prefix-len", "2", str(NESTED[0]), str(WIDTH), "--slug", "s", "--graph_file_dir", str(gdir), *extra])


def test_cli_writes_supernodes_by_default_and_not_with_no_supernodes(exported):
    root, llama, tc = exported
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(WORDS * 40))
    on, off = root / "on", root / "off"
    # A high node threshold keeps most nodes, so that the finer graphs have children.
    _attribute(llama, tc, on, "--supernode-corpus", str(corpus), "--node_threshold", "0.99")
    _attribute(llama, tc, off, "--no-supernodes", "--node_threshold", "0.99")
    grouped = 0
    assert not (on / "s-p2.hierarchy.json").exists() and not list(off.glob("*.hierarchy.json"))
    for coarse, p in [(2, NESTED[0]), (NESTED[0], WIDTH)]:
        side = json.loads((on / f"s-p{p}.hierarchy.json").read_text())
        assert (side["prefix_len"], side["parent_prefix_len"]) == (p, coarse)
        assert side["score"].startswith("|cosine| * coactivation")
        g_on, g_off = (json.loads((d / f"s-p{p}.json").read_text()) for d in (on, off))
        assert g_on["nodes"] == g_off["nodes"] and g_on["links"] == g_off["links"]
        ids = {n["node_id"] for n in g_on["nodes"]}
        fine = {n["node_id"] for n in g_on["nodes"] if n["feature_type"] == "cross layer transcoder"
                and int(n["node_id"].split("_")[1]) >= coarse}
        grouped += len(fine)
        assert set(side["parents"]) == fine
        assert all(q < coarse for q in side["parents"].values())
        assert g_on["qParams"]["supernodes"] == side["supernodes"]
        assert {m for s in side["supernodes"] for m in s[1:]} == fine <= ids
        assert g_off["qParams"]["supernodes"] == []
    assert grouped
    scores = [json.loads((d / "s.scores.json").read_text()) for d in (on, off)]
    for a, b in zip(*scores):
        assert a["replacement_score"] == pytest.approx(b["replacement_score"])
        assert a["decoder_prefix_len"] == WIDTH  # no level decoders in this export


@pytest.mark.parametrize("case", ["missing", "binary", "no_supernodes"])
def test_bad_supernode_corpus_is_one_line_and_writes_nothing(exported, capsys, case):
    root, llama, tc = exported
    gdir = root / f"bad-{case}"
    path = root / f"corpus-{case}.txt"
    if case == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    extra = ["--supernode-corpus", str(path)] + (["--no-supernodes"] if case == "no_supernodes" else [])
    if case == "no_supernodes":
        path.write_text(CORPUS)
    with pytest.raises(SystemExit) as exc:
        _attribute(llama, tc, gdir, *extra)
    assert exc.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert len(err) == 1 and "--supernode-corpus" in err[0]
    assert not gdir.exists()
