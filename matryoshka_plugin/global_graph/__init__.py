"""Global feature graphs of sparsify transcoders or a CLT on a model (``matryoshka-global``).

One pass over a corpus runs the model, encodes every transcoder layer's MLP input
(sparsify's own ``encode``) and gathers the sparse co-activation statistics of
``core.edge_scores``; then, per prefix length ``P``, the ERA / TWERA / virtual-weight
edges between the first ``P`` latents of every ordered layer pair are written as JSON and
CSV edge lists with a PNG plot.

- ``coders``: the dictionaries, a sparsify transcoder run (``find_transcoders``) or a CLT
  directory (``find_clt``), each source layer with a transcoder's ``encode``.
- ``statistics``: the token rows of a corpus and the one statistics pass
  (``gather_statistics``).
- ``edges``: the edges per prefix (``build_global_graph``, ``build_clt_global_graph``,
  with the pre-MLP norm gain folded into the target encoder) and the files
  (``write_global_graphs``).
- ``pipeline``: all of it for one checkpoint and corpus (``make_global_graphs``).

For a CLT, each source layer's MLP input is encoded with ``encode_layer`` in the same
single pass, and the decoder of a layer pair is the CLT's effective decoder
(``core.edge_scores.clt_effective_decoders``): the sum of the source's decoder slots that
write before the target layer's MLP. The console script is ``cli.global_graph``.

The per-token ``1/rms`` of the target's pre-MLP norm is left out of every score (only
its constant gain is folded in): on token ``t`` source feature ``i`` moves target ``j``'s
pre-activation by ``V_ij * a_i / rms_t``, not ``V_ij * a_i``. ERA and TWERA scale ``V`` by
activation statistics and so share this: edges into layers whose residual stream is
large (usually the later ones) are overstated next to edges into early layers, and
scores of different target layers are comparable only up to that layer's typical rms.
"""

from .coders import CLTSourceEncoder, clt_checkpoint_dir, find_clt, find_transcoders
from .statistics import corpus_token_batches, gather_statistics
from .edges import (
    EDGE_FIELDS,
    RANK_BY,
    LayerEdges,
    build_clt_global_graph,
    build_global_graph,
    mlp_norm_gains,
    residual_encoder,
    write_global_graphs,
)
from .pipeline import make_global_graphs

__all__ = [
    "EDGE_FIELDS",
    "RANK_BY",
    "CLTSourceEncoder",
    "LayerEdges",
    "build_clt_global_graph",
    "build_global_graph",
    "clt_checkpoint_dir",
    "corpus_token_batches",
    "find_clt",
    "find_transcoders",
    "gather_statistics",
    "make_global_graphs",
    "mlp_norm_gains",
    "residual_encoder",
    "write_global_graphs",
]
