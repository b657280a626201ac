"""Multi-level graph viewer: circuit-tracer's viewer served offline with a prefix-length
selector, coarse-to-fine decomposition panel and feature pages with corpus examples.

What lives where: ``decomposition`` (which latents refine which, plain torch),
``data`` (feature pages and decompositions written next to a graph directory),
``assets`` (the frontend and its vendored JavaScript libraries), ``server`` (serving a
graph directory), ``__main__`` (``python -m matryoshka_plugin.viewer``).

Heavy imports are lazy so that ``decomposition`` stays importable with torch alone.
"""

from __future__ import annotations

__all__ = ["serve_graphs", "build_viewer_data", "build_frontend", "vendor", "decompose"]


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
    if name == "decompose":
        from .decomposition import decompose

        return decompose
    raise AttributeError(name)
