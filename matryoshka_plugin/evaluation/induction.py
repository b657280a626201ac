"""Induction as a known circuit: is it visible in the attribution graph at each prefix?

A language model copies on a repeated random sequence: given random tokens r_1..r_n and
then r_1..r_m, it predicts r_{m+1}, reading it through attention from the position where
r_{m+1} sat the first time (an induction head), which found it because r_m stands just
before it (a previous-token head). Two measurements per prompt:

- ``graph_share`` (the graph): of the target logit's influence (circuit-tracer's node
  influence: absolute edge weights normalised per target), the share that comes from the
  source nodes (embeddings and error nodes, the nodes without inputs, whose influences
  sum to the logit's) at the earlier occurrence: r_{m+1}'s position and r_m's before it.
  ``tokens`` counts the embeddings there only: the part the graph explains from the
  prompt's tokens through features. ``position`` adds the error nodes there. The local
  replacement model freezes attention, so the earlier position reaches the last one
  through the frozen OV circuits in either case; what the prefix length changes is how
  much of it passes through features (and so back to the tokens) rather than stopping at
  an error node, a constant: ``tokens`` should fall as the prefix shrinks.
- ``ablation_drop`` (the real model): the target's logit with the attention of the last
  position to those two positions switched off in every layer and every head (their
  pattern weights zeroed and the row renormalised), against the clean logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from circuit_tracer.graph import Graph, compute_node_influence

from ..core.errors import UsageError


class InductionPrompt(NamedTuple):
    # Token ids as the model sees them (circuit-tracer's special token first).
    tokens: torch.Tensor
    # r_{m+1}, the token induction predicts at the last position.
    target: int
    # Positions of r_m and r_{m+1} in the first half (the earlier occurrence).
    sources: tuple[int, int]


class GraphShare(NamedTuple):
    # Share of the target logit's influence from the embeddings at the source positions.
    tokens: float
    # The same with the error nodes at those positions added.
    position: float


class AblationDrop(NamedTuple):
    # The target's logit minus the mean logit, without and with the ablation.
    clean: float
    ablated: float
    # The target's probability without and with it (does the model copy at all?).
    clean_prob: float
    ablated_prob: float

    @property
    def relative(self) -> float:
        """The drop as a fraction of the clean (demeaned) logit."""
        return (self.clean - self.ablated) / abs(self.clean)


def induction_prompt(model, vocab: Sequence[int], n: int, m: int, generator: torch.Generator) -> InductionPrompt:
    """r_1..r_n drawn without repeats from ``vocab``, then r_1..r_m, tokenised as
    circuit-tracer's ``model`` tokenises a prompt (its special token prepended)."""
    if not 1 <= m < n:
        raise UsageError(f"repeat length m={m} must be at least 1 and below the sequence length n={n}")
    if n > len(vocab):
        raise UsageError(f"n={n} distinct random tokens need a vocabulary of at least n ids, got {len(vocab)}")
    vocab = torch.as_tensor(list(vocab))
    first = vocab[torch.randperm(len(vocab), generator=generator)[:n]].tolist()
    tokens = model.ensure_tokenized(first + first[:m]).cpu()
    offset = len(tokens) - (n + m) - 1
    # r_i sits at position offset + i; the last position holds the repeated r_m.
    return InductionPrompt(tokens, first[m], (offset + m, offset + m + 1))


def node_positions(graph: Graph) -> torch.Tensor:
    """The token position of every node of ``graph`` in circuit-tracer's node order
    (features, errors layer by layer, embeddings; the logits: the last position)."""
    n_pos = graph.n_pos
    features = graph.active_features[graph.selected_features, 1].cpu()
    errors = torch.arange(graph.cfg.n_layers * n_pos) % n_pos
    embeddings = torch.arange(n_pos)
    logits = torch.full((len(graph.logit_targets),), n_pos - 1)
    return torch.cat([features, errors, embeddings, logits])


def graph_share(graph: Graph, target: int, positions: Sequence[int]) -> GraphShare:
    """How much of ``target``'s logit influence in ``graph`` comes from ``positions``."""
    ids = [t.vocab_idx for t in graph.logit_targets]
    if target not in ids:
        raise UsageError(f"token {target} is not a logit target of the graph (targets: {ids})")
    adjacency = graph.adjacency_matrix.double().cpu()
    weights = torch.zeros(adjacency.shape[0], dtype=torch.float64)
    weights[adjacency.shape[0] - len(ids) + ids.index(target)] = 1.0
    influence = compute_node_influence(adjacency, weights)
    n_features = len(graph.selected_features)
    n_errors = graph.cfg.n_layers * graph.n_pos
    at = torch.isin(node_positions(graph), torch.as_tensor(list(positions)))
    is_embedding = torch.zeros_like(at)
    is_embedding[n_features + n_errors: n_features + n_errors + graph.n_pos] = True
    is_source = is_embedding.clone()
    is_source[n_features: n_features + n_errors] = True
    total = influence[is_source].sum()
    return GraphShare((influence[is_embedding & at].sum() / total).item(), (influence[is_source & at].sum() / total).item())


def _demeaned_and_prob(logits: torch.Tensor, target: int) -> tuple[float, float]:
    last = logits.squeeze(0)[-1].double()
    return (last[target] - last.mean()).item(), last.softmax(-1)[target].item()


def ablation_drop(model, tokens: torch.Tensor, target: int, positions: Sequence[int]) -> AblationDrop:
    """``target``'s demeaned logit at the last position of ``tokens``, with and without the
    last position's attention to ``positions`` in every layer (``hook_pattern`` of a
    TransformerLens model: those weights zeroed, the row renormalised to sum to 1)."""
    keys = torch.as_tensor(list(positions))

    def ablate(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :, -1, keys] = 0
        pattern[:, :, -1] /= pattern[:, :, -1].sum(-1, keepdim=True)
        return pattern

    hooks = [(f"blocks.{layer}.attn.hook_pattern", ablate) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        clean = model(tokens.unsqueeze(0).to(model.cfg.device))
        ablated = model.run_with_hooks(tokens.unsqueeze(0).to(model.cfg.device), fwd_hooks=hooks)
    (clean_logit, clean_prob), (ablated_logit, ablated_prob) = (_demeaned_and_prob(x, target) for x in (clean, ablated))
    return AblationDrop(clean_logit, ablated_logit, clean_prob, ablated_prob)
