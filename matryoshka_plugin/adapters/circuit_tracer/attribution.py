"""Attribution graphs of transcoders truncated to Matryoshka prefixes.

``attribute`` is circuit-tracer's own ``attribute`` run inside ``prefix_truncation``.
``attribute_prefixes`` builds one graph per prefix length for the same prompt, with
circuit-tracer's replacement and completeness scores, and runs the model's setup
forward once for all of them (``reusing_setup_forward``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import NamedTuple

import torch
from circuit_tracer import attribute as ct_attribute
from circuit_tracer.graph import Graph, compute_graph_scores

from ...core.errors import UsageError
from ...core.prefixes import check_prefix_len
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


def attribute_prefixes(
    prompt, model, prefix_lens: Sequence[int | None], **kwargs
) -> list[PrefixGraph]:
    """One graph per prefix length (None: full width) for the same prompt, with scores.

    All prefix lengths are checked before any work; the setup forward is shared
    (TransformerLens backend).
    """
    width = transcoder_width(model.transcoders)
    # Not core.prefixes.check_prefix_lens: None (the full width) is allowed here.
    prefix_lens = [p if p is None else check_prefix_len(p, width) for p in prefix_lens]
    if len(set(prefix_lens)) != len(prefix_lens):
        raise UsageError(f"prefix lengths {prefix_lens} repeat a value; give each once")
    check_prompt(prompt, model)
    results = []
    reuse = reusing_setup_forward(model) if hasattr(model, "run_with_hooks") else nullcontext()
    with reuse:
        for p in prefix_lens:
            start = time.perf_counter()
            graph = attribute(prompt, model, prefix_len=p, **kwargs)
            seconds = time.perf_counter() - start
            replacement, completeness = compute_graph_scores(graph)
            results.append(PrefixGraph(p, graph, seconds, replacement, completeness))
    return results
