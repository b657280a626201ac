"""What an attribution run over several prefix lengths writes.

- ``.pt`` graphs (circuit-tracer's ``Graph.to_pt``), one per prefix length: ``g.pt``
  becomes ``g-pP.pt``;
- a graph file directory for circuit-tracer's viewer (``create_graph_files``), one slug
  per prefix length (``slug-pP``), whose ``graph-metadata.json`` entries also carry the
  prefix length, nested sizes and scores (the frontend ignores unknown keys; ``.pt``
  files cannot hold them: ``Graph.from_pt`` refuses extra keys);
- ``*.scores.json``: one row per prefix length;
- with supernodes (``hierarchy``), ``qParams.supernodes`` in each fine graph file and its
  ``<slug>.hierarchy.json`` sidecar, written into the same all-or-nothing directory swap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from ...atomic import atomic_dir, atomic_write, atomic_write_text, link_missing
from ...core.errors import UsageError
from ...core.level_decoders import decoder_level
from .attribution import PrefixGraph

METADATA_FILE = "graph-metadata.json"


def score_rows(
    results: Sequence[PrefixGraph], width: int, nested_sizes: list[int] | None, level_sizes: Sequence[int] = ()
) -> list[dict]:
    """One JSON row per prefix length: scores, timing, graph size, and the nested size
    whose decoder the graph used (``decoder_prefix_len``; the width: the full decoder)."""
    return [
        {
            "prefix_len": r.prefix_len,
            "width": width,
            "nested_sizes": nested_sizes,
            "decoder_prefix_len": decoder_level(r.prefix_len or width, level_sizes, width),
            "replacement_score": r.replacement,
            "completeness_score": r.completeness,
            "path_length": r.path_length.mean,
            "attribution_seconds": r.seconds,
            "n_active_features": int(r.graph.active_features.shape[0]),
        }
        for r in results
    ]


def with_prefix_suffix(path: str | Path, prefix_len: int | None) -> Path:
    """``g.pt`` -> ``g-pP.pt`` (unchanged for the full width)."""
    p = Path(path)
    return p if prefix_len is None else p.with_name(f"{p.stem}-p{prefix_len}{p.suffix}")


def write_scores(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, json.dumps(rows, indent=2))


def save_graphs(results: Sequence[PrefixGraph], rows: list[dict], graph_output_path: str | Path) -> None:
    """Each graph as a ``.pt`` next to ``graph_output_path``, and ``<stem>.scores.json``."""
    for r in results:
        path = with_prefix_suffix(graph_output_path, r.prefix_len)
        atomic_write(path, r.graph.to_pt)
        logging.info(f"Saved graph to {path}")
    write_scores(Path(graph_output_path).with_suffix(".scores.json"), rows)


def graph_file_entries(slug: str, results: Sequence[PrefixGraph], rows: list[dict]) -> list[tuple]:
    """``(slug, graph, extra metadata)`` per prefix length, for ``write_graph_files``."""
    entries = []
    for r, row in zip(results, rows):
        if r.prefix_len is None:
            entries.append((slug, r.graph, {}))
        else:
            extra = {**row, "title_prefix": f"[P={r.prefix_len}] "}
            entries.append((f"{slug}-p{r.prefix_len}", r.graph, extra))
    return entries


def write_graph_files(
    entries,
    graph_file_dir,
    node_threshold: float,
    edge_threshold: float,
    annotate: Callable[[Path], object] | None = None,
) -> None:
    """``create_graph_files`` for each ``(slug, graph, extra_metadata)``, all or nothing.

    ``annotate(dir)`` runs on the new graph files before the swap (the supernodes).

    The new directory is built beside the old one and swapped in whole
    (``atomic.atomic_dir``): an existing data directory keeps its other graphs (hard
    links) and their ``graph-metadata.json`` entries; these slugs' entries are replaced.
    """
    from circuit_tracer.utils.create_graph_files import create_graph_files

    out = Path(graph_file_dir).absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--graph_file_dir {out} exists and is not a directory")
    with atomic_dir(out) as tmp:
        for slug, graph, _ in entries:
            create_graph_files(
                graph_or_path=graph,
                slug=slug,
                scan=None,
                output_path=str(tmp),
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
            )
        if annotate is not None:
            annotate(tmp)
        meta_path = tmp / METADATA_FILE
        new = json.loads(meta_path.read_text())["graphs"]
        extra = {slug: e for slug, _, e in entries}
        for g in new:
            g.update(extra.get(g["slug"], {}))
        old_path = out / METADATA_FILE
        old = json.loads(old_path.read_text())["graphs"] if old_path.is_file() else []
        slugs = {g["slug"] for g in new}
        meta_path.write_text(json.dumps({"graphs": [g for g in old if g["slug"] not in slugs] + new}, indent=2))
        link_missing(out, tmp)
