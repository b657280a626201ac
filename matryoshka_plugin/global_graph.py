"""Global feature graphs of sparsify transcoders or a CLT on a model: ``matryoshka-global``.

One pass over a corpus runs the model, encodes every transcoder layer's MLP input
(sparsify's own ``encode``) and gathers the sparse co-activation statistics of
``core.global_graph``; then, per prefix length ``P``, the ERA / TWERA / virtual-weight
edges between the first ``P`` latents of every ordered layer pair are written as JSON and
CSV edge lists with a PNG plot.

The target encoder reads the MLP input, which is the residual stream after the pre-MLP
norm; the norm's elementwise gain is folded into the encoder (``W_enc * g``) so that the
virtual weight is taken in residual-stream coordinates. The per-token ``1/rms`` factor is
not (it is context dependent), as in Anthropic's global weights.

A cross-layer transcoder (a ``save_clt`` directory, e.g. ``matryoshka-clt train``'s
``save_dir/clt``) is detected by its ``config.json``. Each source layer's MLP input is
encoded with ``encode_layer`` in the same single pass, and the decoder of a layer pair is
the CLT's effective decoder (``core.global_graph.clt_effective_decoders``): the sum of the
source's decoder slots that write before the target layer's MLP.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters.circuit_tracer.export import ExportError, hookpoint_layer
from .atomic import atomic_dir
from .adapters.sparsify import load_coder
from .core.errors import CheckpointError
from .core.global_graph import (
    CoactivationStats,
    Edges,
    GlobalGraphError,
    check_prefix,
    clt_effective_decoders,
    era_edges,
)

PROG = "matryoshka-global"
RANK_BY = ("twera", "era", "virtual_weight")
EDGE_FIELDS = ("source_layer", "source", "target_layer", "target", "virtual_weight", "era", "twera", "coactive_count")


def find_transcoders(checkpoint: Path | str, layers: Sequence[int] | None = None) -> dict[int, object]:
    """``{layer: coder}`` of a sparsify run directory (``<hookpoint>/cfg.json`` per MLP).

    ``layers`` picks a subset; each must have a transcoder with an encoder, and at least
    two layers are needed for an edge.
    """
    root = Path(checkpoint)
    if not root.is_dir():
        raise GlobalGraphError(f"checkpoint {root} is not a directory")
    found: dict[int, Path] = {}
    for cfg in sorted(root.glob("*/cfg.json")):
        try:
            found[hookpoint_layer(cfg.parent.name)] = cfg.parent
        except ExportError:
            continue
    if layers is None:
        layers = sorted(found)
    missing = [l for l in layers if l not in found]
    if missing:
        raise GlobalGraphError(
            f"checkpoint {root} has no encoder at layers {missing}; it has transcoders at layers {sorted(found)}"
        )
    if len(set(layers)) < 2:
        raise GlobalGraphError(
            f"a global graph needs transcoders at two or more layers; {root} gives layers {sorted(set(layers))}"
        )
    coders = {}
    for layer in sorted(set(layers)):
        coder = load_coder(found[layer])
        if getattr(coder, "encoder", None) is None or getattr(coder, "W_dec", None) is None:
            raise GlobalGraphError(f"{found[layer]} has no encoder and decoder; a global graph needs both")
        if not coder.cfg.transcode:
            raise GlobalGraphError(
                f"{found[layer]} is an SAE (transcode=False); the global graph joins transcoder "
                "decoders (MLP outputs) to later encoders (MLP inputs)"
            )
        coders[layer] = coder
    return coders


def clt_checkpoint_dir(checkpoint: Path | str) -> Path | None:
    """The CLT directory of ``checkpoint`` (itself, or a ``matryoshka-clt train`` run's
    ``clt/``) when it holds a matryoshka CLT ``config.json``, else None."""
    from .adapters.clt import CONFIG_FILE, FORMAT

    root = Path(checkpoint)
    for cand in (root, root / "clt"):
        try:
            d = json.loads((cand / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("format") == FORMAT:
            return cand
    return None


class CLTSourceEncoder:
    """One source layer of a CLT with the ``encode``/``num_latents``/``dtype`` face of a
    sparsify coder, so ``gather_statistics`` encodes a CLT layer as it does a transcoder."""

    def __init__(self, clt, slot: int):
        self.clt, self.slot = clt, slot
        self.num_latents = clt.num_latents
        self.d_in = clt.d_model
        self.dtype = clt.b_dec.dtype

    def encode(self, x: Tensor):
        return self.clt.encode_layer(x, self.slot)


def find_clt(checkpoint: Path | str, layers: Sequence[int] | None = None):
    """``(clt, {layer: CLTSourceEncoder})`` of a CLT directory; ``layers`` picks source and
    target layers among the CLT's (default: all), at least two."""
    from .adapters.clt import load_clt

    path = clt_checkpoint_dir(checkpoint)
    if path is None:
        raise GlobalGraphError(f"checkpoint {checkpoint} holds no matryoshka CLT config.json")
    clt = load_clt(path)
    if layers is None:
        layers = list(clt.layers)
    missing = [l for l in layers if l not in clt.layers]
    if missing:
        raise GlobalGraphError(f"--layers {missing} are not in the CLT {path}; allowed: {clt.layers}")
    if len(set(layers)) < 2:
        raise GlobalGraphError(
            f"a global graph needs two or more layers; the CLT {path} gives layers {sorted(set(layers))}"
        )
    return clt, {l: CLTSourceEncoder(clt, clt.layers.index(l)) for l in sorted(set(layers))}


def mlp_norm_gains(model, layers: Iterable[int]) -> dict[int, Tensor | None]:
    """The elementwise gain of each layer's pre-MLP norm (Llama/GPT-2/NeoX names), or None."""
    from .clt import mlp_modules

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


def corpus_token_batches(
    tokenizer, corpus: str | Path, ctx_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterable[Tensor]:
    """``[batch, ctx_len]`` token batches of a text file, a folder of ``.txt`` files, or
    ``austen`` (the offline Jane Austen corpus). Raises on a corpus with no tokens.
    Tokenizing stops once ``max_tokens`` (plus one row) are in hand."""
    if ctx_len < 2:
        raise GlobalGraphError(f"--ctx-len {ctx_len} is too small; allowed: 2 or more")
    if str(corpus) == "austen":
        from .corpus import austen_texts

        texts = list(austen_texts().values())
    else:
        path = Path(corpus)
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise GlobalGraphError(f"corpus folder {path} holds no .txt files")
            texts = [f.read_text(errors="replace") for f in files]
        elif path.is_file():
            texts = [path.read_text(errors="replace")]
        else:
            raise GlobalGraphError(f"corpus {path} is not a file, a folder of .txt files, or 'austen'")
    ids: list[int] = []
    for text in texts:
        if max_tokens is not None and len(ids) >= max_tokens + ctx_len:
            break
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    # Each row starts with BOS (position 0 is dropped from the statistics later).
    step = ctx_len - 1 if bos is not None else ctx_len
    rows = [ids[s : s + step] for s in range(0, len(ids), step)]
    rows = [r for r in rows if len(r) == step]
    if not rows:
        raise GlobalGraphError(
            f"corpus {corpus} tokenizes to {len(ids)} tokens, fewer than one {ctx_len}-token row; "
            "give a longer (non-empty) text or a smaller --ctx-len"
        )
    tokens = torch.tensor(rows, dtype=torch.long)
    if bos is not None:
        tokens = torch.cat([torch.full((len(rows), 1), bos, dtype=torch.long), tokens], 1)
    return tokens.split(batch_size)


class _StopForward(Exception):
    pass


@torch.no_grad()
def gather_statistics(
    model,
    coders: dict[int, object],
    token_batches: Iterable[Tensor],
    *,
    n_tokens: int,
    show_progress: bool = True,
) -> CoactivationStats:
    """One pass: each layer's MLP input encoded by its transcoder, co-activations summed.

    Position 0 (BOS, an outlier circuit-tracer never attributes through) is skipped; the
    forward stops after the last transcoder layer.
    """
    from .clt import mlp_modules

    if n_tokens < 1:
        raise GlobalGraphError(f"--n-tokens {n_tokens} must be positive")
    mlps = mlp_modules(model)
    bad = [l for l in coders if l not in mlps]
    if bad:
        raise GlobalGraphError(f"the model has no MLP at layers {bad}; allowed: 0..{max(mlps)}")
    stats = CoactivationStats({l: int(c.num_latents) for l, c in coders.items()})
    last = max(coders)
    codes: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(layer):
        def pre(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x[:, 1:].reshape(-1, x.shape[-1])
            coder = coders[layer]
            out = coder.encode(x.to(coder.dtype))
            codes[layer] = (out.top_acts, out.top_indices)
            if layer == last:
                raise _StopForward

        return pre

    handles = [mlps[l][1].register_forward_pre_hook(hook(l), with_kwargs=True) for l in coders]
    device = next(model.parameters()).device
    bar = tqdm(total=n_tokens, desc="co-activation statistics", unit="tok", disable=not show_progress)
    try:
        for batch in token_batches:
            if stats.n_tokens >= n_tokens:
                break
            codes.clear()
            try:
                model(input_ids=batch.to(device))
            except _StopForward:
                pass
            stats.update(codes)
            bar.update(min(batch.shape[0] * (batch.shape[1] - 1), n_tokens - bar.n))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    if stats.n_tokens == 0:
        raise GlobalGraphError("the corpus gave no tokens to gather statistics on")
    return stats


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
            dec = dec[: check_prefix(prefix_len, clt.num_latents)]
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


def _parse_layers(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    from .clt import parse_layers

    return parse_layers(spec)


def main(argv: list[str] | None = None) -> int:
    from .adapters.clt import CLTError
    from .offline import OfflineAssetError

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Global (input-independent) feature graph of sparsify transcoders or a cross-layer "
        "transcoder: virtual weights W_dec,i . W_enc,j between layers, weighted by corpus co-activation "
        "(ERA, TWERA), per Matryoshka prefix.",
    )
    parser.add_argument(
        "checkpoint",
        help="sparsify run directory with one <hookpoint>/ transcoder per MLP layer, or a CLT directory "
        "(matryoshka-clt train's save_dir/clt, or save_dir itself)",
    )
    parser.add_argument("--corpus", required=True, help="a text file, a folder of .txt files, or 'austen'")
    parser.add_argument("--model", default="smollm2", help="HF model folder, .gguf file, or 'smollm2' (default)")
    parser.add_argument("--prefix-len", type=int, nargs="+", required=True, metavar="P", help="prefix lengths")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--layers", help="transcoder/CLT layers to use, e.g. 0-2 (default: all in the checkpoint)")
    parser.add_argument("--n-tokens", type=int, default=20000, help="corpus tokens for the statistics")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16, help="edges kept per source feature")
    parser.add_argument("--threshold", type=float, default=0.0, help="drop edges with |score| <= this")
    parser.add_argument("--rank-by", choices=RANK_BY, default="twera")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1:
            raise GlobalGraphError(f"--top-k {args.top_k} must be at least 1")
        if len(set(args.prefix_len)) != len(args.prefix_len):
            raise GlobalGraphError(f"--prefix-len {args.prefix_len} repeats a value; give each once")
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise GlobalGraphError(f"--out {out} already exists; choose a new path or pass --overwrite")
        clt = None
        if clt_checkpoint_dir(args.checkpoint) is not None:
            clt, coders = find_clt(args.checkpoint, _parse_layers(args.layers))
        else:
            coders = find_transcoders(args.checkpoint, _parse_layers(args.layers))
        width = min(int(c.num_latents) for c in coders.values())
        for p in args.prefix_len:
            check_prefix(p, width, "--prefix-len")
        from .offline import load_pretrained, load_tokenizer

        tokenizer = load_tokenizer(args.model)
        batches = corpus_token_batches(tokenizer, args.corpus, args.ctx_len, args.batch_size, args.n_tokens)
        model = load_pretrained(args.model)
        d_model = model.config.hidden_size
        bad = [l for l, c in coders.items() if c.d_in != d_model]
        if bad:
            raise GlobalGraphError(f"transcoders at layers {bad} read d_in != the model's hidden size {d_model}")
        start = time.perf_counter()
        stats = gather_statistics(model, coders, batches, n_tokens=args.n_tokens)
        gains = mlp_norm_gains(model, coders)
        opts = dict(k=args.top_k, threshold=args.threshold, rank_by=args.rank_by, gains=gains)
        if clt is not None:
            graphs = {p: build_clt_global_graph(clt, stats, p, **opts) for p in args.prefix_len}
            nested = list(clt.nested_sizes) if clt.cfg.matryoshka else []
        else:
            graphs = {p: build_global_graph(coders, stats, p, **opts) for p in args.prefix_len}
            nested = list(getattr(next(iter(coders.values())), "nested_sizes", []) or [])
        meta = {
            "checkpoint": str(Path(args.checkpoint).absolute()),
            "kind": "clt" if clt is not None else "transcoders",
            "model": args.model,
            "corpus": str(args.corpus),
            "layers": sorted(coders),
            "width": width,
            "nested_sizes": nested,
            "n_tokens": stats.n_tokens,
            "n_coactive_pairs": stats.n_pairs(),
            "top_k": args.top_k,
            "threshold": args.threshold,
            "rank_by": args.rank_by,
            "seconds": time.perf_counter() - start,
        }
        write_global_graphs(out, graphs, meta, rank_by=args.rank_by, overwrite=args.overwrite)
    except (GlobalGraphError, CheckpointError, ExportError, CLTError, OfflineAssetError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {out.absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
