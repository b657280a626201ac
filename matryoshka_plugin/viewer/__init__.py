"""Multi-level graph viewer: circuit-tracer's viewer served offline with a prefix-length
selector, coarse-to-fine decomposition panel and feature pages with corpus examples.

What lives where: ``data`` (feature pages and decompositions written next to a graph
directory; the decomposition itself is ``core.decomposition``), ``assets`` (the frontend
and its vendored JavaScript libraries), ``text_only`` (the edits that make upstream's
frontend render file text as text), ``server`` (serving a graph directory, refusing
foreign hosts and cross-origin writes), ``compute`` (graphs on demand for the server's
prompt box), ``__main__`` (``python -m matryoshka_plugin.viewer``).

Heavy imports are lazy, so importing the package costs nothing.
"""

from __future__ import annotations

__all__ = ["serve_graphs", "build_viewer_data", "build_frontend", "vendor"]


def __getattr__(name):
    if name == "serve_graphs":
        from .server import serve_graphs

        return serve_graphs
    if name == "build_viewer_data":
        from .data import build_viewer_data

        return build_viewer_data
    if name in ("build_frontend", "vendor"):
        from . import assets

        return getattr(assets, name)
    raise AttributeError(name)
