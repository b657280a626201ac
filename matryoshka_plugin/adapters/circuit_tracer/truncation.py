"""Prefix-truncated attribution in circuit-tracer (0.5.0).

Truncation is exact: the activation runs over all latents (TopK picks from the full
width), then latents ``>= P`` are zeroed. circuit-tracer computes its error nodes as
``mlp_out - reconstruction``, so what the dropped latents carried lands in the error
nodes and the graph stays a faithful replacement model.

- Per-layer transcoders: each ``SingleLayerTranscoder.activation_function`` is wrapped
  in ``core.truncation.PrefixActivation``; every path (``encode_sparse``,
  ``encode_layer``, ``apply_activation_function``) goes through it.
- Cross-layer transcoders: ``PrefixCrossLayerTranscoder`` (a subclass swapped in by
  ``__class__``; no new parameters) truncates in ``encode`` and
  ``apply_activation_function`` and fixes two upstream bugs that small prefixes expose
  (see ``benchmarks/attribution/UPSTREAM_BUGS.md``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
import yaml
from circuit_tracer import attribute as ct_attribute
from circuit_tracer.graph import Graph, compute_graph_scores
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from circuit_tracer.transcoder.single_layer_transcoder import TranscoderSet, load_transcoder_set
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ...core.prefixes import check_prefix_len
from ...core.truncation import PrefixActivation, truncate_dense
from ...core.errors import CheckpointError
from .activations import TopKReLU
from .export import CONFIG_FILE, ExportError, base_model_kind, read_nested_sizes


class PrefixCrossLayerTranscoder(CrossLayerTranscoder):
    """circuit-tracer's ``CrossLayerTranscoder`` with prefix truncation and two fixes."""

    prefix_len: int | None = None
    _n_pos: int | None = None

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


def set_prefix_len(obj, prefix_len: int | None) -> None:
    """Truncate a ``ReplacementModel``'s (or transcoders') latents to ``prefix_len``.

    ``None`` restores the full width. Raises ``ValueError`` unless 1 <= P <= width.
    """
    tc = _transcoders_of(obj)
    if prefix_len is not None:
        check_prefix_len(prefix_len, transcoder_width(tc))
    if isinstance(tc, CrossLayerTranscoder):
        if not isinstance(tc, PrefixCrossLayerTranscoder):
            tc.__class__ = PrefixCrossLayerTranscoder
        tc.prefix_len = prefix_len
        return
    if not isinstance(tc, TranscoderSet):
        raise TypeError(f"expected a TranscoderSet or CrossLayerTranscoder, got {type(tc).__name__}")
    for transcoder in tc:
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


def attribute(prompt, model, *, prefix_len: int | None = None, **kwargs) -> Graph:
    """circuit-tracer's ``attribute`` with the model's latents truncated to ``prefix_len``."""
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
    prefix_lens = [p if p is None else check_prefix_len(p, width) for p in prefix_lens]
    if len(set(prefix_lens)) != len(prefix_lens):
        raise ValueError(f"prefix lengths {prefix_lens} repeat a value; give each once")
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


# -- loading exported directories ------------------------------------------------------


def _check_safetensors(path: Path, keys: Sequence[str]) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            have = set(f.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({msg})") from None
    missing = [k for k in keys if k not in have]
    if missing:
        raise CheckpointError(f"{path} lacks tensors {missing}")


def load_transcoders_dir(
    transcoder_dir: Path | str,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype = torch.float32,
    lazy_encoder: bool = False,
    lazy_decoder: bool = True,
) -> tuple[Transcoders, dict]:
    """Load a local circuit-tracer transcoder directory, including the plugin's TopK kind.

    Uses circuit-tracer's own ``load_transcoder_set`` / ``load_clt`` and then installs
    the plugin's ``TopKReLU`` where ``config.yaml`` asks for it. CLTs come back as
    ``PrefixCrossLayerTranscoder``. ``config["matryoshka"]`` holds the nested-size record
    (None if the directory has none).
    """
    root = Path(transcoder_dir).absolute()
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found; a transcoder directory holds config.yaml")
    try:
        config = yaml.safe_load(cfg_path.read_text())
        kind, topk = base_model_kind(str(config["model_kind"]))
        in_hook, out_hook = config["feature_input_hook"], config["feature_output_hook"]
    except (yaml.YAMLError, KeyError, TypeError, ExportError) as e:
        raise CheckpointError(f"{cfg_path} is not a usable circuit-tracer config ({e})") from None
    scan = config.get("scan") or str(root)
    device = torch.device(device) if device is not None else None
    if kind == "transcoder_set":
        files = {int(p.stem.split("_")[1]): p for p in root.glob("layer_*.safetensors")}
        if not files or sorted(files) != list(range(len(files))):
            raise CheckpointError(f"{root} must hold layer_0.safetensors .. layer_N.safetensors; found {sorted(files)}")
        for p in files.values():
            _check_safetensors(p, ["W_enc", "W_dec", "b_enc", "b_dec"])
        transcoders: Transcoders = load_transcoder_set(
            {i: str(p) for i, p in files.items()},
            scan=scan,
            feature_input_hook=in_hook,
            feature_output_hook=out_hook,
            device=device,
            dtype=dtype,
            lazy_encoder=lazy_encoder,
            lazy_decoder=lazy_decoder,
        )
        widths = {t.d_transcoder for t in transcoders}
    else:
        n = len(list(root.glob("W_enc_*.safetensors")))
        if n == 0:
            raise CheckpointError(f"{root} holds no W_enc_0.safetensors")
        for i in range(n):
            _check_safetensors(root / f"W_enc_{i}.safetensors", [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"])
            _check_safetensors(root / f"W_dec_{i}.safetensors", [f"W_dec_{i}"])
        transcoders = load_clt(
            str(root),
            feature_input_hook=in_hook,
            feature_output_hook=out_hook,
            scan=scan,
            device=device,
            dtype=dtype,
            lazy_decoder=lazy_decoder,
            lazy_encoder=lazy_encoder,
        )
        transcoders.__class__ = PrefixCrossLayerTranscoder
        widths = {transcoders.d_transcoder}
    if topk:
        k = config.get("topk_k")
        if not isinstance(k, int) or k <= 0:
            raise CheckpointError(f"{cfg_path}: model_kind {config['model_kind']} needs a positive integer topk_k, got {k!r}")
        if kind == "transcoder_set":
            for t in transcoders:
                t.activation_function = TopKReLU(k)
        else:
            transcoders.activation_function = TopKReLU(k)
    try:
        config["matryoshka"] = read_nested_sizes(root)
    except ExportError as e:
        raise CheckpointError(str(e)) from None
    record = config["matryoshka"]
    if record is not None and record.get("width") not in widths:
        raise CheckpointError(f"{root / 'matryoshka.json'} says width {record.get('width')}, the tensors have {sorted(widths)}")
    return transcoders, config


def nested_sizes_of(config: dict) -> list[int] | None:
    record = config.get("matryoshka")
    return None if record is None else record.get("nested_sizes")


def warn_if_not_matryoshka(config: dict, prefix_lens: Sequence[int] | None) -> None:
    """Warn when prefixes are asked of a dictionary that was not trained nested."""
    if prefix_lens and not nested_sizes_of(config):
        warnings.warn(
            "the transcoders record no Matryoshka nested sizes: prefixes of a "
            "non-Matryoshka dictionary are arbitrary subsets of its latents",
            UserWarning,
            stacklevel=2,
        )


__all__ = [
    "PrefixCrossLayerTranscoder",
    "PrefixGraph",
    "attribute",
    "attribute_prefixes",
    "get_prefix_len",
    "load_transcoders_dir",
    "nested_sizes_of",
    "prefix_truncation",
    "reusing_setup_forward",
    "set_prefix_len",
    "warn_if_not_matryoshka",
]
