"""The dictionaries a global graph joins: a sparsify transcoder run or a CLT directory.

``find_transcoders`` loads one sparsify transcoder per MLP layer of a run directory.
A CLT (a ``save_clt`` directory, e.g. ``matryoshka-clt train``'s ``save_dir/clt``) is
recognised by its ``config.json`` (``clt_checkpoint_dir``); ``find_clt`` loads it and
gives each source layer the face of a transcoder (``CLTSourceEncoder``), so the
statistics pass encodes both kinds alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..adapters.sparsify import load_coder
from ..clt.model import CONFIG_FILE, FORMAT, load_clt
from ..core.errors import ExportError, GlobalGraphError
from ..hooks import hookpoint_layer


def find_transcoders(checkpoint: Path | str, layers: Sequence[int] | None = None) -> dict[int, object]:
    """``{layer: coder}`` of a sparsify run directory (``<hookpoint>/cfg.json`` per MLP).

    ``layers`` picks a subset; each must have a transcoder with an encoder, and at least
    two layers are needed for an edge.
    """
    root = Path(checkpoint)
    if not root.is_dir():
        raise GlobalGraphError(f"checkpoint {root} is not a directory")
    found: dict[int, Path] = {}
    for cfg in sorted(root.glob("*/cfg.json")):
        try:
            found[hookpoint_layer(cfg.parent.name)] = cfg.parent
        except ExportError:
            continue
    if layers is None:
        layers = sorted(found)
    missing = [l for l in layers if l not in found]
    if missing:
        raise GlobalGraphError(
            f"checkpoint {root} has no encoder at layers {missing}; it has transcoders at layers {sorted(found)}"
        )
    if len(set(layers)) < 2:
        raise GlobalGraphError(
            f"a global graph needs transcoders at two or more layers; {root} gives layers {sorted(set(layers))}"
        )
    coders = {}
    for layer in sorted(set(layers)):
        coder = load_coder(found[layer])
        if getattr(coder, "encoder", None) is None or getattr(coder, "W_dec", None) is None:
            raise GlobalGraphError(f"{found[layer]} has no encoder and decoder; a global graph needs both")
        if not coder.cfg.transcode:
            raise GlobalGraphError(
                f"{found[layer]} is an SAE (transcode=False); the global graph joins transcoder "
                "decoders (MLP outputs) to later encoders (MLP inputs)"
            )
        coders[layer] = coder
    return coders


def clt_checkpoint_dir(checkpoint: Path | str) -> Path | None:
    """The CLT directory of ``checkpoint`` (itself, or a ``matryoshka-clt train`` run's
    ``clt/``) when it holds a matryoshka CLT ``config.json``, else None."""
    root = Path(checkpoint)
    for cand in (root, root / "clt"):
        try:
            d = json.loads((cand / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d.get("format") == FORMAT:
            return cand
    return None


class CLTSourceEncoder:
    """One source layer of a CLT with the ``encode``/``num_latents``/``dtype`` face of a
    sparsify coder, so ``gather_statistics`` encodes a CLT layer as it does a transcoder."""

    def __init__(self, clt, slot: int):
        self.clt, self.slot = clt, slot
        self.num_latents = clt.num_latents
        self.d_in = clt.d_model
        self.dtype = clt.b_dec.dtype

    def encode(self, x: Tensor):
        return self.clt.encode_layer(x, self.slot)


def find_clt(checkpoint: Path | str, layers: Sequence[int] | None = None):
    """``(clt, {layer: CLTSourceEncoder})`` of a CLT directory; ``layers`` picks source and
    target layers among the CLT's (default: all), at least two."""
    path = clt_checkpoint_dir(checkpoint)
    if path is None:
        raise GlobalGraphError(f"checkpoint {checkpoint} holds no matryoshka CLT config.json")
    clt = load_clt(path)
    if layers is None:
        layers = list(clt.layers)
    missing = [l for l in layers if l not in clt.layers]
    if missing:
        raise GlobalGraphError(f"--layers {missing} are not in the CLT {path}; allowed: {clt.layers}")
    if len(set(layers)) < 2:
        raise GlobalGraphError(
            f"a global graph needs two or more layers; the CLT {path} gives layers {sorted(set(layers))}"
        )
    return clt, {l: CLTSourceEncoder(clt, clt.layers.index(l)) for l in sorted(set(layers))}
