"""Attribution graphs of transcoders truncated to Matryoshka prefixes.

``attribute`` is circuit-tracer's own ``attribute`` run inside ``prefix_truncation``.
``attribute_prefixes`` builds one graph per prefix length for the same prompt, with
circuit-tracer's replacement and completeness scores and the pruned graph's path length
(``evaluation.graph_paths``): it attributes the largest prefix
length and derives the smaller ones from it (``derived_graphs``), or attributes each one
directly where deriving would not be exact, running the model's setup forward once for
all of them (``reusing_setup_forward``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import NamedTuple

import torch
from circuit_tracer import attribute as ct_attribute
from circuit_tracer.graph import Graph, compute_graph_scores

from ...core.errors import UsageError
from ...core.prefixes import check_prefix_len
from ...evaluation.graph_paths import PathLength, path_length
from .derived_graphs import derive_prefix_graph, recording_error_deltas
from .prefix_transcoders import prefix_truncation, transcoder_width


def check_prompt(prompt, model) -> None:
    """Raise a one-line error for a prompt with no tokens, or one longer than the model's
    context (``cfg.n_ctx``, with the special token circuit-tracer prepends)."""
    if isinstance(prompt, str):
        ids = model.tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) == 0:
            raise UsageError(f"prompt {prompt!r} has no tokens; give a non-empty prompt")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    n_tokens = len(model.ensure_tokenized(prompt))
    if n_ctx is not None and n_tokens > n_ctx:
        raise UsageError(
            f"the prompt is {n_tokens} tokens (with the prepended special token); the model "
            f"takes at most n_ctx={n_ctx}: shorten it"
        )


def attribute(prompt, model, *, prefix_len: int | None = None, **kwargs) -> Graph:
    """circuit-tracer's ``attribute`` with the model's latents truncated to ``prefix_len``."""
    check_prompt(prompt, model)
    with prefix_truncation(model, prefix_len):
        return ct_attribute(prompt, model, **kwargs)


@contextmanager
def reusing_setup_forward(model) -> Iterator[None]:
    """Reuse the model forward of ``setup_attribution`` across repeated attributions.

    ``setup_attribution`` runs the model once to cache MLP inputs/outputs and the
    logits; none of that depends on the prefix length. Its one ``run_with_hooks`` call
    is answered from a memo for a repeated prompt, replaying the recorded hook inputs to
    the new caching hooks. The transcoder encoding (cheap) and the batched forward that
    carries circuit-tracer's backward hooks (which capture the P-dependent decoder and
    error vectors when they are installed) still run per prefix.
    """
    original = model.run_with_hooks
    shadowed = model.__dict__.get("run_with_hooks")
    memo: dict = {}

    def run_with_hooks(tokens, *args, fwd_hooks=(), **kwargs):
        plain = not args and not kwargs and all(isinstance(n, str) for n, _ in fwd_hooks)
        if not plain:
            return original(tokens, *args, fwd_hooks=fwd_hooks, **kwargs)
        key = (tuple(torch.as_tensor(tokens).flatten().tolist()), tuple(n for n, _ in fwd_hooks))
        if memo.get("key") == key:
            for (name, fn), act in zip(fwd_hooks, memo["acts"]):
                fn(act, hook=SimpleNamespace(name=name))
            return memo["logits"]
        recorded: list = [None] * len(fwd_hooks)

        def recording(i, fn):
            def hook(act, hook):
                recorded[i] = act.detach().clone()
                return fn(act, hook=hook)

            return hook

        wrapped = [(name, recording(i, fn)) for i, (name, fn) in enumerate(fwd_hooks)]
        logits = original(tokens, fwd_hooks=wrapped)
        memo.update(key=key, acts=recorded, logits=logits)
        return logits

    model.run_with_hooks = run_with_hooks
    try:
        yield
    finally:
        if shadowed is None:
            model.__dict__.pop("run_with_hooks", None)
        else:
            model.run_with_hooks = shadowed


class PrefixGraph(NamedTuple):
    prefix_len: int | None
    graph: Graph
    seconds: float
    replacement: float
    completeness: float
    # Steps from the embeddings to the logit, in the graph pruned at circuit-tracer's
    # default thresholds (``evaluation.graph_paths``).
    path_length: PathLength
    # True: derived from the finest graph of the same call (seconds: the derivation).
    derived: bool = False


def _scored(p: int | None, graph: Graph, start: float, derived: bool) -> PrefixGraph:
    seconds = time.perf_counter() - start
    return PrefixGraph(p, graph, seconds, *compute_graph_scores(graph), path_length(graph), derived=derived)


def attribute_prefixes(
    prompt, model, prefix_lens: Sequence[int | None], *, derive: bool = True, **kwargs
) -> list[PrefixGraph]:
    """One graph per prefix length (None: full width) for the same prompt, with scores.

    All prefix lengths are checked before any work; the setup forward is shared
    (TransformerLens backend). With ``derive`` (the default) only the largest prefix
    length is attributed, and the smaller ones are derived from it exactly
    (``derived_graphs``); where that cannot be exact (``max_feature_nodes`` pruned the
    finest graph, or a backend without TransformerLens hooks) they are attributed
    directly and a warning says why. ``derive=False`` attributes every one directly.
    """
    width = transcoder_width(model.transcoders)
    # Not core.prefixes.check_prefix_lens: None (the full width) is allowed here.
    prefix_lens = [p if p is None else check_prefix_len(p, width) for p in prefix_lens]
    if len(set(prefix_lens)) != len(prefix_lens):
        raise UsageError(f"prefix lengths {prefix_lens} repeat a value; give each once")
    check_prompt(prompt, model)

    def length(p: int | None) -> int:
        return width if p is None else p

    finest = max(prefix_lens, key=length)
    coarser = [p for p in prefix_lens if p != finest] if derive else []
    by_len: dict[int | None, PrefixGraph] = {}
    reuse = reusing_setup_forward(model) if hasattr(model, "run_with_hooks") else nullcontext()
    with reuse:
        deltas = None
        if coarser:
            start = time.perf_counter()
            with recording_error_deltas(model, [length(p) for p in coarser]) as recorder:
                graph = attribute(prompt, model, prefix_len=finest, **kwargs)
            by_len[finest] = _scored(finest, graph, start, derived=False)
            deltas, why_not = recorder.error_deltas(graph)
            if deltas is None:
                warnings.warn(f"prefix graphs attributed directly, not derived from the finest one: {why_not}")
        for p in prefix_lens:
            if p in by_len:
                continue
            start = time.perf_counter()
            if deltas is not None:
                by_len[p] = _scored(p, derive_prefix_graph(by_len[finest].graph, length(p), deltas[length(p)]), start, True)
            else:
                by_len[p] = _scored(p, attribute(prompt, model, prefix_len=p, **kwargs), start, False)
    return [by_len[p] for p in prefix_lens]
