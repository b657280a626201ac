"""Group by parent and the compare view, in a real browser (Debian chromium + Playwright).

Graphs of the tiny Llama + tiny Matryoshka transcoders at P = 8, 16, 32 (built with the
plugin's CLI), with hierarchy sidecars in the format of issue 15 part 1
(``<slug>.hierarchy.json`` and ``qParams.supernodes``) written here by ``write_hierarchy``:
the test needs parents it knows, not good ones. Checks that grouping collapses exactly
the nodes with a parent and keeps the links between groups, that the prefix selector keeps
grouping, pins and selection (mapped into and out of collapsed nodes), that ungrouping
expands them back, and that the compare table lists the splits and shares the page's data
says; no failed or off-localhost request, no console error.

Needs: apt-get install -y chromium; pip install playwright (never `playwright install`).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tiny import build_prompt_graphs

# browser_page: the same chromium page, served from this module's graph_dir.
try:
    from .test_viewer_browser import _click_node, _dom_nodes, _renders, browser_page  # noqa: F401
except ImportError:
    from test_viewer_browser import _click_node, _dom_nodes, _renders, browser_page  # noqa: F401

PREFIXES = [8, 16, 32]
FEATURE = "cross layer transcoder"


def _pid(node_id):
    layer, feat, pos = map(int, node_id.split("_"))
    return layer, feat, pos


def write_hierarchy(graph_dir: Path, slug: str, prefix_lens: list[int]) -> None:
    """Sidecars and ``qParams.supernodes`` for ``slug-pP`` at each P but the coarsest.

    A fine node's parent is the latent of a coarse-level node of the same layer and
    position in the same graph when there is one (so collapsing merges into a real node),
    else its latent modulo the coarser prefix.
    """
    for coarse, fine in zip(prefix_lens, prefix_lens[1:]):
        path = graph_dir / f"{slug}-p{fine}.json"
        graph = json.loads(path.read_text())
        feats = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == FEATURE]
        parents, groups = {}, {}
        for node_id in feats:
            layer, feat, pos = _pid(node_id)
            if feat < coarse:
                continue
            there = sorted(f for l, f, p in map(_pid, feats) if l == layer and p == pos and f < coarse)
            parent = there[0] if there else feat % coarse
            parents[node_id] = parent
            groups.setdefault((layer, parent), []).append(node_id)
        graph["qParams"]["supernodes"] = [[f"{l}/{p}", *ids] for (l, p), ids in sorted(groups.items())]
        path.write_text(json.dumps(graph))
        (graph_dir / f"{slug}-p{fine}.hierarchy.json").write_text(json.dumps({
            "prefix_len": fine, "parent_prefix_len": coarse, "parents": parents,
            "scores": {i: 0.5 for i in parents},
        }))


# -- the same views in Python, from the files ------------------------------------------


def view(graph, hier, grouped):
    """``(node ids, map raw id -> view id, members of each collapsed node, nodes)``."""
    if not grouped or not hier or not hier["parents"]:
        return {n["node_id"] for n in graph["nodes"]}, {}, {}, graph["nodes"]
    mapping = {}
    for node_id, parent in hier["parents"].items():
        layer, _, pos = _pid(node_id)
        mapping[node_id] = f"{layer}_{parent}_{pos}"
    by_id = {n["node_id"]: n for n in graph["nodes"]}
    members, nodes = {}, {}
    for n in graph["nodes"]:
        gid = mapping.get(n["node_id"], n["node_id"])
        if gid in mapping.values():
            members.setdefault(gid, [gid])
            if n["node_id"] != gid:
                members[gid].append(n["node_id"])
            group = [by_id[gid]] if gid in by_id else []
            group += [by_id[i] for i in members[gid][1:]]
            infl = [m["influence"] for m in group if m["influence"] is not None]
            nodes[gid] = {**n, "node_id": gid, "influence": min(infl) if infl else None}
        else:
            nodes[gid] = n
    return set(nodes), mapping, members, list(nodes.values())


def translate(ids, source, target):
    out = []
    for i in ids:
        for j in source[2].get(i, [i]):
            j = target[1].get(j, j)
            if j in target[0] and j not in out:
                out.append(j)
    return out


def expected_count(graph, nodes, pinned):
    t = graph["metadata"]["node_threshold"]
    return sum(
        n["feature_type"] in ("embedding", "logit") or (n["influence"] is not None and n["influence"] <= t)
        or n["node_id"] in pinned
        for n in nodes
    )


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    _, _, graphs = build_prompt_graphs(tmp_path_factory.mktemp("hierarchy"), PREFIXES)
    write_hierarchy(graphs, "france", PREFIXES)
    return graphs


def _load(graph_dir, p):
    graph = json.loads((graph_dir / f"france-p{p}.json").read_text())
    side = graph_dir / f"france-p{p}.hierarchy.json"
    return graph, json.loads(side.read_text()) if side.is_file() else None


def _wait_rendered(page, slug, n):
    page.wait_for_function(
        "([s, n]) => window.matryoshkaViewer && matryoshkaViewer.lastRendered === s && matryoshkaViewer.renders > n",
        arg=[slug, n])
    page.wait_for_selector(".link-graph text.node")
    page.wait_for_selector(".mv-group-info:not(:empty)")


def _pins(page):
    got = page.evaluate("util.params.get('pinnedIds')")
    return got.split(",") if got else []


def _set_group(page, slug, on):
    n = _renders(page)
    page.locator(".mv-group-box").set_checked(on)
    _wait_rendered(page, slug, n)


def _switch(page, p):
    n = _renders(page)
    page.click(f".mv-prefix[data-p='{p}']")
    _wait_rendered(page, f"france-p{p}", n)


def test_grouping_in_the_page_keeps_links_between_groups(graph_dir, browser_page):
    page, server, events, _ = browser_page
    page.goto(f"{server.url}?slug=france-p32")
    _wait_rendered(page, "france-p32", 0)
    graph, hier = _load(graph_dir, 32)
    got = page.evaluate("([g, h]) => { var r = matryoshkaViewer.groupGraph(g, h); return [r.data.nodes, r.data.links, r.members] }",
                        [graph, hier])
    nodes, links, members = got
    ids, mapping, want_members, _ = view(graph, hier, True)
    assert {n["node_id"] for n in nodes} == ids and len(nodes) == len(ids)
    assert members == want_members
    # Each collapsed node stands for its parent's node (if any) and exactly its children.
    assert sorted(i for m in members.values() for i in m[1:]) == sorted(hier["parents"])
    # Links between different groups keep their summed weight; inside a group none is left.
    want = {}
    for l in graph["links"]:
        s, t = mapping.get(l["source"], l["source"]), mapping.get(l["target"], l["target"])
        if s != t:
            want[(s, t)] = want.get((s, t), 0.0) + l["weight"]
    assert {(l["source"], l["target"]): pytest.approx(l["weight"]) for l in links} == {
        k: pytest.approx(v) for k, v in want.items()}
    # The page never rewrote the file.
    assert json.loads((graph_dir / "france-p32.json").read_text()) == graph


def test_grouping_pins_the_collapsed_nodes_of_the_file_pins(graph_dir, browser_page):
    """The plugin pins every node with a parent in the file; grouped, those ids are gone,
    so their collapsed nodes are pinned instead (else the subgraph is empty)."""
    page, server, events, _ = browser_page
    page.goto(f"{server.url}?slug=france-p32")
    _wait_rendered(page, "france-p32", 0)
    graph, hier = _load(graph_dir, 32)
    ids, mapping, _, _ = view(graph, hier, True)
    children = sorted(hier["parents"])
    plain = next(n["node_id"] for n in graph["nodes"] if n["node_id"] not in mapping and n["feature_type"] == FEATURE)
    for pins in ([*children, plain], ",".join([*children, plain])):  # a list, or circuit-tracer's string
        got = page.evaluate("([g, h]) => matryoshkaViewer.groupGraph(g, h).data.qParams.pinnedIds",
                            [{**graph, "qParams": {**graph["qParams"], "pinnedIds": pins}}, hier])
        want = list(dict.fromkeys([mapping[c] for c in children] + [plain]))
        assert got == want and set(got) <= ids


def test_group_by_parent_survives_the_prefix_selector(graph_dir, browser_page):
    page, server, events, shots = browser_page
    g = {p: _load(graph_dir, p) for p in PREFIXES}
    graph32, hier32 = g[32]
    assert hier32["parents"], "the tiny P=32 graph has no node beyond 16"
    t = graph32["metadata"]["node_threshold"]
    shown = [n["node_id"] for n in graph32["nodes"] if n["feature_type"] == FEATURE and n["influence"] <= t]
    child = next(i for i in shown if i in hier32["parents"])
    coarse_node = next(i for i in shown if _pid(i)[1] < 16)

    page.goto(f"{server.url}?slug=france-p32")
    _wait_rendered(page, "france-p32", 0)
    assert page.eval_on_selector(".mv-group-box", "b => b.disabled") is False
    _click_node(page, child, ctrl=True)
    _click_node(page, coarse_node, ctrl=True)
    _click_node(page, child)
    pins = _pins(page)
    assert set(pins) == {child, coarse_node}

    current = view(*g[32], False)
    # Group, walk the prefix selector down and back up grouped, then ungroup.
    steps = [("group", 32, True), ("switch", 16, True), ("switch", 8, True), ("switch", 16, True),
             ("switch", 32, True), ("group", 32, False)]
    for action, p, grouped in steps:
        target = view(*g[p], grouped)
        want_pins = translate(pins, current, target)
        want_click = translate([page.evaluate("util.params.get('clickedId')")], current, target)
        if action == "group":
            _set_group(page, f"france-p{p}", grouped)
        else:
            _switch(page, p)
        assert page.eval_on_selector(".mv-group-box", "b => b.checked") is grouped
        assert page.evaluate("util.params.get('mvGroup')") == ("1" if grouped else None)
        assert _pins(page) == want_pins
        clicked = page.evaluate("util.params.get('clickedId')")
        if want_click:
            assert clicked == want_click[0]
        else:
            assert clicked in {None, "undefined", "null"}
        graph, _ = g[p]
        assert len(_dom_nodes(page)) == expected_count(graph, target[3], want_pins)
        info = page.inner_text(".mv-group-info")
        if g[p][1] is None:
            assert "nothing to group" in info
        elif grouped:
            assert f"collapsed into {len(target[2])} coarse parents" in info
            if p == 32:
                page.screenshot(path=str(shots / "grouped-p32.png"))
        pins, current = want_pins, target
    # Ungrouped again at P=32: the child pinned at the start is back as itself.
    assert child in _pins(page) and coarse_node in _pins(page)
    _assert_clean(server, events)


def test_compare_view_lists_splits_and_error_shares(graph_dir, browser_page):
    page, server, events, shots = browser_page
    page.goto(f"{server.url}?slug=france-p32")
    _wait_rendered(page, "france-p32", 0)
    if page.eval_on_selector(".mv-group-box", "b => b.checked"):
        _set_group(page, "france-p32", False)
    (coarse, _), (fine, hier) = _load(graph_dir, 16), _load(graph_dir, 32)
    assert page.inner_text(".mv-compare-toggle") == "Compare P=16 → P=32"
    page.click(".mv-compare-toggle")
    page.wait_for_selector(".mv-compare-table tr.mv-split")

    out = {}
    for l in fine["links"]:
        out[l["source"]] = out.get(l["source"], 0.0) + abs(l["weight"])
    fine_ids = {n["node_id"] for n in fine["nodes"]}
    groups = {}
    for node_id, parent in hier["parents"].items():
        layer, _, pos = _pid(node_id)
        groups.setdefault(f"{layer}_{parent}_{pos}", []).append(node_id)
    rows = page.eval_on_selector_all(".mv-compare-table tr.mv-split", """rs => rs.map(r => ({
        coarse: r.dataset.coarse, fine: [...r.querySelectorAll('.mv-fine-node')].map(s => s.dataset.node),
        share: r.querySelector('.mv-share').textContent, label: r.querySelector('.mv-coarse').textContent}))""")
    assert sorted(r["coarse"] for r in rows) == sorted(groups)
    coarse_ids = {n["node_id"] for n in coarse["nodes"]}
    for r in rows:
        kids = sorted(groups[r["coarse"]])
        assert r["fine"] == ([r["coarse"]] if r["coarse"] in fine_ids else []) + kids
        kid = sum(out.get(i, 0.0) for i in kids)
        total = kid + (out.get(r["coarse"], 0.0) if r["coarse"] in fine_ids else 0.0)
        assert r["share"] == (f"{100 * kid / total:.1f}%" if total else "–")
        assert r["label"].endswith("(not in the graph)") == (r["coarse"] not in coarse_ids)

    def logit_error(graph):
        kind = {n["node_id"]: n["feature_type"] for n in graph["nodes"]}
        into = [l for l in graph["links"] if kind.get(l["target"]) == "logit"]
        err = sum(abs(l["weight"]) for l in into if "error" in kind.get(l["source"], ""))
        return 100 * err / sum(abs(l["weight"]) for l in into)

    summary = page.inner_text(".mv-compare-summary")
    assert f"{logit_error(coarse):.1f}% at P=16" in summary and f"{logit_error(fine):.1f}% at P=32" in summary
    page.screenshot(path=str(shots / "compare-p16-p32.png"))

    # A fine node in the table selects it in the fine graph.
    target = rows[0]["fine"][-1]
    n = _renders(page)
    page.click(f".mv-fine-node[data-node='{target}']")
    _wait_rendered(page, "france-p32", n)
    assert page.evaluate("util.params.get('clickedId')") == target
    _assert_clean(server, events)


def _assert_clean(server, events):
    host = urlparse(server.url).hostname
    assert [u for u in events["requests"] if urlparse(u).hostname not in (host, "localhost", "127.0.0.1")] == []
    assert events["failed"] == []
    assert events["errors"] == []
