"""Offline assets and server behaviour of the viewer, without a browser."""

from __future__ import annotations

import http.client
import json
import re

import pytest
from circuit_tracer.frontend.graph_models import _cantor_pairing

from matryoshka_plugin.viewer.assets import VENDORED, AssetError, _upstream_frontend, rewrite_index
from matryoshka_plugin.viewer.data import base_slug, cantor, local_scan
from matryoshka_plugin.viewer.server import serve_graphs


def test_rewritten_index_loads_nothing_remote():
    html = (_upstream_frontend() / "index.html").read_text()
    assert re.search(r"src='https?://", html)  # upstream loads from CDNs: the rewrite matters
    out = rewrite_index(html)
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", out)
    for v in VENDORED:
        assert f"<script src='./vendor/{v.local_name}'></script>" in out
    # Plugin script before the inline script that defines window.init.
    assert out.index("./matryoshka/matryoshka-viewer.js") < out.index("window.init = async function")
    # Every upstream local script is still loaded, in order.
    local = lambda h: re.findall(r"<script src='(\./[^']+)'>", h)
    assert [s for s in local(out) if s.startswith("./") and "vendor/" not in s and "matryoshka/" not in s] == local(html)


def test_unknown_cdn_script_is_refused():
    with pytest.raises(AssetError, match="example.org"):
        rewrite_index("<script src='https://example.org/x.js'></script>\n<script>\nwindow.init = async function(){}</script>")


def test_names_match_circuit_tracer():
    assert all(cantor(l, f) == _cantor_pairing(l, f) for l in range(5) for f in range(40))
    assert base_slug({"slug": "france-p16", "prefix_len": 16}) == "france"
    assert base_slug({"slug": "france-p16"}) == "france-p16"
    assert local_scan("/abs/tc").startswith("./data/matryoshka-viewer/") and local_scan("/abs/tc").endswith("/features")


@pytest.fixture()
def served(tmp_path):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    meta = {"graphs": [{"slug": "g-p4", "scan": "/abs/tc", "prompt": "x", "prefix_len": 4}]}
    (graphs / "graph-metadata.json").write_text(json.dumps(meta))
    (graphs / "g-p4.json").write_text(json.dumps({"metadata": {"scan": "/abs/tc", "transcoder_list": ["a"]}, "nodes": []}))
    (tmp_path / "secret.json").write_text("{}")
    front = tmp_path / "front"
    front.mkdir()
    (front / "index.html").write_text("ok")
    server = serve_graphs(graphs, port=0, frontend_dir=front)
    yield server, meta
    server.stop()


def _get(server, path):
    conn = http.client.HTTPConnection("localhost", server.port, timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


def test_server_points_scans_at_local_feature_pages(served):
    server, meta = served
    status, body = _get(server, "/graph_data/g-p4.json")
    data = json.loads(body)
    assert status == 200 and data["metadata"]["scan"] == local_scan("/abs/tc")
    assert data["metadata"]["original_scan"] == "/abs/tc" and data["metadata"]["transcoder_list"] == []
    assert json.loads(_get(server, "/data/graph-metadata.json")[1]) == meta
    # Not built yet: valid, empty answers instead of 404s.
    status, body = _get(server, "/" + local_scan("/abs/tc")[2:] + "/7.json")
    assert status == 200 and json.loads(body)["missing"] is True
    status, body = _get(server, "/data/matryoshka-viewer/abc/decomposition.json")
    assert status == 200 and json.loads(body) == {"features": {}, "missing": True}
    assert _get(server, "/data/../secret.json")[0] == 403
    assert _get(server, "/data/nope.json")[0] == 404
    assert _get(server, "/favicon.ico")[0] == 204
    assert _get(server, "/index.html") == (200, b"ok")


def test_missing_graph_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serve_graphs(tmp_path / "nope", port=0, frontend_dir=tmp_path)


def test_cli_start_server_uses_the_viewer(served, tmp_path, monkeypatch, capsys):
    import matryoshka_plugin.viewer.server as server_mod
    from matryoshka_plugin.cli.circuit_tracer import main

    _, meta = served
    front = tmp_path / "front"
    monkeypatch.setattr(server_mod, "build_frontend", lambda: front)
    seen = {}

    def sleep(_):
        srv = server_mod.run_server.server
        seen["index"] = _get(srv, "/index.html")
        seen["graph"] = json.loads(_get(srv, "/graph_data/g-p4.json")[1])
        raise KeyboardInterrupt

    monkeypatch.setattr("time.sleep", sleep)
    main(["start-server", "--graph_file_dir", str(tmp_path / "graphs"), "--port", "0"])
    assert seen["index"] == (200, b"ok")
    assert seen["graph"]["metadata"]["scan"] == local_scan("/abs/tc")  # the plugin's handler answered
    assert "Matryoshka viewer: http://localhost:" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        main(["start-server", "--graph_file_dir", str(tmp_path / "missing"), "--port", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"circuit-tracer-matryoshka: error: graph directory {tmp_path / 'missing'} does not exist"
    ]
