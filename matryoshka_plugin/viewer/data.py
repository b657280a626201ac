"""Per-graph-directory viewer data: feature pages with corpus examples and decompositions.

For the graphs in a directory (circuit-tracer's ``graph-metadata.json`` + ``<slug>.json``),
runs the replacement model over a corpus once and writes, per transcoder scan,
``matryoshka-viewer/<scan id>/``:

- ``features/<cantor(layer, latent)>.json``: the JSON that circuit-tracer's feature pages
  read (``frontend/feature_models.py``: top-activating contexts, quantiles, histogram,
  top/bottom output tokens), for every feature node of those graphs;
- ``decomposition.json``: for each such feature, the latents beyond each prefix length that
  refine it and its coarse parents (``decomposition.decompose``), with co-activation
  measured on the same corpus.

The server (``server.serve_graphs``) points each graph's ``scan`` at these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_dir
from ..adapters.circuit_tracer.prefix_transcoders import decoder_rows, output_direction
from ..core.decomposition import coactivation_counts, decompose, decomposition_json
from ..corpus import corpus_chunks

VIEWER_DIR = "matryoshka-viewer"
FEATURE_TYPE = "cross layer transcoder"
PREFIX_SUFFIX = re.compile(r"-p(\d+)$")


def scan_id(scan: str) -> str:
    """A short file-system-safe id for a transcoder scan name or path."""
    return hashlib.sha1(str(scan).encode()).hexdigest()[:12]


def local_scan(scan: str) -> str:
    """The ``./``-relative scan under which the served viewer finds this scan's feature pages."""
    return f"./data/{VIEWER_DIR}/{scan_id(scan)}/features"


def cantor(layer: int, feature: int) -> int:
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def read_graphs(graph_dir: Path) -> list[dict]:
    meta = Path(graph_dir) / "graph-metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{graph_dir} has no graph-metadata.json (not a graph file directory)")
    return json.loads(meta.read_text())["graphs"]


def base_slug(entry: dict) -> str:
    """The slug shared by one prompt's graphs at several prefix lengths (``-pP`` removed)."""
    p = entry.get("prefix_len")
    slug = entry["slug"]
    return slug[: -len(f"-p{p}")] if p is not None and slug.endswith(f"-p{p}") else slug


def graph_features(graph_dir: Path, graphs: Sequence[dict]) -> dict[str, dict]:
    """Per scan: ``{"layers": {layer: set(latents)}, "levels": set(prefix lens), "width": W?}``."""
    out: dict[str, dict] = {}
    for g in graphs:
        path = Path(graph_dir) / f"{g['slug']}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        scan = data["metadata"]["scan"]
        info = out.setdefault(scan, {"layers": defaultdict(set), "levels": set()})
        if g.get("prefix_len") is not None:
            info["levels"].add(int(g["prefix_len"]))
        for n in data["nodes"]:
            if n["feature_type"] == FEATURE_TYPE:
                layer, feat, _ = n["node_id"].split("_")
                info["layers"][int(layer)].add(int(feat))
    return out


def _token_strings(tokenizer, ids: torch.Tensor) -> list[str]:
    from circuit_tracer.frontend.utils import process_token

    return [process_token(tokenizer.decode([int(t)])) for t in ids]


def build_viewer_data(
    graph_dir: str | os.PathLike,
    model,
    texts: Iterable[str],
    *,
    n_tokens: int = 16384,
    seq_len: int = 64,
    n_examples: int = 12,
    context: tuple[int, int] = (12, 4),
    top_k_links: int = 8,
    n_logits: int = 8,
) -> list[Path]:
    """Write feature pages and decompositions for the graphs in ``graph_dir``.

    Args:
        graph_dir: a graph file directory (``graph-metadata.json`` + ``<slug>.json``).
        model: the ``ReplacementModel`` the graphs were built with (its transcoders are
            run at full width whatever prefix it is set to).
        texts: corpus documents (e.g. ``matryoshka_plugin.offline`` Austen novels).
        n_tokens: corpus tokens to scan.
        seq_len: tokens per forward pass (BOS included).
        n_examples: top-activating contexts per feature.
        context: tokens shown before and after the top token.
        top_k_links: refinement / parent links kept per list.
        n_logits: top and bottom output tokens per feature.

    Returns the per-scan output directories (each replaced atomically).
    """
    from ..adapters.circuit_tracer.prefix_transcoders import prefix_truncation

    graph_dir = Path(graph_dir)
    graphs = read_graphs(graph_dir)
    per_scan = graph_features(graph_dir, graphs)
    if not per_scan:
        raise ValueError(f"{graph_dir} holds no graph JSON files")
    transcoders = model.transcoders
    tokenizer = model.tokenizer
    chunks = corpus_chunks(tokenizer, texts, n_tokens, seq_len)
    layers = sorted({l for info in per_scan.values() for l in info["layers"]})
    width = int(transcoders.d_transcoder)
    wanted = {l: torch.tensor(sorted({f for i in per_scan.values() for f in i["layers"].get(l, ())}), dtype=torch.long) for l in layers}

    both = {l: torch.zeros(len(wanted[l]), width, dtype=torch.float64) for l in layers}
    count = {l: torch.zeros(width, dtype=torch.float64) for l in layers}
    # Per layer and wanted latent: all its activations (for quantiles) and the top contexts.
    acts_of = {l: [] for l in layers}
    top = {l: [] for l in layers}  # list of (values [F, n], chunk idx [F, n], pos [F, n])
    with prefix_truncation(model, None), torch.inference_mode():
        for c, ids in enumerate(tqdm(chunks, desc="viewer corpus", unit="chunk")):
            _, acts = model.get_activations(ids[None] if ids.ndim == 1 else ids)
            acts = acts.float().cpu()  # [n_layers, n_pos, width]
            for l in layers:
                a = acts[l]
                a[0] = 0  # BOS activations are outliers that say nothing about the text
                b, n = coactivation_counts([a > 0], wanted[l], width)
                both[l] += b
                count[l] += n
                sel = a[:, wanted[l]].T  # [F, n_pos]
                acts_of[l].append(sel)
                k = min(n_examples, sel.shape[1])
                v, pos = sel.topk(k, dim=1)
                top[l].append((v, torch.full_like(pos, c), pos))

    W_U = model.unembed.W_U.float().cpu() if hasattr(model, "unembed") else None
    outputs = []
    for scan, info in per_scan.items():
        final = graph_dir / VIEWER_DIR / scan_id(scan)
        with atomic_dir(final) as tmp:
            feat_dir = tmp / "features"
            feat_dir.mkdir()
            levels = sorted(info["levels"]) or [width]
            decomp: dict[str, dict] = {}
            for l in sorted(info["layers"]):
                idx = {f: a for a, f in enumerate(wanted[l].tolist())}
                feats = sorted(info["layers"][l])
                rows = torch.tensor([idx[f] for f in feats], dtype=torch.long)
                res = decompose(
                    decoder_rows(transcoders, l).cpu(), feats, levels,
                    both=both[l][rows], count=count[l], top_k=top_k_links,
                )
                for f, d in decomposition_json(res).items():
                    decomp[f"{l}_{f}"] = {"layer": l, "feature": int(f), "frequency": float(count[l][int(f)] / max(1, len(chunks) * (seq_len - 1))), **d}
                allv = torch.cat(acts_of[l], dim=1)[rows]
                tv = torch.cat([t[0] for t in top[l]], dim=1)[rows]
                tc = torch.cat([t[1] for t in top[l]], dim=1)[rows]
                tp = torch.cat([t[2] for t in top[l]], dim=1)[rows]
                out_dir = output_direction(transcoders, l).cpu()
                for r, f in enumerate(feats):
                    page = _feature_page(
                        scan, l, f, allv[r], tv[r], tc[r], tp[r], chunks, tokenizer,
                        n_examples, context, out_dir[f] @ W_U if W_U is not None else None, n_logits,
                    )
                    (feat_dir / f"{cantor(l, f)}.json").write_text(json.dumps(page))
            (tmp / "decomposition.json").write_text(json.dumps({
                "scan": scan,
                "width": width,
                "levels": levels,
                "corpus_tokens": len(chunks) * (seq_len - 1),
                "score": "|cosine| * coactivation (overlap coefficient of active-token sets)",
                "features": decomp,
            }))
        outputs.append(final)
    return outputs


def _feature_page(scan, layer, feature, allv, tv, tc, tp, chunks, tokenizer, n_examples, context, logit_effect, n_logits):
    nonzero = allv[allv > 0]
    order = tv.argsort(descending=True)[:n_examples]
    before, after = context
    examples = []
    for k in order.tolist():
        if tv[k] <= 0:
            break
        c, p = int(tc[k]), int(tp[k])
        ids = chunks[c]
        lo, hi = max(1, p - before), min(len(ids), p + after + 1)
        examples.append((c, p, lo, hi))
    # Per-token activations of this latent over each example's window.
    per_chunk = allv.reshape(len(chunks), -1)
    ex_json = []
    for c, p, lo, hi in examples:
        ex_json.append({
            "tokens": _token_strings(tokenizer, chunks[c][lo:hi]),
            "tokens_acts_list": [round(float(v), 4) for v in per_chunk[c, lo:hi]],
            "train_token_ind": p - lo,
            "is_repeated_datapoint": False,
        })
    if nonzero.numel():
        q = torch.linspace(0.01, 1.0, 100)
        quantiles = torch.quantile(nonzero, q).tolist()
        act_max = float(nonzero.max())
        hist = torch.histc(nonzero, bins=32, min=0.0, max=act_max).tolist()
    else:
        quantiles, act_max, hist = [], 1.0, [0.0] * 32
    top_logits = bottom_logits = []
    if logit_effect is not None:
        k = min(n_logits, logit_effect.numel())
        top_logits = _token_strings(tokenizer, logit_effect.topk(k).indices)
        bottom_logits = _token_strings(tokenizer, (-logit_effect).topk(k).indices)
    return {
        "transcoder_id": str(scan),
        "index": cantor(layer, feature),
        "layer": layer,
        "feature": feature,
        "examples_quantiles": [{"quantile_name": f"Top activations (layer {layer}, latent {feature})", "examples": ex_json}],
        "top_logits": top_logits,
        "bottom_logits": bottom_logits,
        "act_min": 0.0,
        "act_max": act_max,
        "quantile_values": quantiles,
        "histogram": hist,
        "activation_frequency": float(nonzero.numel() / max(1, allv.numel() - len(chunks))),
    }
