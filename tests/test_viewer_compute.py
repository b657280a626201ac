"""Graphs on demand: ``GraphComputer``, the server's ``/compute/`` routes, ``start-server``'s
flags, and the prompt box in a real browser (Debian chromium + Playwright).

A bad request (empty prompt, one longer than the model's context, a word the tokenizer
does not know, a bad prefix length) is one line back, and nothing is computed or written;
the server keeps working afterwards. A ``POST`` from another origin is refused. A good
prompt's graphs are written at each prefix length and appear in the page's selector.

Needs for the browser test: apt-get install -y chromium; pip install playwright.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest

from tiny import PROMPT, build_exported_transcoders

try:
    from .test_viewer_browser import CHROMIUM, CHROMIUM_FLAGS
except ImportError:
    from test_viewer_browser import CHROMIUM, CHROMIUM_FLAGS

PREFIXES = [8, 32]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from matryoshka_plugin.viewer.compute import load_model_and_config

    root = tmp_path_factory.mktemp("compute")
    llama, tc = build_exported_transcoders(root)
    model, config = load_model_and_config(str(tc), str(llama))
    return root, llama, tc, model, config


def _snapshot(d: Path):
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*")}


@pytest.fixture()
def computer(tiny, tmp_path):
    from matryoshka_plugin.viewer.compute import GraphComputer

    _, _, _, model, config = tiny
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    return GraphComputer(model, config, graphs, prefix_lens=PREFIXES)


def _bad_requests(model):
    n_ctx = model.cfg.n_ctx
    return [
        ({"prompt": "", "prefix_lens": PREFIXES}, "the prompt is empty"),
        ({"prompt": "   ", "prefix_lens": PREFIXES}, "the prompt is empty"),
        ({"prompt": " ".join(["paris"] * n_ctx), "prefix_lens": PREFIXES}, f"n_ctx={n_ctx}"),
        ({"prompt": "the capital of zanzibar is", "prefix_lens": PREFIXES}, "does not know ('zanzibar')"),
        ({"prompt": PROMPT, "prefix_lens": [0]}, "prefix length 0 is out of range"),
        ({"prompt": PROMPT, "prefix_lens": [8, 8]}, "repeat a value"),
        ({"prompt": PROMPT, "prefix_lens": []}, "no prefix length given"),
        ({"prompt": PROMPT, "prefix_lens": "8"}, "must be a list"),
        ({"prompt": 3}, "prompt 3 must be a string"),
        (["not", "an", "object"], "must be a JSON object"),
    ]


def test_bad_requests_are_one_line_and_write_nothing(tiny, computer):
    from matryoshka_plugin.core.errors import UsageError

    before = _snapshot(computer.graph_dir)
    for request, message in _bad_requests(tiny[3]):
        with pytest.raises(UsageError) as e:
            computer.start(request)
        assert message in str(e.value) and "\n" not in str(e.value), (request, str(e.value))
        assert computer.describe()["job"] is None
    assert _snapshot(computer.graph_dir) == before


def test_a_good_prompt_writes_each_prefix_graph(computer):
    job = computer.start({"prompt": PROMPT, "prefix_lens": [32, 8]})
    assert job["state"] == "running" and job["total"] == 2
    job = computer.wait(600)
    assert job["state"] == "done", job
    meta = json.loads((computer.graph_dir / "graph-metadata.json").read_text())["graphs"]
    assert sorted(g["prefix_len"] for g in meta) == [8, 32] and job["done"] == 2
    for slug in job["slugs"]:
        graph = json.loads((computer.graph_dir / f"{slug}.json").read_text())
        assert graph["metadata"]["prompt"].endswith(PROMPT)
    # The same prompt again replaces its graphs, not adds to them.
    computer.start({"prompt": PROMPT, "prefix_lens": [8, 32]})
    assert computer.wait(600)["state"] == "done"
    assert len(json.loads((computer.graph_dir / "graph-metadata.json").read_text())["graphs"]) == 2


def _post(srv, body, origin):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    headers = {"Host": f"localhost:{srv.port}", "Content-Type": "application/json"}
    if origin:
        headers["Origin"] = origin.format(port=srv.port)
    conn.request("POST", "/compute/start", body=body, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def _get(srv, path):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", path, headers={"Host": f"localhost:{srv.port}"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.fixture()
def front(tmp_path):
    d = tmp_path / "front"
    d.mkdir()
    (d / "index.html").write_text("frontend page")
    return d


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:1", "null", None])
def test_cross_origin_compute_is_refused(computer, front, origin):
    from matryoshka_plugin.viewer.server import serve_graphs

    srv = serve_graphs(computer.graph_dir, port=0, frontend_dir=front, computer=computer)
    try:
        status, _ = _post(srv, json.dumps({"prompt": PROMPT, "prefix_lens": PREFIXES}), origin)
        assert status == 403
        assert computer.describe()["job"] is None and not any(computer.graph_dir.iterdir())
    finally:
        srv.stop()


def test_compute_routes(computer, front, tmp_path):
    from matryoshka_plugin.viewer.server import serve_graphs

    srv = serve_graphs(computer.graph_dir, port=0, frontend_dir=front, computer=computer)
    plain = serve_graphs(computer.graph_dir, port=0, frontend_dir=front)
    own = "http://localhost:{port}"
    try:
        assert _get(plain, "/compute/status") == (200, {"available": False})
        status, body = _post(plain, json.dumps({"prompt": PROMPT}), own)
        assert status == 404 and b"--transcoder_set" in body
        status, offer = _get(srv, "/compute/status")
        assert status == 200 and offer["available"] and offer["prefix_lens"] == PREFIXES and offer["job"] is None
        # An empty directory still lists its (no) graphs, for the page's first load.
        assert _get(srv, "/data/graph-metadata.json") == (200, {"graphs": []})
        for body, message in [("{not json", b"not JSON"), (json.dumps({"prompt": ""}), b"the prompt is empty")]:
            status, answer = _post(srv, body, own)
            assert status == 400 and message in answer
        assert not any(computer.graph_dir.iterdir())
        status, answer = _post(srv, json.dumps({"prompt": PROMPT, "prefix_lens": [8]}), own)
        assert status == 202 and json.loads(answer)["job"]["prefix_lens"] == [8]
        computer.wait(600)
        status, offer = _get(srv, "/compute/status")
        assert offer["job"]["state"] == "done" and offer["job"]["slugs"] == [f"{offer['job']['slugs'][0]}"]
    finally:
        srv.stop()
        plain.stop()


def test_start_server_flags(tiny, tmp_path, capsys):
    """``--host`` defaults to 127.0.0.1; ``--model`` alone and a missing dir are one-line errors."""
    import circuit_tracer.__main__ as ct_main
    from unittest.mock import patch

    from matryoshka_plugin.cli import circuit_tracer as cli

    seen = []
    with cli._plugin_cli(["start-server", "--graph_file_dir", str(tmp_path)]) as m, \
            patch.object(m, "run_server", seen.append):
        ct_main.main()
    assert seen[0].host == "127.0.0.1" and seen[0].transcoder_set is None and seen[0].prefix_len is None

    _, llama, tc, _, _ = tiny
    for argv, message in [
        (["--graph_file_dir", str(tmp_path), "--model", str(llama)], f"start-server --model {llama} needs --transcoder_set"),
        (["--graph_file_dir", str(tmp_path / "absent"), "--transcoder_set", str(tc)], "does not exist; create it"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(["start-server", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_prompt_box_in_the_browser(tiny, computer):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from matryoshka_plugin.viewer.server import serve_graphs

    srv = serve_graphs(computer.graph_dir, port=0, computer=computer)
    events = {"requests": [], "errors": []}
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: events["requests"].append(r.url))
            page.on("console", lambda m: m.type == "error" and events["errors"].append(m.text))
            page.on("pageerror", lambda e: events["errors"].append(str(e)))
            page.goto(srv.url)
            # An empty directory: only the prompt box, offering the server's prefix lengths.
            page.wait_for_selector(".mv-compute .mv-prompt")
            assert page.input_value(".mv-prompt-prefixes") == "8 32"
            before = _snapshot(computer.graph_dir)
            for prompt, prefixes, message in [
                ("", "8 32", "the prompt is empty"),
                ("the capital of zanzibar is", "8 32", "does not know ('zanzibar')"),
                (PROMPT, "8 x", 'prefix length "x" is not a whole number'),
                (PROMPT, "8 999", "prefix length 999 is out of range"),
            ]:
                page.fill(".mv-prompt", prompt)
                page.fill(".mv-prompt-prefixes", prefixes)
                page.click(".mv-compute-go")
                page.wait_for_function("m => document.querySelector('.mv-compute-msg').textContent.includes(m)", arg=message)
                assert page.eval_on_selector(".mv-compute-msg", "e => e.classList.contains('mv-error')")
            assert _snapshot(computer.graph_dir) == before
            # Still working: a good prompt, with its progress recorded as the page shows it.
            page.evaluate("""() => { window.__progress = []; new MutationObserver(() =>
                __progress.push(document.querySelector('.mv-compute-status').textContent))
                .observe(document.querySelector('.mv-compute-status'), {childList: true, subtree: true, characterData: true}) }""")
            page.fill(".mv-prompt", PROMPT)
            page.fill(".mv-prompt-prefixes", "32, 8")
            page.click(".mv-compute-go")
            page.wait_for_function("() => window.matryoshkaViewer.lastRendered && matryoshkaViewer.lastRendered.endsWith('-p8')", timeout=300_000)
            page.wait_for_selector(".link-graph text.node")
            assert "Computed 2 graphs" in page.inner_text(".mv-compute-msg")
            if os.environ.get("MATRYOSHKA_VIEWER_SHOTS"):  # keep a tiny-model figure
                page.screenshot(path=str(Path(os.environ["MATRYOSHKA_VIEWER_SHOTS"]) / "on-demand.png"))
            assert page.eval_on_selector_all(".mv-prefix", "b => b.map(e => +e.dataset.p)") == [8, 32]
            progress = page.evaluate("window.__progress")
            assert any(t.startswith("computing P=8 (1 of 2)") for t in progress), progress
            options = page.eval_on_selector_all("select.graph-prompt-select option", "o => o.map(e => e.value)")
            assert len(options) == 2 and all(o.startswith("q-the-capital-of-france-is-") for o in options)
            browser.close()
    finally:
        srv.stop()
    assert [u for u in events["requests"] if "://localhost:" not in u and "://127.0.0.1:" not in u] == []
    # Chromium logs each refused request (the 400 answers to the bad prompts); nothing else.
    assert [e for e in events["errors"] if "status of 400 (Bad Request)" not in e] == []
    assert sum("status of 400" in e for e in events["errors"]) == 3
