"""The edges of a global graph per prefix length, and the files they are written to.

The target encoder reads the MLP input, which is the residual stream after the pre-MLP
norm; the norm's elementwise gain is folded into the encoder (``W_enc * g``,
``mlp_norm_gains`` / ``residual_encoder``) so that the virtual weight is taken in
residual-stream coordinates. The per-token ``1/rms`` factor is not (it is context
dependent), as in Anthropic's global weights.

``build_global_graph`` (per-layer transcoders) and ``build_clt_global_graph`` (a CLT,
through its effective decoders, ``core.edge_scores.clt_effective_decoders``) score
every ordered layer pair with ``core.edge_scores.era_edges``; ``write_global_graphs``
writes JSON and CSV edge lists, a PNG plot per prefix and ``meta.json``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..atomic import atomic_dir
from ..core.edge_scores import CoactivationStats, Edges, clt_effective_decoders, era_edges
from ..core.errors import ExportError, GlobalGraphError
from ..core.prefixes import check_prefix_len
from ..hooks import mlp_modules

RANK_BY = ("twera", "era", "virtual_weight")
EDGE_FIELDS = ("source_layer", "source", "target_layer", "target", "virtual_weight", "era", "twera", "coactive_count")


def mlp_norm_gains(model, layers: Iterable[int]) -> dict[int, Tensor | None]:
    """The elementwise gain of each layer's pre-MLP norm (Llama/GPT-2/NeoX names), or None."""
    mlps = mlp_modules(model)
    modules = dict(model.named_modules())
    gains: dict[int, Tensor | None] = {}
    for layer in layers:
        block = mlps[layer][0].rsplit(".", 1)[0]
        gain = None
        for name in ("post_attention_layernorm", "ln_2", "post_attention_norm"):
            norm = modules.get(f"{block}.{name}")
            if norm is not None and getattr(norm, "weight", None) is not None:
                gain = norm.weight.detach().float().cpu()
                break
        gains[layer] = gain
    return gains


@dataclass
class LayerEdges:
    source_layer: int
    target_layer: int
    edges: Edges


def residual_encoder(weight: Tensor, gain: Tensor | None) -> Tensor:
    """A target encoder in residual-stream coordinates: the pre-MLP norm gain folded in."""
    enc = weight.detach().float()
    return enc if gain is None else enc * gain.to(enc)


def build_global_graph(
    coders: dict[int, object],
    stats: CoactivationStats,
    prefix_len: int | None,
    *,
    k: int = 16,
    threshold: float = 0.0,
    rank_by: str = "twera",
    gains: dict[int, Tensor | None] | None = None,
) -> list[LayerEdges]:
    """ERA/TWERA edges of every ordered layer pair, restricted to the first ``prefix_len`` latents."""
    out = []
    for a, b in stats.layer_pairs():
        dec = coders[a].W_dec.detach().float()
        enc = residual_encoder(coders[b].encoder.weight, (gains or {}).get(b))
        edges = era_edges(stats, a, b, dec, enc, prefix_len=prefix_len, k=k, threshold=threshold, rank_by=rank_by)
        out.append(LayerEdges(a, b, edges))
    return out


def build_clt_global_graph(
    clt,
    stats: CoactivationStats,
    prefix_len: int | None,
    *,
    k: int = 16,
    threshold: float = 0.0,
    rank_by: str = "twera",
    gains: dict[int, Tensor | None] | None = None,
) -> list[LayerEdges]:
    """As ``build_global_graph`` for a CLT: each source layer's effective decoder towards
    every later layer in ``stats`` (the running sum of its decoder slots before that layer,
    including slots of CLT layers left out of ``stats``), then the same sparse ERA/TWERA."""
    out = []
    layers = stats.layers
    for a in layers:
        slot = clt.layers.index(a)
        dec = clt.W_dec[slot].detach().float()
        if prefix_len is not None:
            # Only rows < P are ever looked up; the running sums need no more.
            dec = dec[: check_prefix_len(prefix_len, clt.num_latents, error=GlobalGraphError)]
        targets = [b for b in layers if b > a]
        for b, eff in clt_effective_decoders(dec, clt.layers, slot, targets):
            enc = residual_encoder(clt.W_enc[clt.layers.index(b)], (gains or {}).get(b))
            edges = era_edges(stats, a, b, eff, enc, prefix_len=prefix_len, k=k, threshold=threshold, rank_by=rank_by)
            out.append(LayerEdges(a, b, edges))
    return out


def edge_rows(graph: list[LayerEdges]) -> list[dict]:
    rows = []
    for le in graph:
        e = le.edges
        # One .tolist() per column: per-element tensor indexing is slow for 10^5 edges.
        cols = zip(e.source.tolist(), e.target.tolist(), e.virtual_weight.tolist(), e.era.tolist(), e.twera.tolist(), e.coactive_count.tolist())
        for s, t, vw, era, twera, count in cols:
            rows.append(
                dict(
                    source_layer=le.source_layer,
                    source=s,
                    target_layer=le.target_layer,
                    target=t,
                    virtual_weight=vw,
                    era=era,
                    twera=twera,
                    coactive_count=count,
                )
            )
    return rows


def plot_graph(rows: list[dict], prefix_len: int, layers: list[int], path: Path, score: str, max_edges: int = 300) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: -abs(r[score]))[:max_edges]
    fig, ax = plt.subplots(figsize=(7, 5))
    top = max((abs(r[score]) for r in rows), default=1.0) or 1.0
    for r in rows:
        ax.plot(
            [r["source_layer"], r["target_layer"]],
            [r["source"], r["target"]],
            color="tab:red" if r[score] > 0 else "tab:blue",
            alpha=0.15 + 0.85 * abs(r[score]) / top,
            lw=0.5 + 2 * abs(r[score]) / top,
        )
    nodes = {(r["source_layer"], r["source"]) for r in rows} | {(r["target_layer"], r["target"]) for r in rows}
    if nodes:
        xs, ys = zip(*nodes)
        ax.scatter(xs, ys, s=8, color="black", zorder=3)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("feature index (Matryoshka order: coarse at the bottom)")
    ax.set_ylim(-0.5, prefix_len - 0.5)
    ax.set_title(f"global graph, prefix P={prefix_len}: top {len(rows)} edges by |{score}| (red +, blue -)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_global_graphs(
    out_dir: Path | str,
    graphs: dict[int, list[LayerEdges]],
    meta: dict,
    *,
    rank_by: str = "twera",
    overwrite: bool = False,
) -> Path:
    """``graph-P{P}.json``, ``graph-P{P}.csv``, ``graph-P{P}.png`` per prefix and ``meta.json``,
    written to a temporary sibling and renamed into place."""
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        summary = []
        for p, graph in graphs.items():
            rows = edge_rows(graph)
            (tmp / f"graph-P{p}.json").write_text(json.dumps({**meta, "prefix_len": p, "edges": rows}))
            with open(tmp / f"graph-P{p}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=EDGE_FIELDS)
                w.writeheader()
                w.writerows(rows)
            plot_graph(rows, p, meta["layers"], tmp / f"graph-P{p}.png", rank_by)
            summary.append({"prefix_len": p, "n_edges": len(rows)})
        (tmp / "meta.json").write_text(json.dumps({**meta, "prefixes": summary}, indent=2))
    return Path(out_dir)
