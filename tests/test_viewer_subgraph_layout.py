"""The pinned subgraph lays out on graphs where circuit-tracer's own layout throws (a real browser).

circuit-tracer 0.5.0's ``init-cg-subgraph.js`` hands dagre the subgraph's edge shares
(fractions of each target's input) as edge weights, and dagre 0.8.5's network-simplex
ranker fails on some fractional weights ("Cannot read properties of undefined (reading
'v')"): the subgraph is then never drawn. The demo's SmolLM2 graphs hit it as soon as
their supernodes showed. ``viewer.text_only`` gives dagre integer weights (per mille).

The fixture is the tiny Llama's P=32 graph with five pinned nodes and three links among
them whose shares (0.0358, 0.0581, 0.1964 of their targets' input) make dagre throw; a
search over small graphs found them. The test first shows that the stock layout code,
served the same way, throws on it, so the fixture really triggers the failure.

Needs: apt-get install -y chromium; pip install playwright (never `playwright install`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tiny import build_prompt_graphs

try:
    from .test_viewer_browser import CHROMIUM, CHROMIUM_FLAGS
except ImportError:
    from test_viewer_browser import CHROMIUM, CHROMIUM_FLAGS

# (source, target, share of the target's input): with these, dagre 0.8.5 throws.
FAILING_SHARES = [("0_16_5", "3_8_5", 0.0358), ("0_23_5", "1_28_5", 0.0581), ("0_19_5", "1_28_5", 0.1964)]
PINNED = sorted({node for edge in FAILING_SHARES for node in edge[:2]})
DAGRE_ERROR = "Cannot read properties of undefined (reading 'v')"


def _pin_failing_subgraph(graph: dict) -> dict:
    """Pin ``PINNED`` and give the links among them exactly ``FAILING_SHARES``."""
    node_ids = {n["node_id"] for n in graph["nodes"]}
    assert set(PINNED) <= node_ids, f"the tiny graph changed: {sorted(set(PINNED) - node_ids)} missing"
    links = [lk for lk in graph["links"] if not (lk["source"] in PINNED and lk["target"] in PINNED)]
    for target in {t for _, t, _ in FAILING_SHARES}:
        rest = sum(abs(lk["weight"]) for lk in links if lk["target"] == target)
        assert rest > 0, f"{target} has no other input to scale against"
        share = sum(w for _, t, w in FAILING_SHARES if t == target)
        # raw / (rest + sum of raws) is then the share.
        links += [{"source": s, "target": t, "weight": w * rest / (1 - share)}
                  for s, t, w in FAILING_SHARES if t == target]
    graph["links"] = links
    graph["qParams"].update(pinnedIds=PINNED, supernodes=[], sg_pos="")
    return graph


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    graphs = build_prompt_graphs(tmp_path_factory.mktemp("subgraph-layout"), [16, 32])[2]
    path = graphs / "france-p32.json"
    path.write_text(json.dumps(_pin_failing_subgraph(json.loads(path.read_text()))))
    return graphs


@pytest.fixture(scope="module")
def frontends(tmp_path_factory):
    """The plugin's served frontend, and a copy with upstream's layout line put back."""
    from matryoshka_plugin.viewer import build_frontend
    from matryoshka_plugin.viewer.text_only import FIXES

    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    ours = build_frontend()
    stock = tmp_path_factory.mktemp("stock-layout") / "frontend"
    shutil.copytree(ours, stock)
    (fix,) = [f for f in FIXES if "dagre" in f.new]
    js = stock / fix.path
    assert js.read_text().count(fix.new) == 1
    js.write_text(js.read_text().replace(fix.new, fix.old))
    return {"plugin": ours, "stock": stock}


def _open_subgraph(graph_dir, frontend_dir):
    """Serve the fixture with ``frontend_dir``, open it, and return the page errors and
    which pinned nodes dagre placed."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from matryoshka_plugin.viewer import serve_graphs

    server = serve_graphs(graph_dir, port=0, frontend_dir=frontend_dir)
    errors = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(f"{server.url}?slug=france-p32")
            # The pinned nodes' boxes are drawn before the layout runs, whether it throws or not.
            page.wait_for_selector(".subgraph .supernode-container")
            page.wait_for_timeout(500)
            placed = page.evaluate(
                "window.selForceNodes.filter(d => d.dagrePositioned === true).map(d => d.node.nodeId)")
            browser.close()
    finally:
        server.stop()
    return errors, sorted(placed)


def test_stock_layout_throws_on_the_fixture(graph_dir, frontends):
    errors, placed = _open_subgraph(graph_dir, frontends["stock"])
    assert any(DAGRE_ERROR in e for e in errors), errors
    assert placed == []


def test_plugin_lays_out_the_same_subgraph(graph_dir, frontends):
    errors, placed = _open_subgraph(graph_dir, frontends["plugin"])
    assert errors == []
    assert placed == PINNED
