"""The circuit-tracer viewer patch (0006) against the plugin's viewer fixes.

- The patched frontend equals stock circuit-tracer's frontend with the plugin's
  ``viewer.text_only`` fixes applied: the patch offers upstream exactly what the plugin
  serves. The plugin side runs in its own venv (stock circuit-tracer), as in
  ``test_parity.py``.
- The patched local server, as installed in this venv, refuses a foreign Host header and
  a cross-origin save, and still saves for the viewer's own page. (The patch's own tests,
  run in step 4, cover more cases.)
"""

import http.client
import json
import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PLUGIN_PYTHON = os.environ.get("PLUGIN_PYTHON")

pytestmark = pytest.mark.skipif(
    not PLUGIN_PYTHON, reason="run through integration_tests/run.sh (PLUGIN_PYTHON unset)"
)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_patched_frontend_is_the_plugins_fixed_frontend(tmp_path):
    import circuit_tracer

    out = tmp_path / "plugin-frontend"
    # This checkout's plugin, whatever the plugin venv has installed.
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([PLUGIN_PYTHON, str(HERE / "viewer_side.py"), str(out)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    patched = files(Path(circuit_tracer.__file__).parent / "frontend" / "assets")
    ours = files(out)
    assert sorted(patched) == sorted(ours)
    assert [f for f in ours if ours[f] != patched[f]] == []


def test_patched_server_refuses_foreign_host_and_cross_origin_save(tmp_path):
    from circuit_tracer.frontend.local_server import serve

    (tmp_path / "g.json").write_text(json.dumps({"qParams": {}}))
    server = serve(str(tmp_path), port=0)
    port = server.httpd.server_address[1]

    def request(method, path, headers, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status

    save = json.dumps({"qParams": {"pinnedIds": "x"}})
    try:
        assert request("GET", "/graph_data/g.json", {"Host": f"evil.example:{port}"}) == 403
        assert request("GET", "/graph_data/g.json", {"Host": f"localhost:{port}"}) == 200
        own = {"Host": f"localhost:{port}"}
        assert request("POST", "/save_graph/g", {**own, "Origin": "http://evil.example"}, save) == 403
        assert json.loads((tmp_path / "g.json").read_text()) == {"qParams": {}}
        assert request("POST", "/save_graph/g", {**own, "Origin": f"http://localhost:{port}"}, save) == 200
        assert json.loads((tmp_path / "g.json").read_text())["qParams"] == {"pinnedIds": "x"}
    finally:
        server.stop()
