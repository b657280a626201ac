"""Path length of an attribution graph: how many steps the embeddings take to reach the logit.

The evaluation of seed 001 (after Anthropic's "Circuit Tracing", which reports shorter
paths for cross-layer transcoders than for per-layer ones): in the pruned graph, split the
embeddings' influence on the logits by the number of edges each path takes, and average
the number of steps with those shares as weights.

The seed's wording ("the cumulative impact ratio ... the average number of steps to reach
the output") leaves the weighting open; this module uses the influence of circuit-tracer's
own scores (``compute_graph_scores``, ``prune_graph``): the adjacency's absolute values
normalised per target node, so a path's weight is the product of its edges' shares of
their targets' input, times the logit's probability. ``mean`` is that influence-weighted
mean over paths; ``unweighted_mean`` counts each embedding -> logit path of the pruned
graph once, next to it.

Node layout (circuit-tracer's ``Graph``): features, errors (``n_layers * n_pos``),
embeddings (``n_pos``), logits; rows are targets, columns sources. Error nodes have no
inputs, so every embedding -> logit path goes through feature nodes only; influence that
passes into an error node's target is cut there (it is not a path from the embeddings).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from circuit_tracer.graph import Graph, normalize_matrix, prune_graph


class PathLength(NamedTuple):
    # Influence-weighted mean number of edges on the embedding -> logit paths (>= 1).
    mean: float
    # Mean number of edges with every embedding -> logit path counted once.
    unweighted_mean: float
    # Share of the embeddings' influence on the logits carried by paths of exactly
    # k = 1, 2, ... edges (sums to 1).
    by_length: tuple[float, ...]


def _lengths(matrix: torch.Tensor, sources: slice, targets: torch.Tensor) -> list[float]:
    """Total weight of the paths of k = 1, 2, ... edges from ``sources`` to the target
    weights ``targets``, for the DAG ``matrix`` (rows targets, columns sources)."""
    totals = []
    reach = targets @ matrix
    # A DAG's longest path has fewer edges than it has nodes; more steps mean a cycle.
    for _ in range(matrix.shape[0]):
        if not reach.any():
            return totals
        totals.append(reach[sources].sum().item())
        reach = reach @ matrix
    raise ValueError("the adjacency matrix has a cycle; an attribution graph is acyclic")


def _mean(weights: list[float]) -> float:
    total = sum(weights)
    return sum(k * w for k, w in enumerate(weights, 1)) / total if total > 0 else math.nan


def adjacency_path_length(adjacency: torch.Tensor, embeddings: slice, logit_weights: torch.Tensor) -> PathLength:
    """Path length of a graph given as its adjacency (rows targets, columns sources), the
    slice of its embedding nodes, and a weight per node (the logits' probabilities, zero
    elsewhere). ``mean`` and ``unweighted_mean`` are NaN where no path joins them."""
    adjacency = adjacency.double()
    logit_weights = logit_weights.double()
    influence = _lengths(normalize_matrix(adjacency), embeddings, logit_weights)
    counts = _lengths((adjacency != 0).double(), embeddings, (logit_weights != 0).double())
    total = sum(influence)
    by_length = tuple(w / total for w in influence) if total > 0 else ()
    return PathLength(_mean(influence), _mean(counts), by_length)


def pruned_adjacency(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> torch.Tensor:
    """``graph``'s adjacency with the nodes and edges circuit-tracer's ``prune_graph`` drops
    set to zero (the thresholds are those of its graph files)."""
    node_mask, edge_mask, _ = prune_graph(graph, node_threshold, edge_threshold)
    keep = edge_mask & node_mask[:, None] & node_mask[None, :]
    return graph.adjacency_matrix * keep


def logit_weights(graph: Graph) -> torch.Tensor:
    """A weight per node: the logit targets' probabilities, zero for every other node."""
    weights = torch.zeros(graph.adjacency_matrix.shape[0], dtype=torch.float64)
    weights[-len(graph.logit_targets):] = graph.logit_probabilities.double().cpu()
    return weights


def embedding_nodes(graph: Graph) -> slice:
    """The slice of ``graph``'s embedding (token) nodes in circuit-tracer's node order."""
    start = len(graph.selected_features) + graph.cfg.n_layers * graph.n_pos
    return slice(start, start + graph.n_pos)


def path_length(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PathLength:
    """Path length of ``graph`` pruned as circuit-tracer prunes it for its graph files."""
    pruned = pruned_adjacency(graph, node_threshold, edge_threshold).cpu()
    return adjacency_path_length(pruned, embedding_nodes(graph), logit_weights(graph))
