"""Automatic supernodes from the Matryoshka nesting (issue #15).

For graphs of one prompt at prefix lengths ``P_1 < P_2 < ...``, every feature node of the
graph at ``P_i`` (i > 1) whose latent is at or beyond ``P' = P_(i-1)`` gets a parent: the
latent below ``P'`` of the same layer (for a CLT, the same source layer) that scores best
on ``viewer.decomposition``'s measure, ``|cosine| * coactivation`` of the decoder rows of
the graph's own decoder and of the active-token sets on a corpus (``|cosine|`` alone
without a corpus). Nodes of one layer and one position that share a parent form a
supernode: it stands for the coarse graph's node ``{layer}_{parent}_{pos}``.

Written per fine graph, in the same graph directory:

- the graph file's ``qParams.supernodes`` (circuit-tracer's own format,
  ``[[name, node_id, ...], ...]``), with the members added to ``qParams.pinnedIds`` since
  the stock frontend draws supernodes in the pinned subgraph only;
- the sidecar ``<slug>.hierarchy.json``: ``{"prefix_len": P, "parent_prefix_len": P',
  "parents": {node_id: parent_latent_index}, "scores": {node_id: score}, ...}``.

Nodes, links, metadata and every score of a graph are left as they were. The coarsest
graph gets no sidecar: nothing lies below its prefix.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ...core.errors import UsageError
from ...core.decomposition import Link, coactivation_counts, decompose

FEATURE_TYPE = "cross layer transcoder"
SIDECAR_SUFFIX = ".hierarchy.json"
SCORE_WITH_CORPUS = "|cosine| * coactivation (overlap coefficient of active-token sets)"
SCORE_COSINE_ONLY = "|cosine| of decoder rows (no corpus given)"
#: Corpus tokens scanned for co-activation, and tokens per forward pass.
CORPUS_TOKENS = 8192
CORPUS_SEQ_LEN = 64


def feature_nodes(graph_json: dict) -> list[tuple[str, int, int, int]]:
    """``(node_id, layer, latent, pos)`` of each feature node (ids are ``layer_latent_pos``)."""
    out = []
    for node in graph_json["nodes"]:
        if node.get("feature_type") == FEATURE_TYPE:
            layer, latent, pos = (int(t) for t in node["node_id"].split("_"))
            out.append((node["node_id"], layer, latent, pos))
    return out


def assign_parents(
    W_dec: Tensor,
    children: Sequence[int],
    parent_prefix_len: int,
    *,
    both: Tensor | None = None,
    count: Tensor | None = None,
) -> dict[int, Link]:
    """Each latent of ``children`` (all ``>= parent_prefix_len``) -> its best latent below
    ``parent_prefix_len`` of one layer, with ``decompose``'s score.

    ``both``/``count`` are ``coactivation_counts`` for exactly ``children``.
    """
    if any(c < parent_prefix_len for c in children):
        raise ValueError(f"children {sorted(children)} must all be >= the parent prefix length {parent_prefix_len}")
    res = decompose(W_dec, children, [parent_prefix_len], both=both, count=count, top_k=1)
    return {c: d["parents"][0] for c, d in res.items()}


def hierarchy_sidecar(
    graph_json: dict,
    parents: dict[int, dict[int, Link]],
    prefix_len: int,
    parent_prefix_len: int,
    *,
    slug: str,
    parent_slug: str,
    score: str,
) -> dict:
    """The ``<slug>.hierarchy.json`` record of one graph, from ``{layer: {latent: Link}}``.

    Supernodes group the nodes of one (layer, position) that share a parent latent, in
    node order; their name says which coarse node they stand for.
    """
    node_parent, node_score = {}, {}
    groups: dict[tuple[int, int, int], list[str]] = defaultdict(list)
    for node_id, layer, latent, pos in feature_nodes(graph_json):
        if latent < parent_prefix_len:
            continue
        link = parents[layer][latent]
        node_parent[node_id] = link.feature
        node_score[node_id] = round(link.score, 5)
        groups[(layer, link.feature, pos)].append(node_id)
    supernodes = [
        [f"L{layer} parent {parent} (node {layer}_{parent}_{pos} at P={parent_prefix_len})", *members]
        for (layer, parent, pos), members in groups.items()
    ]
    return {
        "slug": slug,
        "parent_slug": parent_slug,
        "prefix_len": int(prefix_len),
        "parent_prefix_len": int(parent_prefix_len),
        "score": score,
        "parents": node_parent,
        "scores": node_score,
        "supernodes": supernodes,
    }


def with_supernodes(graph_json: dict, sidecar: dict) -> dict:
    """A copy of ``graph_json`` whose ``qParams`` carry the sidecar's supernodes (members
    pinned); nodes, links and metadata are the same objects, unchanged."""
    q = dict(graph_json.get("qParams") or {})
    members = [m for group in sidecar["supernodes"] for m in group[1:]]
    q["supernodes"] = [list(g) for g in sidecar["supernodes"]]
    q["pinnedIds"] = list(dict.fromkeys([*q.get("pinnedIds", []), *members]))
    return {**graph_json, "qParams": q}


# -- over a graph directory, with the replacement model ----------------------------------


def corpus_activity(model, texts: Iterable[str], wanted: dict[int, Tensor], n_tokens: int = CORPUS_TOKENS):
    """``{layer: (both, count)}`` co-activation counts of the ``wanted`` latents per layer
    over ``n_tokens`` corpus tokens, at full width (truncation only zeroes latents >= P,
    so activity below P is the same at every prefix)."""
    from ...corpus import corpus_chunks
    from .prefix_transcoders import prefix_truncation, transcoder_width

    width = transcoder_width(model.transcoders)
    try:
        chunks = corpus_chunks(model.tokenizer, texts, n_tokens, CORPUS_SEQ_LEN)
    except ValueError as e:
        raise UsageError(f"--supernode-corpus: {e}") from None
    counts = {l: (torch.zeros(len(f), width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)) for l, f in wanted.items()}
    with prefix_truncation(model, None), torch.inference_mode():
        for ids in chunks:
            _, acts = model.get_activations(ids[None])
            for l, feats in wanted.items():
                a = acts[l].float().cpu()
                a[0] = 0  # BOS activations say nothing about the text (as the viewer's data)
                b, c = coactivation_counts([a > 0], feats, width)
                counts[l][0].add_(b)
                counts[l][1].add_(c)
    return counts


def write_hierarchy(graph_dir: Path, graphs: Sequence[tuple[str, int]], model, texts: Iterable[str] | None = None) -> list[Path]:
    """Supernodes and sidecars for one prompt's graphs ``[(slug, prefix_len), ...]`` in
    ``graph_dir`` (graph files already written there); returns the sidecars written."""
    from .prefix_transcoders import decoder_rows, prefix_truncation

    order = sorted(graphs, key=lambda g: g[1])
    jsons = {slug: json.loads((graph_dir / f"{slug}.json").read_text()) for slug, _ in order}
    pairs = list(zip(order, order[1:]))
    children: dict[tuple[str, int], set[int]] = defaultdict(set)
    for (_, coarse), (slug, _) in pairs:
        for _, layer, latent, _ in feature_nodes(jsons[slug]):
            if latent >= coarse:
                children[(slug, layer)].add(latent)
    activity = None
    if texts is not None:
        wanted = defaultdict(set)
        for (_, layer), latents in children.items():
            wanted[layer] |= latents
        wanted = {l: torch.tensor(sorted(f), dtype=torch.long) for l, f in wanted.items()}
        activity = (wanted, corpus_activity(model, texts, wanted))
    written = []
    for (parent_slug, coarse), (slug, p) in pairs:
        parents = {}
        # The decoder of the graph at P (a level's own under nested_decoders).
        with prefix_truncation(model, p):
            for (s, layer), latents in children.items():
                if s != slug:
                    continue
                feats = sorted(latents)
                both = count = None
                if activity is not None:
                    row = {f: i for i, f in enumerate(activity[0][layer].tolist())}
                    both_all, count = activity[1][layer]
                    both = both_all[torch.tensor([row[f] for f in feats], dtype=torch.long)]
                parents[layer] = assign_parents(decoder_rows(model.transcoders, layer).cpu(), feats, coarse, both=both, count=count)
        sidecar = hierarchy_sidecar(
            jsons[slug], parents, p, coarse, slug=slug, parent_slug=parent_slug,
            score=SCORE_COSINE_ONLY if activity is None else SCORE_WITH_CORPUS,
        )
        (graph_dir / f"{slug}.json").write_text(json.dumps(with_supernodes(jsons[slug], sidecar)))
        path = graph_dir / f"{slug}{SIDECAR_SUFFIX}"
        path.write_text(json.dumps(sidecar, indent=2))
        written.append(path)
    return written


def read_corpus(path: str | Path) -> list[str]:
    """``--supernode-corpus``: a UTF-8 text file, one document (or paragraph) per blank-line block."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--supernode-corpus {p} is not a file; give a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--supernode-corpus {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise UsageError(f"--supernode-corpus {p} is empty; give a text file with some text")
    return docs
