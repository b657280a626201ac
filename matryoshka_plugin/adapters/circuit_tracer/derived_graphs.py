"""Coarser prefix graphs derived from one finer attribution, exactly.

Why it is exact. circuit-tracer's local replacement model freezes attention patterns and
normalisation scales, and its forward values are the real model's whatever the prefix
length P, so every backward pass sees the same linear map J from a layer's MLP output to
a target (a feature's encoder direction or a logit). An edge is a contraction through J:
``A[t, s] = enc_t . J . (a_s W_dec_s)``, an error node's edge is ``enc_t . J . e``.
Truncating to P keeps the values of latents < P (TopK / JumpReLU run over the full width
first) and moves what latents >= P write into the error nodes:
``e_P[l, pos] = e_finer[l, pos] + D_P[l, pos]``, ``D_P`` the sum of the dropped latents'
scaled decoder vectors writing to (l, pos). So the graph at P is the finer graph with

- the feature nodes of latents >= P removed, rows and columns (every other edge is the
  same contraction with the same vectors);
- each error node's column plus ``enc_t . J . D_P[l, pos]`` (the removed features'
  contribution to that layer's error);
- activation values, logit targets and probabilities unchanged (the targets come from the
  model's logits, which no P changes).

For per-layer transcoders ``enc_t . J . D_P[l, pos]`` is just the sum of the removed
features' columns. A cross-layer feature writes to every later layer and its column is
the sum over those layers, which cannot be split afterwards; so ``recording_error_deltas``
computes the contractions with each ``D_P`` during the finer attribution (one extra
contraction per layer and prefix length in the backward hooks circuit-tracer already
runs), for both kinds alike.

Where it is not exact: with ``max_feature_nodes`` pruning, the finer attribution visits
only its most influential features, and the graph at P ranks and visits a different set;
``error_deltas`` then returns None with the reason, and the caller attributes directly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from circuit_tracer.attribution.context_transformerlens import AttributionContext
from circuit_tracer.graph import Graph
from torch import Tensor


class ErrorDeltaRecorder:
    """What the latents >= each prefix length add to each row's error-node edges.

    Attached to circuit-tracer's ``AttributionContext`` (TransformerLens backend) by
    ``recording_error_deltas``: extra buffer rows of ``compute_batch`` hold, per prefix
    length and layer, the gradient contracted with ``D_P[layer]``; they are split off
    before circuit-tracer sees the rows, so the finer graph itself is unchanged.
    """

    def __init__(self, prefix_lens: Sequence[int]):
        self.prefix_lens = list(prefix_lens)
        self.rows: list[Tensor] = []
        self.grid: tuple[int, int] | None = None  # (n_layers, n_pos) once attached
        self.not_attached = "the attribution never ran setup_attribution"

    def attach(self, ctx) -> None:
        if not isinstance(ctx, AttributionContext):
            self.not_attached = f"the {type(ctx).__module__} backend has no TransformerLens hooks to extend"
            return
        n_layers, n_pos, _ = ctx.activation_matrix.shape
        latent = ctx.activation_matrix.indices()[2][ctx.encoder_to_decoder_map]
        out_layer, pos = ctx.decoder_locations
        deltas = []
        for p in self.prefix_lens:
            dropped = latent >= p
            d = ctx.decoder_vecs.new_zeros(n_layers, n_pos, ctx.decoder_vecs.shape[-1])
            d.index_put_((out_layer[dropped], pos[dropped]), ctx.decoder_vecs[dropped], accumulate=True)
            deltas.append(d)
        base = ctx._row_size
        ctx._row_size += len(deltas) * n_layers * n_pos
        make_hooks, compute_batch = ctx._make_attribution_hooks, ctx.compute_batch

        def make_attribution_hooks(hook: str):
            hooks = make_hooks(hook)
            for i, d in enumerate(deltas):
                for layer in range(n_layers):
                    start = base + (i * n_layers + layer) * n_pos
                    hooks.append(
                        ctx._compute_score_hook(f"blocks.{layer}.{hook}", d[layer], np.s_[start : start + n_pos])
                    )
            return hooks

        def compute_batch_split(*args, **kwargs):
            rows = compute_batch(*args, **kwargs)
            self.rows.append(rows[:, base:].cpu())
            return rows[:, :base]

        ctx._make_attribution_hooks = make_attribution_hooks
        ctx.compute_batch = compute_batch_split
        self.grid = (n_layers, n_pos)
        self.not_attached = ""

    def error_deltas(self, graph: Graph) -> tuple[dict[int, Tensor] | None, str]:
        """Per prefix length, a ``[graph nodes, n_layers * n_pos]`` tensor in ``graph``'s
        row order to add to its error-node columns; or None and why it cannot be exact."""
        if self.grid is None:
            return None, self.not_attached
        n_features = int(graph.active_features.shape[0])
        n_selected = int(graph.selected_features.shape[0])
        if n_selected < n_features:
            return None, (
                f"max_feature_nodes pruned the finer graph to {n_selected} of {n_features} features, "
                "and pruning at a smaller prefix keeps a different set"
            )
        n_logits = len(graph.logit_targets)
        recorded = torch.cat(self.rows)
        # compute_batch ran the logit rows first, then (unpruned) every feature in order.
        assert recorded.shape[0] == n_logits + n_features, (recorded.shape, n_logits, n_features)
        n_nodes = graph.adjacency_matrix.shape[0]
        per_row = recorded.new_zeros(n_nodes, recorded.shape[1])
        per_row[:n_features] = recorded[n_logits:]
        per_row[n_nodes - n_logits :] = recorded[:n_logits]
        cells = self.grid[0] * self.grid[1]
        return {p: per_row[:, i * cells : (i + 1) * cells] for i, p in enumerate(self.prefix_lens)}, ""


@contextmanager
def recording_error_deltas(model, prefix_lens: Sequence[int]) -> Iterator[ErrorDeltaRecorder]:
    """Attach an ``ErrorDeltaRecorder`` for ``prefix_lens`` to the next attribution's context."""
    recorder = ErrorDeltaRecorder(prefix_lens)
    original = model.setup_attribution
    shadowed = model.__dict__.get("setup_attribution")

    def setup_attribution(inputs):
        ctx = original(inputs)
        recorder.attach(ctx)
        return ctx

    model.setup_attribution = setup_attribution
    try:
        yield recorder
    finally:
        if shadowed is None:
            model.__dict__.pop("setup_attribution", None)
        else:
            model.setup_attribution = shadowed


def derive_prefix_graph(finer: Graph, prefix_len: int, error_deltas: Tensor) -> Graph:
    """The graph at ``prefix_len`` from an unpruned finer graph and its ``error_deltas``
    (``ErrorDeltaRecorder.error_deltas(finer)[prefix_len]``)."""
    n_features = int(finer.active_features.shape[0])
    keep = (finer.active_features[:, 2] < prefix_len).cpu()
    kept = torch.nonzero(keep).flatten()
    n_nodes = finer.adjacency_matrix.shape[0]
    order = torch.cat([kept, torch.arange(n_features, n_nodes)])
    adjacency = finer.adjacency_matrix[order][:, order]
    n_errors = error_deltas.shape[1]
    errors = slice(len(kept), len(kept) + n_errors)
    adjacency[:, errors] += error_deltas[order].to(adjacency.dtype)
    device = finer.active_features.device
    return Graph(
        input_string=finer.input_string,
        input_tokens=finer.input_tokens,
        active_features=finer.active_features[keep.to(device)],
        activation_values=finer.activation_values[keep.to(finer.activation_values.device)],
        selected_features=torch.arange(len(kept), device=finer.selected_features.device),
        adjacency_matrix=adjacency,
        cfg=finer.cfg,
        logit_targets=finer.logit_targets,
        logit_probabilities=finer.logit_probabilities,
        scan=finer.scan,
        vocab_size=finer.vocab_size,
    )
