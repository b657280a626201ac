"""The activation cache a CLT trains from: each chosen layer's MLP inputs and outputs.

``cache_activations`` runs a Hugging Face model on token batches (e.g. ``token_source``)
with the MLPs of the chosen layers hooked (``hooks.capture_mlps``) and writes
``layer_{i}.safetensors`` (``input``, ``output`` of ``[n_tokens, d_model]``) next to a
``manifest.json`` (layers, d_model, hookpoints, n_tokens, ...). ``ActivationCache``
opens such a directory, checks it, and loads the layers a CLT needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..atomic import atomic_dir
from ..core.errors import CLTError, ExportError
from ..hooks import capture_mlps, mlp_modules, parse_layers

MANIFEST = "manifest.json"
CACHE_FORMAT = "matryoshka-clt-cache/1"


@torch.no_grad()
def cache_activations(
    model,
    token_batches,
    layers: list[int],
    out_dir: str | Path,
    *,
    n_tokens: int,
    skip_first_token: bool = True,
    dtype: torch.dtype = torch.float32,
    model_name: str = "",
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Cache the MLP inputs and outputs of ``layers`` for up to ``n_tokens`` tokens.

    ``token_batches`` yields ``[batch, seq]`` token-id tensors. Position 0 is skipped by
    default: circuit-tracer never attributes through it and its activations are outliers.
    The directory is written to a temporary sibling and renamed when complete.
    """
    mlps = mlp_modules(model)
    n_model_layers = max(mlps) + 1
    layers = parse_layers(layers)
    bad = [i for i in layers if i not in mlps]
    if bad:
        raise CLTError(
            f"layers {bad} are not in the model; allowed: 0..{n_model_layers - 1}"
        )
    if n_tokens < 1:
        raise CLTError(f"n_tokens={n_tokens} must be positive")
    ins: dict[int, list[Tensor]] = {i: [] for i in layers}
    outs: dict[int, list[Tensor]] = {i: [] for i in layers}
    start = 1 if skip_first_token else 0

    def take(t: Tensor) -> Tensor:
        return t[:, start:].reshape(-1, t.shape[-1]).to("cpu", dtype)

    got = 0
    bar = tqdm(total=n_tokens, desc="caching activations", unit="tok", disable=not show_progress)
    with capture_mlps(model, layers) as run, bar:
        for batch in token_batches:
            if got >= n_tokens:
                break
            batch = torch.as_tensor(batch)
            if batch.ndim == 1:
                batch = batch[None]
            if batch.shape[1] <= start:
                continue
            for i, acts in run(batch).items():
                ins[i].append(take(acts.input))
                outs[i].append(take(acts.output))
            new = batch.shape[0] * (batch.shape[1] - start)
            got += new
            bar.update(min(new, n_tokens - (got - new)))
    if got == 0:
        raise CLTError("the token source yielded no tokens to cache")
    n = min(got, n_tokens)
    d_model = ins[layers[0]][0].shape[-1]
    manifest = {
        "format": CACHE_FORMAT,
        "model": model_name,
        "layers": layers,
        "n_model_layers": n_model_layers,
        "d_model": int(d_model),
        "hookpoints": {str(i): mlps[i][0] for i in layers},
        "n_tokens": int(n),
        "dtype": str(dtype).removeprefix("torch."),
        "skip_first_token": skip_first_token,
        "input": "MLP input (after the pre-MLP norm)",
        "output": "MLP output",
    }
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        for i in layers:
            save_file(
                {
                    "input": torch.cat(ins[i])[:n].contiguous(),
                    "output": torch.cat(outs[i])[:n].contiguous(),
                },
                str(tmp / f"layer_{i}.safetensors"),
            )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(out_dir)


class ActivationCache:
    """A cache directory written by ``cache_activations``, checked on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise CLTError(f"{mpath} not found; create the cache with `matryoshka-clt cache`")
        try:
            m = json.loads(mpath.read_text())
            if m.get("format") != CACHE_FORMAT:
                raise KeyError("format")
            self.layers = [int(i) for i in m["layers"]]
            self.d_model = int(m["d_model"])
            self.n_tokens = int(m["n_tokens"])
            self.n_model_layers = int(m["n_model_layers"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CLTError(f"{mpath} is not a matryoshka-clt cache manifest (bad {e})") from None
        self.manifest = m
        for i in self.layers:
            self._check_layer_file(i)

    def _check_layer_file(self, layer: int) -> None:
        path = self.path / f"layer_{layer}.safetensors"
        want = [self.n_tokens, self.d_model]
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in ("input", "output"):
                    if key not in f.keys():
                        raise CLTError(f"{path} lacks tensor {key!r}")
                    shape = list(f.get_slice(key).get_shape())
                    if shape != want:
                        raise CLTError(
                            f"{path}: {key} has shape {shape}; the manifest says {want} "
                            "(n_tokens, d_model)"
                        )
        except (SafetensorError, OSError) as e:
            raise CLTError(f"{path} is missing or unreadable ({e})") from None

    def check_layers(self, layers: list[int]) -> list[int]:
        layers = parse_layers(layers)
        missing = [i for i in layers if i not in self.layers]
        if missing:
            raise CLTError(
                f"layers {missing} are not in the cache {self.path}; it holds {self.layers}"
            )
        return layers

    def load(
        self,
        layers: list[int] | None = None,
        dtype: torch.dtype | None = torch.float32,
        rows: slice | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Inputs and outputs ``[n_tokens, len(layers), d_model]`` in ``dtype``.

        ``dtype=None`` keeps the stored dtype: an all-layer float16 cache then takes half
        the memory, and training casts one batch at a time. ``rows`` (a step-1 slice)
        reads only those tokens from disk, as one rank of a distributed run does.
        """
        layers = self.check_layers(layers or self.layers)
        rows = rows or slice(None)
        xs, ys = [], []
        for i in layers:
            with safe_open(str(self.path / f"layer_{i}.safetensors"), framework="pt") as f:
                x, y = f.get_slice("input")[rows], f.get_slice("output")[rows]
                xs.append(x if dtype is None else x.to(dtype))
                ys.append(y if dtype is None else y.to(dtype))
        return torch.stack(xs, dim=1), torch.stack(ys, dim=1)


def token_source(model_spec: str, dataset: str, ctx_len: int, batch_size: int, seed: int, vocab: int):
    """``[batch_size, ctx_len]`` token ids to cache: uniform random ids (``dataset="random"``,
    endless) or the offline Austen corpus tokenized for ``model_spec``, shuffled by ``seed``."""
    if dataset == "random":
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randint(1, vocab, (batch_size, ctx_len), generator=g)
    from ..corpus import austen_dataset
    from ..offline import load_tokenizer

    ds = austen_dataset(load_tokenizer(model_spec), ctx_len=ctx_len).shuffle(seed=seed)
    ids = ds.with_format("torch")["input_ids"]
    for start in range(0, len(ids), batch_size):
        yield ids[start : start + batch_size]
