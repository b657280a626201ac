"""Security of the graph server and the viewer against hostile requests and hostile files.

Server: a request whose Host header is not the server's own (DNS rebinding) is refused
before anything is read from disk; a ``POST /save_graph/<slug>`` from another origin is
refused and leaves the graph file as it was; a same-origin save still works.

Viewer: graph, feature and decomposition files whose texts are HTML (``<img onerror>``,
``<script>``) are served to a real headless chromium (Debian's, driven by Playwright): no
script runs, no dialog opens, and the hostile strings show up in the page as literal text.

Needs for the browser test: apt-get install -y chromium; pip install playwright (never
``playwright install``).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from matryoshka_plugin.viewer.data import VIEWER_DIR, cantor, scan_id
from matryoshka_plugin.viewer.server import allowed_hosts, serve_graphs

try:
    from .test_viewer_browser import CHROMIUM, CHROMIUM_FLAGS
except ImportError:
    from test_viewer_browser import CHROMIUM, CHROMIUM_FLAGS

# -- server ----------------------------------------------------------------------------


@pytest.fixture()
def server(tmp_path):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    (graphs / "graph-metadata.json").write_text(json.dumps({"graphs": [{"slug": "g", "scan": "s", "prompt": "x"}]}))
    (graphs / "g.json").write_text(json.dumps({"metadata": {"slug": "g"}, "qParams": {"pinnedIds": ""}, "nodes": []}))
    front = tmp_path / "front"
    front.mkdir()
    (front / "index.html").write_text("frontend page")
    srv = serve_graphs(graphs, port=0, frontend_dir=front)
    yield srv, graphs
    srv.stop()


def _request(srv, method, path, headers, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    # A Host header given here replaces the one http.client would send.
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def _save(srv, headers):
    body = json.dumps({"qParams": {"pinnedIds": "0_1_1"}})
    return _request(srv, "POST", "/save_graph/g", {"Host": f"localhost:{srv.port}",
                                                     "Content-Type": "application/json", **headers}, body)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}",
                                  "localhost:1", "127.0.0.1:{port}.evil.example", ""])
@pytest.mark.parametrize("path", ["/index.html", "/graph_data/g.json", "/data/graph-metadata.json"])
def test_foreign_host_is_refused(server, host, path):
    srv, _ = server
    status, body = _request(srv, "GET", path, {"Host": host.format(port=srv.port)})
    assert status == 403
    assert b"frontend page" not in body and b"graphs" not in body and b"qParams" not in body


def test_request_without_host_is_refused(server):
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.putrequest("GET", "/index.html", skip_host=True)
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 403 and b"frontend page" not in r.read()


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "LOCALHOST"])
def test_own_host_is_served(server, name):
    srv, _ = server
    assert _request(srv, "GET", "/index.html", {"Host": f"{name}:{srv.port}"}) == (200, b"frontend page")


def test_allowed_hosts_are_the_listening_address():
    loopback = {"localhost:8032", "127.0.0.1:8032", "[::1]:8032"}
    assert allowed_hosts("localhost", 8032) == loopback
    assert allowed_hosts("127.0.0.1", 8032) == loopback
    assert allowed_hosts("10.1.2.3", 8032) == loopback | {"10.1.2.3:8032"}
    assert allowed_hosts("Viewer.Lan", 80) == {"localhost", "127.0.0.1", "[::1]", "viewer.lan"} | {
        h + ":80" for h in ("localhost", "127.0.0.1", "[::1]", "viewer.lan")}


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "http://localhost:1"},  # another local server's page is another origin
    {"Origin": "https://localhost:{port}"},
    {"Origin": "null"},
    {"Origin": "http://evil.example", "Referer": "http://localhost:{port}/index.html"},
    {"Referer": "http://evil.example/index.html"},
    {"Referer": "http://localhost:{port}.evil.example/"},
    {},  # neither Origin nor Referer: nothing says the write comes from the viewer
])
def test_cross_origin_save_is_refused(server, headers):
    srv, graphs = server
    before = (graphs / "g.json").read_bytes()
    status, _ = _save(srv, {k: v.format(port=srv.port) for k, v in headers.items()})
    assert status == 403
    assert (graphs / "g.json").read_bytes() == before


@pytest.mark.parametrize("headers", [
    {"Origin": "http://localhost:{port}"},
    {"Origin": "http://127.0.0.1:{port}"},
    {"Referer": "http://localhost:{port}/index.html?slug=g"},
])
def test_same_origin_save_is_accepted(server, headers):
    srv, graphs = server
    status, _ = _save(srv, {k: v.format(port=srv.port) for k, v in headers.items()})
    assert status == 200
    assert json.loads((graphs / "g.json").read_text())["qParams"] == {"pinnedIds": "0_1_1"}


def test_path_traversal_is_still_refused(server, tmp_path):
    srv, _ = server
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    status, body = _request(srv, "GET", "/graph_data/../secret.json", {"Host": f"localhost:{srv.port}"})
    assert status == 403 and b"secret" not in body


# -- the served frontend ----------------------------------------------------------------

# ``.html(...)`` calls left in the frontend the plugin serves, each with why it is safe.
SAFE_HTML_CALLS = {
    # node-connections: the markup is built from two d3.format()ed sums of link weights.
    ("attribution_graph/init-cg-node-connections.js", ".html(links => {"),
    # the SVG arrow markers: a constant string.
    ("attribution_graph/util-cg.js", "svg.append('defs').html(`"),
    # loadDatapath: never called by the graph page (its text is a URL, not file data).
    ("attribution_graph/util-cg.js",
     ".html(`Couldn't load data from <code>${urlStr}</code>: ${exc}. Maybe you need to specify a <code>?datapath=</code> argument?`)"),
}
HTML_CALL = re.compile(r"\.html\((?!'[^'$]*'\))|innerHTML|outerHTML|insertAdjacentHTML|document\.write")


def _html_calls(root: Path):
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        # vendor/: the libraries; addition/: a separate case-study page that shows no graph file.
        if path.suffix not in (".js", ".html") or rel.startswith(("vendor/", "addition/")):
            continue
        for line in path.read_text().splitlines():
            if HTML_CALL.search(line) and not line.lstrip().startswith("//"):
                yield rel, line.strip()


def test_served_frontend_writes_file_text_as_text(tmp_path):
    from matryoshka_plugin.viewer.assets import _static_dir, _upstream_frontend
    from matryoshka_plugin.viewer.text_only import apply_fixes

    # Upstream as installed has such calls; fixed (as build_frontend does), and with the
    # plugin's own scripts, only the known-safe ones are left.
    assert set(_html_calls(_upstream_frontend())) - SAFE_HTML_CALLS
    front = tmp_path / "front"
    shutil.copytree(_upstream_frontend(), front)
    apply_fixes(front)
    shutil.copytree(_static_dir(), front / "matryoshka")
    left = set(_html_calls(front))
    assert left <= SAFE_HTML_CALLS, sorted(left - SAFE_HTML_CALLS)


def test_frontend_fix_fails_loudly_when_upstream_changes(tmp_path):
    from matryoshka_plugin.core.errors import AssetError
    from matryoshka_plugin.viewer.assets import _upstream_frontend
    from matryoshka_plugin.viewer.text_only import FIXES, apply_fixes

    front = tmp_path / "front"
    shutil.copytree(_upstream_frontend(), front)
    changed = front / FIXES[0].path
    changed.write_text(changed.read_text().replace(FIXES[0].old, FIXES[0].old.replace("  ", " ")))
    with pytest.raises(AssetError, match=re.escape(f"circuit-tracer's {FIXES[0].path} has changed")):
        apply_fixes(front)


# -- the viewer in a real browser with hostile files -----------------------------------


def _img(where):
    return f'<img src=x onerror="window.__pwned=\'{where}\'">'


def _script(where):
    return f"<script>window.__pwned='{where}'</script>"


PROMPT_TOKENS = ["<bos>", _img("prompt-token"), _script("prompt-token"), " end"]
CLERP = _img("clerp")
SCRIPT_CLERP = _script("clerp")
SUPERNODE = '<img src=x onerror="alert(\'supernode\')">'
VIS_LINK = '"><img src=x onerror="window.__pwned=\'vis_link\'">'
LOGIT = "<img src=x onerror=alert(1)>"  # no double quote: the clerp's format quotes the token
EXAMPLE = _img("example")
EXAMPLE_SCRIPT = _script("example")
QUANTILE = _img("quantile")
TOP_LOGIT = _img("top-logit")
BOTTOM_LOGIT = _script("bottom-logit")
DECOMP = _img("decomposition")
PROMPT = _img("prompt")
SCAN = "hostile-scan"
A, B = "0_1_1", "1_2_2"  # node ids: layer_latent_position


def _node(node_id, feature, layer, pos, kind, **extra):
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "jsNodeId": node_id, "clerp": "", "influence": 0.1, "activation": 1.0, **extra}


def _write_hostile_files(graphs: Path) -> None:
    graphs.mkdir()
    nodes = [_node(f"E_{i}_{i}", i, "E", i, "embedding") for i in range(len(PROMPT_TOKENS))]
    nodes += [
        _node(A, cantor(0, 1), "0", 1, "cross layer transcoder", clerp=CLERP, vis_link=VIS_LINK),
        _node(B, cantor(1, 2), "1", 2, "cross layer transcoder", clerp=SCRIPT_CLERP, vis_link="javascript:window.__pwned='href'"),
        _node("0_1_3", -1, "1", 3, "mlp reconstruction error"),
        _node("3_5_3", 5, "3", 3, "logit", clerp=f'Output "{LOGIT}" (p=0.500)', token_prob=0.5, is_target_logit=True),
    ]
    links = [{"source": s, "target": t, "weight": w} for s, t, w in [
        ("E_1_1", A, 1.0), (A, B, 0.5), ("E_2_2", B, 0.3), (B, "3_5_3", 0.7), ("0_1_3", "3_5_3", -0.2), ("E_3_3", "3_5_3", 0.1),
    ]]
    graph = {
        "metadata": {"slug": "evil-p4", "scan": SCAN, "transcoder_list": [], "prompt_tokens": PROMPT_TOKENS,
                     "prompt": PROMPT, "node_threshold": 0.8, "schema_version": 1},
        "qParams": {"pinnedIds": [A, B], "linkType": "both", "clickedId": A, "sg_pos": ""},
        "nodes": nodes, "links": links,
    }
    (graphs / "evil-p4.json").write_text(json.dumps(graph))
    (graphs / "graph-metadata.json").write_text(json.dumps({"graphs": [
        {"slug": "evil-p4", "scan": SCAN, "prompt": PROMPT, "prompt_tokens": PROMPT_TOKENS, "prefix_len": 4, "width": 8},
    ]}))
    pages = graphs / VIEWER_DIR / scan_id(SCAN)
    (pages / "features").mkdir(parents=True)
    for layer, latent in ((0, 1), (1, 2)):
        example = {"tokens": ["a", EXAMPLE, EXAMPLE_SCRIPT, "b"], "tokens_acts_list": [0.0, 1.0, 0.5, 0.0],
                   "train_token_ind": 1, "is_repeated_datapoint": False}
        (pages / "features" / f"{cantor(layer, latent)}.json").write_text(json.dumps({
            "index": cantor(layer, latent), "act_min": 0.0, "act_max": 1.0,
            "examples_quantiles": [{"quantile_name": QUANTILE, "examples": [example]}],
            "top_logits": [TOP_LOGIT], "bottom_logits": [BOTTOM_LOGIT],
        }))
    child = {"feature": DECOMP, "cosine": 0.5, "coactivation": 0.25, "appears_at": 8}
    (pages / "decomposition.json").write_text(json.dumps({"levels": [4, 8], "features": {
        "0_1": {"appears_at": 4, "children": {"4": [child]}, "parents": []},
    }}))


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    graphs = tmp_path_factory.mktemp("hostile") / "graphs"
    _write_hostile_files(graphs)
    srv = serve_graphs(graphs, port=0)
    events = {"dialogs": [], "errors": []}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        def dialog(d):
            events["dialogs"].append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        page.on("pageerror", lambda e: events["errors"].append(str(e)))
        yield page, srv, events
        browser.close()
    srv.stop()


def _pwned(page):
    return page.evaluate("window.__pwned")


def _hover_every_node(page):
    """Hover each node of the link graph; returns the tooltip texts seen."""
    texts = []
    for i in range(page.locator(".link-graph text.node").count()):
        page.locator(".link-graph text.node").nth(i).hover(force=True)
        page.wait_for_timeout(50)
        texts.append(page.eval_on_selector(".tooltip", "e => e.textContent"))
    page.mouse.move(1, 1)  # off the graph: the feature panel shows the clicked node again
    page.wait_for_timeout(300)
    return texts


def _open(page, srv, query):
    page.goto(f"{srv.url}?slug=evil-p4&{query}")
    page.wait_for_function("window.matryoshkaViewer && matryoshkaViewer.lastRendered === 'evil-p4'")
    page.wait_for_selector(".link-graph text.node")
    page.wait_for_selector(".feature-detail .feature-title a")


def test_hostile_files_render_as_text(hostile_page):
    page, srv, events = hostile_page
    # Supernodes come from the URL (upstream lets the URL's list replace the file's, even
    # an empty one), as a link to the viewer could hold them.
    _open(page, srv, "supernodes=" + quote(json.dumps([[SUPERNODE, A, B]])))

    assert PROMPT in page.eval_on_selector("select.graph-prompt-select", "s => s.textContent")
    tooltips = _hover_every_node(page)
    for token in PROMPT_TOKENS[1:3]:  # embedding nodes: `Emb: “<token>"`
        assert any(token in t for t in tooltips), (token, tooltips)
    assert any(t.startswith(f"[{SUPERNODE}]") and CLERP in t for t in tooltips), tooltips  # supernode member
    assert any(LOGIT in t for t in tooltips), tooltips

    # The selected feature (qParams.clickedId): its header, its corpus examples, its logits.
    page.wait_for_selector(".feature-examples-container .ctx-container")
    page.wait_for_timeout(300)
    header = page.inner_text(".feature-detail .feature-header")
    assert CLERP in header and "L0/1" in header
    assert page.eval_on_selector(".feature-detail .feature-title a", "a => a.getAttribute('href')") == VIS_LINK
    examples = page.inner_text(".feature-examples-container")
    for text in (EXAMPLE, EXAMPLE_SCRIPT, QUANTILE, TOP_LOGIT, BOTTOM_LOGIT):
        assert text in examples, text
    # The Matryoshka decomposition panel for the same latent.
    page.wait_for_selector(".mv-children tr.mv-link")
    assert f"0/{DECOMP}" in page.inner_text(".mv-children")
    # The subgraph shows the supernode (both pinned nodes) by its name.
    page.wait_for_function("document.querySelector('.subgraph').innerText.includes('stickydagre')")
    assert SUPERNODE in page.inner_text(".subgraph")

    # The other feature: a javascript: link is not made a link.
    _open(page, srv, f"clickedId={B}")
    assert SCRIPT_CLERP in page.inner_text(".feature-detail .feature-header")
    assert page.eval_on_selector(".feature-detail .feature-title a", "a => a.getAttribute('href')") is None
    _hover_every_node(page)

    assert _pwned(page) is None
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    assert events["dialogs"] == []
    assert events["errors"] == []
