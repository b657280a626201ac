"""``matryoshka-global`` end to end: checkpoint and corpus in, one graph per prefix out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import GlobalGraphError
from ..core.prefixes import check_prefix_len
from ..hooks import parse_layers
from .coders import clt_checkpoint_dir, find_clt, find_transcoders
from .statistics import corpus_token_batches, gather_statistics
from .edges import build_clt_global_graph, build_global_graph, mlp_norm_gains, write_global_graphs


def make_global_graphs(
    checkpoint: str | Path,
    *,
    corpus: str | Path,
    model: str,
    prefix_lens: Sequence[int],
    out: str | Path,
    layers: str | None = None,
    n_tokens: int = 20000,
    ctx_len: int = 128,
    batch_size: int = 8,
    top_k: int = 16,
    threshold: float = 0.0,
    rank_by: str = "twera",
    overwrite: bool = False,
) -> Path:
    """Global graphs of a sparsify transcoder run or a CLT directory, written to ``out``.

    Everything that can be checked without the model (flags, the checkpoint, the prefix
    lengths against its width) is checked before the model is loaded. The messages name
    the ``matryoshka-global`` flags.
    """
    if top_k < 1:
        raise GlobalGraphError(f"--top-k {top_k} must be at least 1")
    # Not core.prefixes.check_prefix_lens: this repeat check comes before the width is
    # known, and its wording ("repeats a value") is the script's own.
    if len(set(prefix_lens)) != len(prefix_lens):
        raise GlobalGraphError(f"--prefix-len {list(prefix_lens)} repeats a value; give each once")
    out = Path(out)
    if out.exists() and not overwrite:
        raise GlobalGraphError(f"--out {out} already exists; choose a new path or pass --overwrite")
    chosen = None if layers is None else parse_layers(layers)
    clt = None
    if clt_checkpoint_dir(checkpoint) is not None:
        clt, coders = find_clt(checkpoint, chosen)
    else:
        coders = find_transcoders(checkpoint, chosen)
    width = min(int(c.num_latents) for c in coders.values())
    for p in prefix_lens:
        check_prefix_len(p, width, "--prefix-len", GlobalGraphError)
    from ..offline import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(model)
    batches = corpus_token_batches(tokenizer, corpus, ctx_len, batch_size, n_tokens)
    hf_model = load_pretrained(model)
    d_model = hf_model.config.hidden_size
    bad = [l for l, c in coders.items() if c.d_in != d_model]
    if bad:
        raise GlobalGraphError(f"transcoders at layers {bad} read d_in != the model's hidden size {d_model}")
    start = time.perf_counter()
    stats = gather_statistics(hf_model, coders, batches, n_tokens=n_tokens)
    gains = mlp_norm_gains(hf_model, coders)
    opts = dict(k=top_k, threshold=threshold, rank_by=rank_by, gains=gains)
    if clt is not None:
        graphs = {p: build_clt_global_graph(clt, stats, p, **opts) for p in prefix_lens}
        nested = list(clt.nested_sizes) if clt.cfg.matryoshka else []
    else:
        graphs = {p: build_global_graph(coders, stats, p, **opts) for p in prefix_lens}
        nested = list(getattr(next(iter(coders.values())), "nested_sizes", []) or [])
    meta = {
        "checkpoint": str(Path(checkpoint).absolute()),
        "kind": "clt" if clt is not None else "transcoders",
        "model": model,
        "corpus": str(corpus),
        "layers": sorted(coders),
        "width": width,
        "nested_sizes": nested,
        "n_tokens": stats.n_tokens,
        "n_coactive_pairs": stats.n_pairs(),
        "top_k": top_k,
        "threshold": threshold,
        "rank_by": rank_by,
        "seconds": time.perf_counter() - start,
    }
    return write_global_graphs(out, graphs, meta, rank_by=rank_by, overwrite=overwrite)
