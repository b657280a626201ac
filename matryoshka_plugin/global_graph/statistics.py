"""The corpus pass of a global graph: token rows of a text corpus, co-activation statistics.

``corpus_token_batches`` tokenizes a text file, a folder of ``.txt`` files or the
offline Austen corpus into BOS-led rows; ``gather_statistics`` runs the model on them
once, encodes every chosen layer's MLP input with that layer's transcoder (or CLT source
layer) and sums the co-activations ``core.edge_scores.CoactivationStats`` needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.edge_scores import CoactivationStats
from ..core.errors import GlobalGraphError
from ..hooks import capture_mlps, mlp_modules


def corpus_token_batches(
    tokenizer, corpus: str | Path, ctx_len: int, batch_size: int, max_tokens: int | None = None
) -> Iterable[Tensor]:
    """``[batch, ctx_len]`` token batches of a text file, a folder of ``.txt`` files, or
    ``austen`` (the offline Jane Austen corpus). Raises on a corpus with no tokens.
    Tokenizing stops once ``max_tokens`` (plus one row) are in hand."""
    if ctx_len < 2:
        raise GlobalGraphError(f"--ctx-len {ctx_len} is too small; allowed: 2 or more")
    if str(corpus) == "austen":
        from ..corpus import austen_texts

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
    forward stops before the last transcoder layer's MLP.
    """
    if n_tokens < 1:
        raise GlobalGraphError(f"--n-tokens {n_tokens} must be positive")
    mlps = mlp_modules(model)
    bad = [l for l in coders if l not in mlps]
    if bad:
        raise GlobalGraphError(f"the model has no MLP at layers {bad}; allowed: 0..{max(mlps)}")
    stats = CoactivationStats({l: int(c.num_latents) for l, c in coders.items()})
    bar = tqdm(total=n_tokens, desc="co-activation statistics", unit="tok", disable=not show_progress)
    with capture_mlps(model, sorted(coders), outputs=False) as run, bar:
        for batch in token_batches:
            if stats.n_tokens >= n_tokens:
                break
            codes = {}
            for layer, acts in run(batch).items():
                x = acts.input[:, 1:].reshape(-1, acts.input.shape[-1])
                coder = coders[layer]
                out = coder.encode(x.to(coder.dtype))
                codes[layer] = (out.top_acts, out.top_indices)
            stats.update(codes)
            bar.update(min(batch.shape[0] * (batch.shape[1] - 1), n_tokens - bar.n))
    if stats.n_tokens == 0:
        raise GlobalGraphError("the corpus gave no tokens to gather statistics on")
    return stats
