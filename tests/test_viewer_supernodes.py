"""The graph file's own supernodes show in circuit-tracer's graph view (a real browser).

circuit-tracer 0.5.0's ``init-cg.js`` replaced ``qParams.supernodes`` with the URL's
supernodes, an empty list when the URL has none, so the supernodes the plugin writes
into a graph file were never drawn (``viewer.text_only`` fixes it in the served copy).
Graphs of the tiny Llama + tiny Matryoshka transcoders at P = 16, 32 with the automatic
supernodes on (the plugin's CLI); the page is opened with the slug only.

Needs: apt-get install -y chromium; pip install playwright (never `playwright install`).
"""

from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest

from tiny import build_prompt_graphs

# browser_page: the same chromium page, served from this module's graph_dir.
try:
    from .test_viewer_browser import _wait_rendered, browser_page  # noqa: F401
except ImportError:
    from test_viewer_browser import _wait_rendered, browser_page  # noqa: F401


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    return build_prompt_graphs(tmp_path_factory.mktemp("supernodes"), [16, 32], supernodes=True)[2]


def test_graph_file_supernodes_show_without_url_parameters(graph_dir, browser_page):
    page, server, events, shots = browser_page
    q = json.loads((graph_dir / "france-p32.json").read_text())["qParams"]
    assert q["supernodes"], "the tiny P=32 graph has no node beyond 16"

    page.goto(f"{server.url}?slug=france-p32")
    _wait_rendered(page, "france-p32", 0)
    page.wait_for_selector(".subgraph .supernode-container")
    assert page.evaluate("util.params.get('supernodes')") is None
    drawn = page.evaluate("""[...document.querySelectorAll('.subgraph .supernode-container')]
        .map(e => d3.select(e).datum().node).filter(n => n.isSuperNode)
        .map(n => [n.ppClerp, ...n.memberNodes.map(m => m.nodeId)])""")
    # Every member is pinned in the file, so every supernode is drawn, members in file order.
    assert sorted(drawn) == sorted(q["supernodes"])
    page.screenshot(path=str(shots / "file-supernodes-p32.png"))

    host = urlparse(server.url).hostname
    assert [u for u in events["requests"] if urlparse(u).hostname not in (host, "localhost", "127.0.0.1")] == []
    assert events["failed"] == []
    assert events["errors"] == []
