"""``serve_graphs``: circuit-tracer's local server, serving the plugin's asset directory.

It reuses upstream's handler (``/data/`` and ``/graph_data/`` from the graph directory,
``/save_graph/``), adding: each graph's ``scan`` is pointed at the plugin's feature pages
(``data.local_scan``), so the page never asks a CDN or the Hugging Face hub for them; a
feature page or decomposition that was never built answers with an empty but valid JSON
(the panel says so) instead of a 404; paths cannot leave the graph dir.

And two refusals upstream's handler lacks, because any web page the user visits can send
requests to a server on localhost. A request whose ``Host`` header is not this server's
address is refused (403) before anything is read: otherwise a site whose name the attacker
re-points at 127.0.0.1 (DNS rebinding) reads the graphs as same-origin. A ``POST`` (the
only write: ``/save_graph/<slug>`` rewrites a graph file) is refused (403) unless its
``Origin``, or without one its ``Referer``, is this server's own: a form on another site
could otherwise rewrite the graph files, and what they hold is then shown in the viewer.

With a ``compute.GraphComputer`` the server also computes graphs on demand:
``GET /compute/status`` (the offer and the latest job's progress; ``{"available": false}``
without one) and ``POST /compute/start`` (same origin only, like every ``POST``).
"""

from __future__ import annotations

import functools
import json
import threading
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from circuit_tracer.frontend.local_server import CircuitGraphHandler, ReusableTCPServer, Server

from ..core.errors import UsageError
from .assets import build_frontend
from .data import VIEWER_DIR, local_scan

DEFAULT_PORT = 8032
DEFAULT_HOST = "127.0.0.1"
METADATA_FILE = "graph-metadata.json"
HIERARCHY_SUFFIX = ".hierarchy.json"
# A prompt and its prefix lengths; anything larger is not a request from the page.
MAX_BODY = 64 * 1024
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
# Addresses that listen on loopback (among others) but that no browser puts in a Host header.
_LOOPBACK_OR_ANY = (*LOOPBACK, "::1", "", "0.0.0.0", "::")


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` headers of requests to a server listening on ``host``:``port``.

    The loopback names, plus ``host`` itself when it is another address or name; each with
    the port, and also bare on port 80 (where browsers leave the port out). Lower case.
    """
    names = set(LOOPBACK)
    if host not in _LOOPBACK_OR_ANY:
        names.add(f"[{host}]" if ":" in host else host)
    names = {n.lower() for n in names}
    with_port = {f"{n}:{port}" for n in names}
    return frozenset(with_port | names if port == 80 else with_port)


class MatryoshkaGraphHandler(CircuitGraphHandler):
    """Upstream's handler with the plugin's routes and refusals.

    Its server carries ``allowed_hosts`` (set by ``serve_graphs`` once the port is bound).
    """

    def parse_request(self) -> bool:
        # Every method passes here once its headers are read, before any handler runs.
        if not super().parse_request():
            return False
        if (self.headers.get("Host") or "").lower() not in self.server.allowed_hosts:
            self.send_error(HTTPStatus.FORBIDDEN, "Host header does not name this server")
            return False
        return True

    def do_POST(self):
        if not self._from_own_origin():
            self.send_error(HTTPStatus.FORBIDDEN, "write from another origin refused")
            return
        if self.path.split("?")[0] == "/compute/start":
            return self._compute_start()
        super().do_POST()

    def _compute_start(self):
        computer = self.server.computer
        if computer is None:
            return self._send_json({"error": "this server computes no graphs: start it with "
                                    "--model and --transcoder_set"}, HTTPStatus.NOT_FOUND)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._send_json({"error": f"the request body must be 1..{MAX_BODY} bytes of JSON"},
                                   HTTPStatus.BAD_REQUEST)
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError:
            return self._send_json({"error": "the request body is not JSON"}, HTTPStatus.BAD_REQUEST)
        try:
            job = computer.start(request)
        except UsageError as e:
            return self._send_json({"error": str(e).splitlines()[0]}, HTTPStatus.BAD_REQUEST)
        except RuntimeError as e:
            return self._send_json({"error": str(e)}, HTTPStatus.CONFLICT)
        return self._send_json({"job": job}, HTTPStatus.ACCEPTED)

    def _from_own_origin(self) -> bool:
        # Browsers send Origin with every POST; Referer is the fallback for one that does not.
        origin = self.headers.get("Origin")
        if origin is None:
            referer = urlsplit(self.headers.get("Referer") or "")
            origin = f"{referer.scheme}://{referer.netloc}"
        return origin.lower() in {f"http://{h}" for h in self.server.allowed_hosts}

    def _send_json(self, obj, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        # Graphs computed on demand can replace a file under the same name: never reuse a copy.
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _do_GET(self):
        path = self.path.split("?")[0]
        if path == "/favicon.ico":
            # Browsers ask for it whatever the page says; no icon, and no 404 in the console.
            self.send_response(204)
            self.end_headers()
            return
        if path == "/compute/status":
            computer = self.server.computer
            return self._send_json(computer.describe() if computer else {"available": False})
        for prefix in ("/data/", "/graph_data/"):
            if path.startswith(prefix):
                return self._data(path[len(prefix):])
        return super()._do_GET()

    def _data(self, rel: str):
        root = Path(self.data_dir).resolve()
        local = (root / rel).resolve()
        if root != local and root not in local.parents:
            self.send_response(403)
            self.end_headers()
            return
        parts = Path(rel).parts
        if rel == METADATA_FILE and not local.is_file():
            # A new directory for graphs on demand: the page offers the prompt box.
            return self._send_json({"graphs": []})
        if rel.endswith(HIERARCHY_SUFFIX) and not local.is_file():
            # Graphs built with --no-supernodes or at the coarsest prefix have no sidecar.
            return self._send_json({"parents": {}, "missing": True})
        if parts and parts[0] == VIEWER_DIR and not local.is_file():
            if parts[-1] == "decomposition.json":
                return self._send_json({"features": {}, "missing": True})
            if len(parts) >= 3 and parts[-2] == "features":
                return self._send_json({
                    "examples_quantiles": [{"quantile_name": "No corpus examples built for this graph directory "
                                            "(python -m matryoshka_plugin.viewer build)", "examples": []}],
                    "top_logits": [], "bottom_logits": [], "missing": True,
                })
        if not local.is_file():
            self.send_response(404)
            self.end_headers()
            return
        if local.suffix != ".json" or VIEWER_DIR in parts:
            return super()._do_GET()
        data = json.loads(local.read_text())
        # graph-metadata.json keeps its scan: the graph menu only shows it as a name.
        if isinstance(data.get("metadata"), dict) and "scan" in data["metadata"]:
            meta = data["metadata"]
            meta["original_scan"] = meta["scan"]
            meta["scan"] = local_scan(meta["scan"])
            # A per-layer transcoder list ("custom-" scans) would route pages per layer.
            meta["transcoder_list"] = []
        return self._send_json(data)


def serve_graphs(graph_dir, port: int = DEFAULT_PORT, *, frontend_dir=None, host: str = "localhost",
                 computer=None) -> Server:
    """Serve circuit-tracer's viewer with the plugin's additions for ``graph_dir``.

    ``frontend_dir`` defaults to the built plugin asset directory (``assets.build_frontend``,
    which vendors the JavaScript libraries on first use). ``port=0`` picks a free port;
    the bound one is ``server.port``. Only requests addressed to ``host`` (or, for a
    loopback ``host``, to any loopback name) with that port are answered
    (``allowed_hosts``). ``computer`` (a ``compute.GraphComputer`` writing into
    ``graph_dir``) turns on graphs on demand. Returns upstream's ``Server`` (``.stop()``).
    """
    graph_dir = Path(graph_dir)
    if not graph_dir.is_dir():
        raise FileNotFoundError(f"graph directory {graph_dir} does not exist")
    frontend = Path(frontend_dir) if frontend_dir else build_frontend()
    handler = functools.partial(MatryoshkaGraphHandler, frontend_dir=frontend, data_dir=str(graph_dir.resolve()))
    httpd = ReusableTCPServer((host, port), handler)
    httpd.allowed_hosts = allowed_hosts(host, httpd.server_address[1])
    httpd.computer = computer
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server = Server(httpd, thread)
    server.port = httpd.server_address[1]
    server.url = f"http://{host}:{server.port}/"
    server.frontend_dir = frontend
    server.computer = computer
    return server


def run_server(args) -> None:
    """Stand-in for circuit-tracer's ``__main__.run_server`` (``start-server`` and
    ``attribute --server``): serves ``args.graph_file_dir`` with ``serve_graphs`` until Ctrl+C.

    ``start-server`` with ``--transcoder_set`` (and ``--model``) first loads the model and
    serves graphs on demand too; its ``--host`` (default 127.0.0.1) is where it listens.
    """
    import logging
    import sys
    import time

    from .assets import AssetError

    host = getattr(args, "host", None) or DEFAULT_HOST
    computer = None
    if getattr(args, "command", None) == "start-server" and (args.transcoder_set or args.model):
        from .compute import GraphComputer, load_model_and_config

        if not args.transcoder_set:
            raise UsageError(f"start-server --model {args.model} needs --transcoder_set: graphs on demand use both")
        if not Path(args.graph_file_dir).is_dir():
            raise UsageError(f"--graph_file_dir {args.graph_file_dir} does not exist; create it (graphs on demand are written there)")
        model, config = load_model_and_config(args.transcoder_set, args.model)
        computer = GraphComputer(model, config, args.graph_file_dir, prefix_lens=args.prefix_len)
    try:
        server = serve_graphs(args.graph_file_dir, args.port, host=host, computer=computer)
    except (AssetError, FileNotFoundError, OSError) as e:
        print(f"circuit-tracer-matryoshka: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    run_server.server = server  # lets tests reach the running server
    logging.info(f"Serving the Matryoshka viewer for {Path(args.graph_file_dir).absolute()} at {server.url}")
    extra = " with graphs on demand" if computer else ""
    # Browsers map localhost to loopback themselves; the name is the one users know.
    url = server.url.replace("//127.0.0.1:", "//localhost:")
    print(f"Matryoshka viewer{extra}: {url} (listening on {host}; Ctrl+C to stop)", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()
