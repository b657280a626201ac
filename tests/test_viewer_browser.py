"""The multi-level viewer in a real browser (Debian chromium driven by Playwright).

Graphs of a tiny Llama + tiny Matryoshka transcoders at P = 32, 16, 8 (built with the
plugin's own CLI), feature pages and decompositions from a tiny corpus, the server on
localhost. Checks the prefix switch (node counts, pins, supernodes, selection), the
decomposition panel (both directions, click-through), a feature page with corpus text,
and that the page makes no failed or off-localhost request and logs no error.

Needs: apt-get install -y chromium; pip install playwright (never `playwright install`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tiny import WORDS, build_prompt_graphs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PREFIXES = [32, 16, 8]
FEATURE = "cross layer transcoder"



@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    from matryoshka_plugin.viewer.__main__ import main as viewer_main

    root = tmp_path_factory.mktemp("viewer")
    llama, tc, graphs = build_prompt_graphs(root, PREFIXES)
    rng = random.Random(0)
    (root / "corpus.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(800)))
    assert viewer_main(["build", str(graphs), "--transcoder_set", str(tc), "--model", str(llama),
                        "--corpus", str(root / "corpus.txt"), "--n-tokens", "600", "--seq-len", "32"]) == 0
    return graphs


def _graph(graph_dir, p):
    return json.loads((graph_dir / f"france-p{p}.json").read_text())


def _features(graph):
    return [n["node_id"] for n in graph["nodes"] if n["feature_type"] == FEATURE]


def _expected_node_count(graph, pinned=()):
    # circuit-tracer's formatData filter at the default pruning threshold (node_threshold).
    t = graph["metadata"]["node_threshold"]
    return sum(
        n["feature_type"] in ("embedding", "logit") or (n["influence"] is not None and n["influence"] <= t)
        or n["node_id"] in pinned
        for n in graph["nodes"]
    )


def _decomposition(graph_dir):
    (path,) = (graph_dir / "matryoshka-viewer").glob("*/decomposition.json")
    return json.loads(path.read_text())


def test_viewer_data_covers_every_graph_feature(graph_dir):
    from circuit_tracer.frontend.graph_models import _cantor_pairing

    decomp = _decomposition(graph_dir)
    (pages,) = (graph_dir / "matryoshka-viewer").glob("*/features")
    assert decomp["levels"] == sorted(PREFIXES)
    for p in PREFIXES:
        for node_id in _features(_graph(graph_dir, p)):
            layer, feat, _ = map(int, node_id.split("_"))
            entry = decomp["features"][f"{layer}_{feat}"]
            assert entry["appears_at"] == min(q for q in PREFIXES if feat < q)
            for q, links in entry["children"].items():
                assert feat < int(q) < 32 and all(l["feature"] >= int(q) for l in links)
            below = max([q for q in PREFIXES if q <= feat], default=0)
            assert all(l["feature"] < below for l in entry["parents"])
            page = json.loads((pages / f"{_cantor_pairing(layer, feat)}.json").read_text())
            assert page["index"] == _cantor_pairing(layer, feat)
            examples = page["examples_quantiles"][0]["examples"]
            tops = [e["tokens_acts_list"][e["train_token_ind"]] for e in examples]
            assert tops == sorted(tops, reverse=True)
            if tops:  # the best context holds the latent's largest activation on the corpus
                assert tops[0] == pytest.approx(page["act_max"], abs=1e-3)
                assert all(max(e["tokens_acts_list"]) <= page["act_max"] + 1e-3 for e in examples)
                assert all(len(e["tokens"]) == len(e["tokens_acts_list"]) for e in examples)


@pytest.fixture(scope="module")
def browser_page(graph_dir, tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from matryoshka_plugin.viewer import serve_graphs

    server = serve_graphs(graph_dir, port=0)
    events = {"requests": [], "failed": [], "errors": []}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: events["requests"].append(r.url))
        page.on("requestfailed", lambda r: events["failed"].append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and events["failed"].append(f"{r.url} {r.status}"))
        page.on("console", lambda m: m.type == "error" and events["errors"].append(m.text))
        page.on("pageerror", lambda e: events["errors"].append(str(e)))
        # MATRYOSHKA_VIEWER_SHOTS: keep the screenshots there too (tiny-model figures).
        shots = Path(os.environ.get("MATRYOSHKA_VIEWER_SHOTS") or tmp_path_factory.mktemp("screenshots"))
        shots.mkdir(parents=True, exist_ok=True)
        yield page, server, events, shots
        browser.close()
    server.stop()


def _wait_rendered(page, slug, renders_before):
    page.wait_for_function(
        "([slug, n]) => window.matryoshkaViewer && matryoshkaViewer.lastRendered === slug && matryoshkaViewer.renders > n",
        arg=[slug, renders_before],
    )
    page.wait_for_selector(".link-graph text.node")


def _renders(page):
    return page.evaluate("window.matryoshkaViewer ? matryoshkaViewer.renders : 0")


def _dom_nodes(page):
    return page.evaluate("[...document.querySelectorAll('.link-graph text.node')].map(e => d3.select(e).datum().nodeId)")


def _click_node(page, node_id, ctrl=False):
    i = _dom_nodes(page).index(node_id)
    page.locator(".link-graph text.node").nth(i).click(force=True, modifiers=["Control"] if ctrl else [])


def _switch(page, p):
    n = _renders(page)
    page.click(f".mv-prefix[data-p='{p}']")
    _wait_rendered(page, f"france-p{p}", n)


def test_prefix_switch_decomposition_and_feature_pages(graph_dir, browser_page):
    page, server, events, shots = browser_page
    g = {p: _graph(graph_dir, p) for p in PREFIXES}
    decomp = _decomposition(graph_dir)
    # A feature kept when going from 32 to 16 and one that lies beyond 16.
    shared = next(i for i in _features(g[32]) if i in _features(g[16]))
    fine = next(i for i in _features(g[32]) if int(i.split("_")[1]) >= 16)
    supernodes = json.dumps([["group", shared, fine]])

    page.goto(f"{server.url}?slug=france-p32&supernodes={supernodes}")
    _wait_rendered(page, "france-p32", 0)
    assert len(_dom_nodes(page)) == _expected_node_count(g[32])
    assert page.eval_on_selector_all(".mv-prefix", "b => b.map(e => +e.dataset.p)") == sorted(PREFIXES)

    _click_node(page, shared, ctrl=True)
    _click_node(page, fine, ctrl=True)
    assert set(page.evaluate("util.params.get('pinnedIds')").split(",")) == {shared, fine}
    _click_node(page, shared)
    page.wait_for_selector(".mv-decomp-title")
    # At the full width nothing lies beyond P: the panel says so.
    assert "No latents beyond" in page.inner_text(".mv-children")
    page.screenshot(path=str(shots / "p32.png"))

    counts = {}
    for p in (16, 8):
        _switch(page, p)
        counts[p] = len(_dom_nodes(page))
        pinned = [i for i in (shared, fine) if i in {n["node_id"] for n in g[p]["nodes"]}]
        assert counts[p] == _expected_node_count(g[p], pinned)
        got_pins = page.evaluate("util.params.get('pinnedIds')")
        assert (got_pins.split(",") if got_pins else []) == pinned
        assert page.eval_on_selector_all(".link-graph text.node.pinned", "e => e.map(x => d3.select(x).datum().nodeId)") == pinned
        sn = json.loads(page.evaluate("util.params.get('supernodes') || '[]'"))
        assert sn == ([["group", *pinned]] if pinned else [])
        clicked = page.evaluate("util.params.get('clickedId')")
        if shared in pinned:
            assert clicked == shared
        else:  # dropped: circuit-tracer writes its empty default selection as "undefined"
            assert clicked in {None, "undefined", "null"}
        page.screenshot(path=str(shots / f"p{p}.png"))
        if p == 16:
            # Decomposition of the carried-over selection at P=16: children beyond 16.
            layer, feat, pos = map(int, shared.split("_"))
            page.wait_for_selector(".mv-children tr.mv-link")
            rows = page.eval_on_selector_all(".mv-children tr.mv-link", "r => r.map(e => +e.dataset.feature)")
            want = [c["feature"] for c in decomp["features"][f"{layer}_{feat}"]["children"]["16"]]
            assert rows == want and all(j >= 16 for j in rows)
            page.screenshot(path=str(shots / "decomposition-p16.png"))
    assert counts[16] != _expected_node_count(g[32]) or counts[8] != counts[16]

    # Reverse direction: a fine latent at P=32 shows coarse parents; clicking one moves to
    # the smallest prefix whose graph contains it.
    _switch(page, 32)
    _click_node(page, fine)
    page.wait_for_selector(".mv-parents tr.mv-link")
    layer, feat, pos = map(int, fine.split("_"))
    parents = decomp["features"][f"{layer}_{feat}"]["parents"]
    assert page.eval_on_selector_all(".mv-parents tr.mv-link", "r => r.map(e => +e.dataset.feature)") == [
        p["feature"] for p in parents[:3]
    ]
    target = next(p for p in sorted(PREFIXES) if p >= parents[0]["appears_at"])
    n = _renders(page)
    page.click(".mv-parents tr.mv-link >> nth=0")
    _wait_rendered(page, f"france-p{target}", n)
    parent_nodes = [i for i in _features(g[target]) if i.startswith(f"{layer}_{parents[0]['feature']}_")]
    clicked = page.evaluate("util.params.get('clickedId')")
    if parent_nodes:
        assert clicked in parent_nodes
    else:
        assert "not in the P=" in page.inner_text(".mv-notice")

    # A feature page with corpus contexts.
    _switch(page, 16)
    _click_node(page, shared)
    page.wait_for_selector(".feature-examples-container .ctx-container")
    text = page.inner_text(".feature-examples-container")
    assert any(w in text for w in WORDS)
    page.screenshot(path=str(shots / "feature-page.png"))

    host = urlparse(server.url).hostname
    off = [u for u in events["requests"] if urlparse(u).hostname not in (host, "localhost", "127.0.0.1")]
    assert off == []
    assert events["failed"] == []
    assert events["errors"] == []
    assert len(events["requests"]) > 20  # the page did load its scripts through us
