"""Transcoders truncated to a Matryoshka prefix, in circuit-tracer (0.5.0).

Truncation is exact: the activation runs over all latents (TopK picks from the full
width), then latents ``>= P`` are zeroed. circuit-tracer computes its error nodes as
``mlp_out - reconstruction``, so what the dropped latents carried lands in the error
nodes and the graph stays a faithful replacement model.

- Per-layer transcoders: each ``SingleLayerTranscoder.activation_function`` is wrapped
  in ``core.truncation.PrefixActivation``; every path (``encode_sparse``,
  ``encode_layer``, ``apply_activation_function``) goes through it.
- Level decoders (``nested_decoders`` exports, attached by ``attach_level_decoders``): at
  prefix P the transcoders decode with the decoder that serves P
  (``core.level_decoders.decoder_level``: the level's own at a nested size, the next
  level's between sizes): swapped in for each per-layer transcoder's ``W_dec`` /
  ``b_dec``, and for a CLT read by ``PrefixCrossLayerTranscoder._get_decoder_vectors``
  with its ``b_dec`` swapped; the error nodes absorb whatever it misses, so the graph
  stays exact.
- Cross-layer transcoders: ``PrefixCrossLayerTranscoder`` (a subclass swapped in by
  ``as_prefix_clt``; no new parameters) truncates in ``encode`` and
  ``apply_activation_function`` and fixes two upstream bugs that small prefixes expose
  (see ``benchmarks/attribution/UPSTREAM_BUGS.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from circuit_tracer.transcoder.single_layer_transcoder import TranscoderSet
from torch import Tensor

from ...core.level_decoders import decoder_level
from ...core.prefixes import check_prefix_len
from ...core.truncation import PrefixActivation, truncate_dense


LEVELS_ATTR = "matryoshka_level_decoders"
"""The transcoders' level decoders as a plain attribute (not in the state dict, so
circuit-tracer's own saving and loading never see it): a per-layer transcoder's
``{P: (W_dec [P, d], b_dec [d])}``, a CLT's ``{P: ([W_dec_i [P, L - i, d] per layer], b_dec [L, d])}``."""
_FULL_ATTR = "_matryoshka_full_decoder"


class PrefixCrossLayerTranscoder(CrossLayerTranscoder):
    """circuit-tracer's ``CrossLayerTranscoder`` with prefix truncation, level decoders
    and two fixes."""

    prefix_len: int | None = None
    _n_pos: int | None = None

    def set_prefix(self, prefix_len: int | None) -> None:
        """Keep latents < ``prefix_len`` (None: all) and decode with the decoder that serves it."""
        self.prefix_len = prefix_len
        full = self.__dict__.pop(_FULL_ATTR, None)
        if full is not None:
            self._parameters["b_dec"] = full
        level = self._level()
        if level is not None:
            # compute_reconstruction adds self.b_dec: the level's own bias while its decoder is in.
            b = getattr(self, LEVELS_ATTR)[level][1]
            self.__dict__[_FULL_ATTR] = self._parameters["b_dec"]
            self._parameters["b_dec"] = nn.Parameter(b.to(self.device, self.dtype), requires_grad=False)

    def _level(self) -> int | None:
        """The nested size whose own decoder serves the prefix (None: the full decoder)."""
        levels = getattr(self, LEVELS_ATTR, None)
        if not levels or self.prefix_len is None:
            return None
        level = decoder_level(self.prefix_len, list(levels), self.d_transcoder)
        return None if level == self.d_transcoder else level

    def _get_decoder_vectors(self, layer_id, feat_ids=None):
        level = self._level()
        if level is None:
            return super()._get_decoder_vectors(layer_id, feat_ids)
        W = getattr(self, LEVELS_ATTR)[level][0][layer_id].to(self.device, self.dtype)
        # Latents >= level have no row: they are truncated away whenever this decoder is
        # in, so they decode to zero (an intervention may still name one).
        if feat_ids is None:
            return torch.cat([W, W.new_zeros(self.d_transcoder - level, *W.shape[1:])])
        ids = torch.as_tensor(feat_ids, device=W.device)
        out = W.new_zeros(len(ids), *W.shape[1:])
        inside = ids < level
        out[inside] = W[ids[inside]]
        return out

    def _truncate(self, acts: Tensor) -> Tensor:
        if self.prefix_len is None or self.prefix_len >= acts.shape[-1]:
            return acts
        return truncate_dense(acts, self.prefix_len)

    def encode(self, x):
        return self._truncate(super().encode(x))

    def apply_activation_function(self, layer_id, features):
        return self._truncate(super().apply_activation_function(layer_id, features))

    def select_decoder_vectors(self, features):
        if not features.is_sparse:
            features = features.to_sparse()
        features = features.coalesce()
        self._n_pos = int(features.shape[1])
        if features._nnz() == 0:
            # Upstream concatenates an empty list here (torch.cat([]) raises).
            empty = torch.zeros(0, dtype=torch.long, device=features.device)
            vecs = torch.zeros(0, self.d_model, dtype=self.dtype, device=features.device)
            return empty, empty.clone(), empty.clone(), vecs, empty.clone()
        return super().select_decoder_vectors(features)

    def compute_reconstruction(self, pos_ids, layer_ids, decoder_vectors, input_acts=None):
        # Upstream takes n_pos = pos_ids.max() + 1, which is short when the last
        # positions have no active latent. A zero vector at the true last position
        # makes it right without changing the sum.
        n_pos = input_acts.shape[-2] if input_acts is not None else self._n_pos
        if n_pos is None:
            return super().compute_reconstruction(pos_ids, layer_ids, decoder_vectors, input_acts)
        pos_ids = torch.cat([pos_ids, pos_ids.new_tensor([n_pos - 1])])
        layer_ids = torch.cat([layer_ids, layer_ids.new_tensor([0])])
        decoder_vectors = torch.cat([decoder_vectors, decoder_vectors.new_zeros(1, self.d_model)])
        return super().compute_reconstruction(pos_ids, layer_ids, decoder_vectors, input_acts)


def as_prefix_clt(transcoders):
    """Make a loaded ``CrossLayerTranscoder`` a ``PrefixCrossLayerTranscoder``, in place.

    The subclass adds no parameters, so swapping ``__class__`` keeps every tensor and
    the lazy loading state; anything else is returned unchanged.
    """
    if isinstance(transcoders, CrossLayerTranscoder) and not isinstance(transcoders, PrefixCrossLayerTranscoder):
        transcoders.__class__ = PrefixCrossLayerTranscoder
    return transcoders


Transcoders = TranscoderSet | CrossLayerTranscoder


def transcoder_width(transcoders: Transcoders) -> int:
    return int(transcoders.d_transcoder)


def _transcoders_of(obj) -> Transcoders:
    # A TranscoderSet itself has a ``transcoders`` ModuleList; only a model is unwrapped.
    if isinstance(obj, (TranscoderSet, CrossLayerTranscoder)):
        return obj
    return getattr(obj, "transcoders", obj)


def get_prefix_len(obj) -> int | None:
    """The prefix length applied to a ``ReplacementModel`` or transcoders (None: full)."""
    tc = _transcoders_of(obj)
    if isinstance(tc, CrossLayerTranscoder):
        return getattr(tc, "prefix_len", None)
    act = tc[0].activation_function
    return act.prefix_len if isinstance(act, PrefixActivation) else None


def attach_level_decoders(transcoder, levels: dict[int, tuple]) -> None:
    """Give a ``SingleLayerTranscoder`` or a ``PrefixCrossLayerTranscoder`` its level
    decoders (``LEVELS_ATTR``), used by ``set_prefix_len``."""
    object.__setattr__(transcoder, LEVELS_ATTR, dict(levels))


def level_decoder_sizes(obj) -> list[int]:
    """The prefix lengths with their own decoder in a model or transcoders ([] if none)."""
    tc = _transcoders_of(obj)
    return sorted(getattr(tc if isinstance(tc, CrossLayerTranscoder) else tc[0], LEVELS_ATTR, {}))


def _use_decoder(transcoder, prefix_len: int | None) -> None:
    """Put the decoder that serves ``prefix_len`` in ``W_dec`` / ``b_dec`` (None: the full one)."""
    levels = getattr(transcoder, LEVELS_ATTR, None)
    if not levels:
        return
    full = transcoder.__dict__.pop(_FULL_ATTR, None)
    if full is not None:
        W_dec, b_dec, lazy = full
        del transcoder._parameters["W_dec"]
        if W_dec is not None:
            transcoder._parameters["W_dec"] = W_dec
        transcoder.b_dec, transcoder.lazy_decoder = b_dec, lazy
    width = transcoder.d_transcoder
    level = width if prefix_len is None else decoder_level(prefix_len, list(levels), width)
    if level == width:
        return
    W, b = levels[level]
    device, dtype = transcoder.b_dec.device, transcoder.b_dec.dtype
    transcoder.__dict__[_FULL_ATTR] = (transcoder._parameters.get("W_dec"), transcoder.b_dec, transcoder.lazy_decoder)
    # Rows >= level stay zero: latents there are truncated away whenever this decoder is in.
    padded = torch.zeros(width, transcoder.d_model, device=device, dtype=dtype)
    padded[:level] = W.to(device, dtype)
    # Straight into _parameters: Module.__setattr__'s hasattr check would read a lazy W_dec.
    transcoder._parameters["W_dec"] = nn.Parameter(padded, requires_grad=False)
    transcoder.b_dec = nn.Parameter(b.to(device, dtype), requires_grad=False)
    # A lazy transcoder reads W_dec from its file; the level decoder lives in memory.
    transcoder.lazy_decoder = False


def set_prefix_len(obj, prefix_len: int | None) -> None:
    """Truncate a ``ReplacementModel``'s (or transcoders') latents to ``prefix_len``.

    ``None`` restores the full width (and the full decoder). Raises ``UsageError`` unless
    1 <= P <= width.
    """
    tc = _transcoders_of(obj)
    if prefix_len is not None:
        check_prefix_len(prefix_len, transcoder_width(tc))
    if isinstance(tc, CrossLayerTranscoder):
        as_prefix_clt(tc).set_prefix(prefix_len)
        return
    if not isinstance(tc, TranscoderSet):
        raise TypeError(f"expected a TranscoderSet or CrossLayerTranscoder, got {type(tc).__name__}")
    for transcoder in tc:
        _use_decoder(transcoder, prefix_len)
        act = transcoder.activation_function
        if prefix_len is None:
            # Unwrap, so that upstream's isinstance(JumpReLU) checks (to_safetensors)
            # see the original module again.
            if isinstance(act, PrefixActivation):
                transcoder.activation_function = act.base
            continue
        if not isinstance(act, PrefixActivation):
            transcoder.activation_function = act = PrefixActivation(act)
        act.prefix_len = prefix_len


@contextmanager
def prefix_truncation(obj, prefix_len: int | None) -> Iterator[None]:
    """Apply ``set_prefix_len`` for the span of a ``with`` block, then restore."""
    previous = get_prefix_len(obj)
    set_prefix_len(obj, prefix_len)
    try:
        yield
    finally:
        set_prefix_len(obj, previous)


def decoder_rows(transcoders, layer: int) -> torch.Tensor:
    """Decoder rows ``[width, d]`` of one layer's latents (a CLT's rows over all its output layers)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    if isinstance(transcoders, CrossLayerTranscoder):
        w = transcoders._get_decoder_vectors(layer)
        return w.reshape(w.shape[0], -1).float()
    return transcoders[layer]._get_decoder_vectors().float()


def output_direction(transcoders, layer: int) -> torch.Tensor:
    """Each latent's write into the residual stream at the last layer it reaches: ``[width, d]``."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    if isinstance(transcoders, CrossLayerTranscoder):
        return transcoders._get_decoder_vectors(layer)[:, -1].float()
    return transcoders[layer]._get_decoder_vectors().float()
