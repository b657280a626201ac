"""Edge scores of global (input-independent) feature graphs: virtual weights, ERA, TWERA.

A feature ``i`` of a transcoder at layer ``l`` writes ``a_i * W_dec[i]`` into the residual
stream; a feature ``j`` of a later layer ``l' > l`` reads the stream through
``W_enc[j]``. The residual-direct path between them has the *virtual weight*
``V_ij = W_dec[i] . W_enc[j]`` (attention-mediated paths are context dependent and left
out, as in Anthropic's global weights).

Virtual weights alone are dominated by pairs that never fire together (everything shares
one residual stream), so two corpus-weighted scores are computed from statistics of
co-active pairs on the same token:

- ``ERA_ij  = V_ij * sum_{tokens: i, j active} a_i / N`` -- the expected residual
  attribution from ``i`` to ``j``'s pre-activation, counted where ``j`` is active (its
  gradient is zero elsewhere); pairs that never co-occur get 0.
- ``TWERA_ij = V_ij * sum_{tokens: i, j active} a_i a_j / sum_{tokens} a_j`` -- the
  same attribution averaged with the target's activation as weight.

Everything here is sparse: the statistics hold only co-active pairs and the scores are
computed per pair (cost ~ pairs * d_model), never as a features x features matrix.
Restricting to a prefix ``P`` keeps pairs with ``i < P`` and ``j < P``; Matryoshka
truncation zeroes latents ``>= P`` after the activation, so latents below ``P`` keep their
values and one pass of statistics serves every prefix.

Cross-layer transcoders (CLTs): a feature ``i`` at source layer ``l`` writes
``W_dec[l][i, t]`` into the MLP output of every CLT target layer ``t >= l``. A feature
``j`` at layer ``m > l`` reads the residual stream before layer ``m``'s MLP, which holds
the MLP outputs of layers ``< m``. Its residual-direct virtual weight is therefore
``W_enc[m][j] . sum_{t: l <= layer(t) < m} W_dec[l][i, t]``: the per-layer formula with an
*effective decoder* (a running sum over the decoder's target slots) in place of
``W_dec``. ``clt_effective_decoders`` builds those, so the same sparse ERA/TWERA code
serves both kinds of transcoder.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import GlobalGraphError
from .prefixes import check_prefix_len


class Edges(NamedTuple):
    """A sparse edge list between a source layer's and a target layer's features."""

    source: Tensor
    target: Tensor
    virtual_weight: Tensor
    era: Tensor
    twera: Tensor
    coactive_count: Tensor


def pair_virtual_weights(
    decoder: Tensor, encoder: Tensor, source: Tensor, target: Tensor, chunk: int = 65536
) -> Tensor:
    """``decoder[source[n]] . encoder[target[n]]`` for each pair ``n``, in chunks."""
    out = torch.empty(source.shape[0], dtype=decoder.dtype, device=decoder.device)
    for s in range(0, source.shape[0], chunk):
        e = s + chunk
        out[s:e] = (decoder[source[s:e]] * encoder[target[s:e]]).sum(-1)
    return out


def topk_per_source(source: Tensor, score: Tensor, k: int | None, threshold: float = 0.0) -> Tensor:
    """Indices of the pairs kept: ``|score| > threshold`` and among each source's ``k`` largest."""
    keep = torch.nonzero(score.abs() > threshold).squeeze(1)
    if k is None or keep.numel() == 0:
        return keep
    order = torch.argsort(score[keep].abs(), descending=True, stable=True)
    keep = keep[order]
    by_source = torch.argsort(source[keep], stable=True)
    keep = keep[by_source]
    src = source[keep]
    # Rank within each source group: position minus the group's first position.
    starts = torch.ones_like(src, dtype=torch.bool)
    starts[1:] = src[1:] != src[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(src.numel(), device=src.device), 0), 0).values
    rank = torch.arange(src.numel(), device=src.device) - first
    return keep[rank < k]


def virtual_weight_topk(
    decoder: Tensor,
    encoder: Tensor,
    *,
    prefix_len: int | None = None,
    k: int = 16,
    threshold: float = 0.0,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` targets by ``|V_ij|`` for every source, among the first ``prefix_len`` latents.

    No corpus needed; memory is ``chunk x P`` at a time (never ``P x P``), compute is
    ``P^2 d``. Returns ``(source, target, weight)``.
    """
    p_src = (
        decoder.shape[0]
        if prefix_len is None
        else check_prefix_len(prefix_len, decoder.shape[0], error=GlobalGraphError)
    )
    p_tgt = encoder.shape[0] if prefix_len is None else min(prefix_len, encoder.shape[0])
    kk = min(k, p_tgt)
    srcs, tgts, ws = [], [], []
    enc = encoder[:p_tgt]
    for s in range(0, p_src, chunk):
        block = decoder[s : min(s + chunk, p_src)] @ enc.T
        vals, idx = block.abs().topk(kk, dim=1)
        w = block.gather(1, idx)
        keep = vals > threshold
        rows = torch.arange(s, s + block.shape[0], device=decoder.device)[:, None].expand_as(idx)
        srcs.append(rows[keep])
        tgts.append(idx[keep])
        ws.append(w[keep])
    return torch.cat(srcs), torch.cat(tgts), torch.cat(ws)


def clt_effective_decoders(
    decoder: Tensor, layers: Sequence[int], source_slot: int, target_layers: Sequence[int]
) -> Iterator[tuple[int, Tensor]]:
    """``(m, D_m)`` for each target layer ``m``, ascending: ``D_m [M, d]`` is everything source
    slot ``s``'s features write into the residual stream before layer ``m``'s MLP reads it.

    ``decoder`` is that source's CLT decoder ``[M, len(layers) - s, d]``, whose slot ``t``
    writes the MLP output of ``layers[s + t]``; ``D_m`` sums the slots whose layer lies in
    ``[layers[s], m - 1]``. ``layers`` may skip model layers (then the skipped MLPs belong
    to the model, not the CLT). ``D_m . W_enc[m][j]`` is the virtual weight to feature ``j``
    of ``m``. A running sum: memory is two ``[M, d]`` tensors, never ``[M, L, d]`` extra.
    """
    layers = [int(x) for x in layers]
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise GlobalGraphError(f"CLT layers {layers} must be strictly increasing")
    if not 0 <= source_slot < len(layers):
        raise GlobalGraphError(f"source slot {source_slot} is out of range; allowed: 0..{len(layers) - 1}")
    n_slots = len(layers) - source_slot
    if decoder.ndim != 3 or decoder.shape[1] != n_slots:
        raise GlobalGraphError(
            f"decoder of source slot {source_slot} has shape {tuple(decoder.shape)}; "
            f"expected [width, {n_slots} target slots, d_model] for layers {layers}"
        )
    source_layer = layers[source_slot]
    targets = sorted({int(m) for m in target_layers})
    early = [m for m in targets if m <= source_layer]
    if early:
        raise GlobalGraphError(
            f"target layers {early} do not come after source layer {source_layer}; allowed: > {source_layer}"
        )
    running = torch.zeros(decoder.shape[0], decoder.shape[2], dtype=decoder.dtype, device=decoder.device)
    t = 0
    for m in targets:
        while t < n_slots and layers[source_slot + t] < m:
            # A new tensor each time: an already-yielded D_m must not change afterwards.
            running = running + decoder[:, t]
            t += 1
        yield m, running


@dataclass
class PairStats:
    """Sums over tokens where source ``i`` and target ``j`` are both active (sparse)."""

    source: Tensor
    """Source feature index of each co-active pair (sorted, unique with ``target``)."""
    target: Tensor
    """Target feature index of each co-active pair."""
    count: Tensor
    """Number of tokens on which both were active."""
    sum_source: Tensor
    """Sum of the source's activation over those tokens."""
    sum_product: Tensor
    """Sum of ``a_i * a_j`` over those tokens."""


def _coalesce(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    uniq, inverse = torch.unique(keys, return_inverse=True)
    out = torch.zeros(uniq.shape[0], values.shape[1], dtype=values.dtype, device=values.device)
    out.index_add_(0, inverse, values)
    return uniq, out


@dataclass
class CoactivationStats:
    """Corpus statistics for ERA/TWERA, gathered in one pass, over active pairs only.

    ``update`` takes each layer's sparse code of the same tokens (``acts, indices``,
    each ``[n_tokens, k]``, as sparsify's ``encode`` returns). For every ordered layer
    pair ``l < l'`` it adds the ``k x k`` active pairs of each token; memory and time grow
    with the number of distinct co-active pairs, not with width squared.
    """

    widths: dict[int, int]
    """Dictionary width per layer."""
    n_tokens: int = 0
    """Tokens seen."""
    feature_count: dict[int, Tensor] = field(default_factory=dict)
    """Per layer, how many tokens each feature was active on."""
    feature_sum: dict[int, Tensor] = field(default_factory=dict)
    """Per layer, the sum of each feature's activation."""
    _keys: dict = field(default_factory=dict)
    _vals: dict = field(default_factory=dict)
    _pending: dict = field(default_factory=dict)
    flush_every: int = 4_000_000
    """Pending pair rows per layer pair before they are merged into the running sums."""

    def __post_init__(self):
        for layer, w in self.widths.items():
            self.feature_count.setdefault(layer, torch.zeros(w, dtype=torch.float64))
            self.feature_sum.setdefault(layer, torch.zeros(w, dtype=torch.float64))

    @property
    def layers(self) -> list[int]:
        return sorted(self.widths)

    def layer_pairs(self) -> list[tuple[int, int]]:
        ls = self.layers
        return [(a, b) for i, a in enumerate(ls) for b in ls[i + 1 :]]

    @torch.no_grad()
    def update(self, codes: dict[int, tuple[Tensor, Tensor]]) -> None:
        if set(codes) != set(self.widths):
            raise GlobalGraphError(f"codes cover layers {sorted(codes)}; expected {self.layers}")
        n = {c[0].shape[0] for c in codes.values()}
        if len(n) != 1:
            raise GlobalGraphError(f"codes of different layers cover different token counts {sorted(n)}")
        n = n.pop()
        self.n_tokens += n
        prepared = {}
        for layer, (acts, idx) in codes.items():
            acts = acts.detach().to("cpu", torch.float64)
            idx = idx.detach().to("cpu", torch.long)
            active = acts > 0
            acts = torch.where(active, acts, 0.0)
            self.feature_count[layer].index_add_(0, idx[active], torch.ones(int(active.sum()), dtype=torch.float64))
            self.feature_sum[layer].index_add_(0, idx[active], acts[active])
            prepared[layer] = (acts, idx, active)
        for a, b in self.layer_pairs():
            acts_a, idx_a, on_a = prepared[a]
            acts_b, idx_b, on_b = prepared[b]
            both = on_a[:, :, None] & on_b[:, None, :]
            tok, ia, ib = torch.nonzero(both, as_tuple=True)
            src = idx_a[tok, ia]
            tgt = idx_b[tok, ib]
            x, y = acts_a[tok, ia], acts_b[tok, ib]
            keys = src * self.widths[b] + tgt
            vals = torch.stack([torch.ones_like(x), x, x * y], 1)
            self._pending.setdefault((a, b), []).append((keys, vals))
            if sum(k.shape[0] for k, _ in self._pending[(a, b)]) >= self.flush_every:
                self._flush((a, b))

    def _flush(self, pair) -> None:
        pending = self._pending.pop(pair, [])
        parts_k = [k for k, _ in pending]
        parts_v = [v for _, v in pending]
        if pair in self._keys:
            parts_k.insert(0, self._keys[pair])
            parts_v.insert(0, self._vals[pair])
        if not parts_k:
            return
        self._keys[pair], self._vals[pair] = _coalesce(torch.cat(parts_k), torch.cat(parts_v))

    def pairs(self, source_layer: int, target_layer: int) -> PairStats:
        pair = (source_layer, target_layer)
        if pair not in self.layer_pairs():
            raise GlobalGraphError(f"layer pair {pair} is not an ordered pair of {self.layers}")
        self._flush(pair)
        w = self.widths[target_layer]
        keys = self._keys.get(pair, torch.zeros(0, dtype=torch.long))
        vals = self._vals.get(pair, torch.zeros(0, 3, dtype=torch.float64))
        return PairStats(keys // w, keys % w, vals[:, 0], vals[:, 1], vals[:, 2])

    def n_pairs(self) -> int:
        return sum(self.pairs(a, b).source.numel() for a, b in self.layer_pairs())


def era_edges(
    stats: CoactivationStats,
    source_layer: int,
    target_layer: int,
    decoder: Tensor,
    encoder: Tensor,
    *,
    prefix_len: int | None = None,
    k: int | None = 16,
    threshold: float = 0.0,
    rank_by: str = "twera",
) -> Edges:
    """ERA/TWERA edges from ``source_layer``'s decoder to ``target_layer``'s encoder.

    Only co-active pairs with both ends below ``prefix_len`` are scored; each source keeps
    its ``k`` largest by ``|rank_by|`` (``"era"``, ``"twera"`` or ``"virtual_weight"``)
    above ``threshold``. ``decoder``/``encoder`` are ``[width, d_model]``.
    """
    if rank_by not in ("era", "twera", "virtual_weight"):
        raise GlobalGraphError(f"rank_by {rank_by!r} is unknown; allowed: era, twera, virtual_weight")
    if stats.n_tokens == 0:
        raise GlobalGraphError("the co-activation statistics hold no tokens")
    width = min(stats.widths[source_layer], stats.widths[target_layer])
    ps = stats.pairs(source_layer, target_layer)
    if prefix_len is not None:
        check_prefix_len(prefix_len, width, error=GlobalGraphError)
        inside = (ps.source < prefix_len) & (ps.target < prefix_len)
        ps = PairStats(*(getattr(ps, f)[inside] for f in ("source", "target", "count", "sum_source", "sum_product")))
    vw = pair_virtual_weights(decoder, encoder, ps.source.to(decoder.device), ps.target.to(decoder.device))
    vw = vw.to("cpu", torch.float64)
    era = vw * ps.sum_source / stats.n_tokens
    target_sum = stats.feature_sum[target_layer][ps.target]
    twera = vw * ps.sum_product / target_sum.clamp_min(torch.finfo(torch.float64).tiny)
    score = {"era": era, "twera": twera, "virtual_weight": vw}[rank_by]
    keep = topk_per_source(ps.source, score, k, threshold)
    keep = keep[torch.argsort(score[keep].abs(), descending=True, stable=True)]
    return Edges(ps.source[keep], ps.target[keep], vw[keep], era[keep], twera[keep], ps.count[keep].long())


def dense_era_reference(
    codes: dict[int, Tensor], source_layer: int, target_layer: int, decoder: Tensor, encoder: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense ``(V, ERA, TWERA)`` matrices from dense activations ``[n, width]`` (tests only)."""
    a, b = codes[source_layer].double(), codes[target_layer].double()
    v = decoder.double() @ encoder.double().T
    on_b = (b > 0).double()
    era = v * (a.T @ on_b) / a.shape[0]
    twera = v * (a.T @ b) / b.sum(0).clamp_min(torch.finfo(torch.float64).tiny)
    return v, era, twera


__all__ = [
    "CoactivationStats",
    "Edges",
    "PairStats",
    "clt_effective_decoders",
    "dense_era_reference",
    "era_edges",
    "pair_virtual_weights",
    "topk_per_source",
    "virtual_weight_topk",
]
