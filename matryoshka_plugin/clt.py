"""Matryoshka cross-layer transcoders from cached activations (training path 1, CPU or GPU).

1. ``cache_activations``: run a Hugging Face model with forward hooks on the chosen
   layers' MLPs and store each layer's MLP inputs and outputs as
   ``layer_{i}.safetensors`` (``input``, ``output`` of ``[n_tokens, d_model]``) next to
   a ``manifest.json`` (layers, d_model, hookpoints, n_tokens, ...).
2. ``train_clt``: train a ``MatryoshkaCLT`` from that cache with a plain loop (Adam or
   sparsify's SignSGD), a tqdm bar and periodic atomic checkpoints.
3. ``export_clt``: write circuit-tracer's cross-layer transcoder directory.

Console script: ``matryoshka-clt cache|train|export|eval`` (``--help`` on each).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .adapters.circuit_tracer.export import (
    ExportError,
    hookpoint_layer,
    write_config_yaml,
    write_nested_sizes,
)
from .adapters.clt import (
    CLTConfig,
    CLTError,
    MatryoshkaCLT,
    load_clt,
    read_clt_config,
    save_clt,
)
from .core import MatryoshkaConfigError

MANIFEST = "manifest.json"
CACHE_FORMAT = "matryoshka-clt-cache/1"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------
# Activation cache
# ---------------------------------------------------------------------------
def mlp_modules(model) -> dict[int, tuple[str, torch.nn.Module]]:
    """``{layer: (hookpoint, mlp module)}`` of a Hugging Face decoder (Llama, GPT-2, NeoX...)."""
    found = {}
    for name, module in model.named_modules():
        try:
            layer = hookpoint_layer(name)
        except ExportError:
            continue
        found[layer] = (name, module)
    if not found:
        raise CLTError(f"found no MLP modules named like layers.N.mlp in {type(model).__name__}")
    return found


class _StopForward(Exception):
    """Raised in the last cached layer's hook: later layers are not needed."""


def parse_layers(spec: str | list[int]) -> list[int]:
    """``"0,1,2"``, ``"0-3"`` or a list -> sorted layer numbers, rejecting duplicates."""
    if isinstance(spec, list):
        layers = [int(i) for i in spec]
    else:
        layers = []
        try:
            for part in str(spec).split(","):
                part = part.strip()
                if "-" in part:
                    lo, hi = part.split("-")
                    layers.extend(range(int(lo), int(hi) + 1))
                elif part:
                    layers.append(int(part))
        except ValueError:
            raise CLTError(
                f"layers {spec!r} is not a layer list; allowed: e.g. 0,1,2 or 0-3"
            ) from None
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise CLTError(f"layers {spec!r} must be distinct non-negative layer numbers")
    return sorted(layers)


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
    last = layers[-1]

    def take(t: Tensor) -> Tensor:
        return t[:, start:].reshape(-1, t.shape[-1]).to("cpu", dtype)

    def pre_hook(layer):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            ins[layer].append(take(x))

        return hook

    def post_hook(layer):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            outs[layer].append(take(out))
            if layer == last:
                raise _StopForward

        return hook

    handles = []
    for i in layers:
        mod = mlps[i][1]
        handles.append(mod.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(mod.register_forward_hook(post_hook(i), with_kwargs=True))
    device = next(model.parameters()).device
    got = 0
    bar = tqdm(total=n_tokens, desc="caching activations", unit="tok", disable=not show_progress)
    try:
        for batch in token_batches:
            if got >= n_tokens:
                break
            batch = torch.as_tensor(batch)
            if batch.ndim == 1:
                batch = batch[None]
            if batch.shape[1] <= start:
                continue
            try:
                model(input_ids=batch.to(device))
            except _StopForward:
                pass
            new = batch.shape[0] * (batch.shape[1] - start)
            got += new
            bar.update(min(new, n_tokens - (got - new)))
    finally:
        bar.close()
        for h in handles:
            h.remove()
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
        self, layers: list[int] | None = None, dtype: torch.dtype | None = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """Inputs and outputs ``[n_tokens, len(layers), d_model]`` in ``dtype``.

        ``dtype=None`` keeps the stored dtype: an all-layer float16 cache then takes half
        the memory, and training casts one batch at a time.
        """
        layers = self.check_layers(layers or self.layers)
        xs, ys = [], []
        for i in layers:
            with safe_open(str(self.path / f"layer_{i}.safetensors"), framework="pt") as f:
                x, y = f.get_tensor("input"), f.get_tensor("output")
                xs.append(x if dtype is None else x.to(dtype))
                ys.append(y if dtype is None else y.to(dtype))
        return torch.stack(xs, dim=1), torch.stack(ys, dim=1)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------
@dataclass
class CLTTrainConfig:
    """Training a Matryoshka CLT from an activation cache."""

    cache: str = ""
    """Activation cache directory written by `matryoshka-clt cache`."""

    save_dir: str = "clt-run"
    """Run directory: the final CLT goes to save_dir/clt, checkpoints to save_dir/checkpoint."""

    layers: list[int] = field(default_factory=list)
    """Cached layers to train on (sources and targets); empty means every cached layer."""

    clt: CLTConfig = field(default_factory=lambda: CLTConfig(matryoshka=True))
    """The CLT's width, k and Matryoshka options."""

    batch_size: int = 512
    """Tokens per optimisation step."""

    epochs: int = 1
    """Passes over the training tokens (ignored when max_steps is set)."""

    max_steps: int = 0
    """Stop after this many steps; 0 means run the given epochs."""

    optimizer: Literal["adam", "signum"] = "adam"
    """Adam, or sparsify's SignSGD ("signum")."""

    lr: float = 0.0
    """Learning rate; 0 picks sparsify's default for the width and optimizer."""

    lr_warmup_steps: int = 50
    """Linear learning-rate warmup steps."""

    holdout_fraction: float = 0.05
    """Share of cached tokens held out to measure FVU per prefix at the end."""

    save_every: int = 500
    """Write an atomic checkpoint every this many steps (0: only at the end)."""

    resume: bool = False
    """Continue from save_dir/checkpoint if it exists."""

    seed: int = 0
    """Seed for initialisation and data order."""

    device: str = "cpu"
    """Torch device to train on (cpu, cuda, cuda:1, ...)."""

    def __post_init__(self):
        if isinstance(self.clt, dict):
            self.clt = CLTConfig.from_dict(self.clt)
        if self.batch_size < 2:
            raise CLTError(f"batch_size={self.batch_size} must be at least 2 (FVU needs a variance)")
        if not 0 <= self.holdout_fraction < 1:
            raise CLTError(f"holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if self.optimizer not in ("adam", "signum"):
            raise CLTError(f"optimizer={self.optimizer!r} is unknown; allowed: adam, signum")
        if self.epochs < 1 or self.max_steps < 0 or self.save_every < 0:
            raise CLTError("epochs must be >= 1 and max_steps, save_every >= 0")


def default_lr(optimizer: str, num_latents: int) -> float:
    """sparsify's defaults: Adam 2e-4, SignSGD 5e-3, each scaled by 1/sqrt(width / 2^14)."""
    base = 2e-4 if optimizer == "adam" else 5e-3
    return base / (num_latents / 2**14) ** 0.5


def eval_prefix_lens(clt: MatryoshkaCLT) -> list[int]:
    """The nested sizes, or for a sampled schedule a doubling ladder up to the width."""
    if clt.cfg.matryoshka and clt.cfg.prefix_schedule == "fixed":
        return clt.nested_sizes
    M = clt.num_latents
    lens = sorted({max(1, M >> s) for s in range(5)})
    return lens


def _plot(history: list[dict], prefix_fvu: dict, layers: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history], label="training loss (nested, summed over targets)")
    axes[0].plot(steps, [h["fvu_mean"] for h in history], label="full-width FVU, mean over targets")
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    lens = sorted(prefix_fvu)
    for t, layer in enumerate(layers):
        axes[1].plot(lens, [prefix_fvu[p][t] for p in lens], marker="o", label=f"target layer {layer}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("prefix length P (latents kept per source layer)")
    axes[1].set_ylabel("held-out FVU")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_clt(cfg: CLTTrainConfig, *, show_progress: bool = True) -> MatryoshkaCLT:
    """Train a CLT from ``cfg.cache``; writes ``save_dir/clt`` and ``save_dir/metrics.json``.

    Returns the trained CLT in eval mode.
    """
    from sparsify.sign_sgd import SignSGD

    cache = ActivationCache(cfg.cache)
    layers = cache.check_layers(cfg.layers or cache.layers)
    x_all, y_all = cache.load(layers, dtype=None)
    n_hold = int(len(x_all) * cfg.holdout_fraction)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(x_all), generator=gen)
    hold, train_idx = order[:n_hold], order[n_hold:]
    n_train = len(train_idx)
    if n_train < cfg.batch_size:
        raise CLTError(
            f"batch_size={cfg.batch_size} exceeds the {n_train} training tokens in {cache.path}"
        )
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    clt = MatryoshkaCLT(cache.d_model, layers, cfg.clt, device=device)
    clt.source = {
        "model": cache.manifest.get("model", ""),
        "n_model_layers": cache.n_model_layers,
        "hookpoints": {str(i): cache.manifest["hookpoints"][str(i)] for i in layers},
        "cache": str(cache.path.absolute()),
    }
    lr = cfg.lr or default_lr(cfg.optimizer, clt.num_latents)
    opt = (
        # Fused: one pass over each parameter instead of ~8; on CPU an all-layer CLT's
        # optimizer step is otherwise as slow as its forward and backward together.
        torch.optim.Adam(clt.parameters(), lr=lr, fused=True)
        if cfg.optimizer == "adam"
        else SignSGD(clt.parameters(), lr=lr)
    )
    warm = max(cfg.lr_warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    steps_per_epoch = n_train // cfg.batch_size
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    since_fired = torch.zeros(len(layers), clt.num_latents, dtype=torch.long, device=device)
    history: list[dict] = []
    step = 0

    run_dir = Path(cfg.save_dir)
    ckpt = run_dir / "checkpoint"
    if cfg.resume and (ckpt / STATE_FILE).is_file():
        loaded = load_clt(ckpt, device=device)
        clt.load_state_dict(loaded.state_dict())
        state = torch.load(ckpt / STATE_FILE, weights_only=False, map_location=device)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        clt.sampler.load_state_dict(state["sampler"])
        since_fired = state["since_fired"].to(device)
        history, step = state["history"], state["step"]

    def write_checkpoint():
        state = {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "sampler": clt.sampler.state_dict(),
            "since_fired": since_fired.cpu(),
            "history": history,
            "step": step,
            "config": asdict(cfg),
        }
        save_clt(clt, ckpt, extra_files={STATE_FILE: lambda p: torch.save(state, p)})

    clt.train()
    bar = tqdm(total=total, initial=step, desc="training CLT", unit="step", disable=not show_progress)
    perm_epoch, perm = -1, None
    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            # Each epoch's order depends only on (seed, epoch), so a resumed run sees the same data.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perm, perm_epoch = train_idx[torch.randperm(n_train, generator=g)], epoch
        rows = perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
        xb, yb = x_all[rows].to(device, torch.float32), y_all[rows].to(device, torch.float32)
        if step == 0:
            clt.init_biases(xb, yb)
        dead = since_fired > cfg.clt.dead_feature_threshold if cfg.clt.auxk_alpha > 0 else None
        out = clt(xb, yb, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        since_fired += len(rows)
        for s, idx in enumerate(out.top_indices):
            since_fired[s, idx.flatten()] = 0
        step += 1
        row = {
            "step": step,
            "loss": float(out.loss.detach()),
            "fvu": out.fvu.tolist(),
            "fvu_mean": float(out.fvu.mean()),
            "dead_fraction": float((since_fired > cfg.clt.dead_feature_threshold).float().mean()),
        }
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", fvu=f"{row['fvu_mean']:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            write_checkpoint()
    bar.close()
    write_checkpoint()
    clt.eval()
    metrics = {"layers": layers, "steps": step, "lr": lr, "history": history}
    if n_hold >= 2:
        xh, yh = x_all[hold].to(device, torch.float32), y_all[hold].to(device, torch.float32)
        pf = clt.prefix_fvu(xh, yh, eval_prefix_lens(clt))
        metrics["holdout_tokens"] = n_hold
        metrics["holdout_prefix_fvu"] = {str(p): v for p, v in pf.items()}
    run_dir.mkdir(parents=True, exist_ok=True)

    def write_metrics(p: Path):
        p.write_text(json.dumps(metrics, indent=1))

    save_clt(clt, run_dir / "clt", extra_files={METRICS_FILE: write_metrics})
    if "holdout_prefix_fvu" in metrics:
        _plot(history, pf, layers, run_dir / "clt_training.png")
    return clt


# ---------------------------------------------------------------------------
# Export to circuit-tracer
# ---------------------------------------------------------------------------
def clt_tensors(clt: MatryoshkaCLT, n_model_layers: int) -> dict[int, tuple[dict, dict]]:
    """circuit-tracer's per-layer ``(W_enc_i file, W_dec_i file)`` tensors.

    circuit-tracer's CLT spans every model layer: untrained layers get zero encoders
    and decoders (no latent fires there; their MLP output goes to the error nodes).
    The tensors keep their orientation: circuit-tracer encodes ``x @ W_enc_i.T`` and
    decodes ``act @ W_dec_i[:, j - i]``, as the plugin's CLT does.
    """
    if max(clt.layers) >= n_model_layers:
        raise ExportError(
            f"the CLT covers layers {clt.layers}, beyond the model's {n_model_layers} layers"
        )
    M, d = clt.num_latents, clt.d_model
    slot = {layer: s for s, layer in enumerate(clt.layers)}
    out = {}
    for i in range(n_model_layers):
        W_enc = torch.zeros(M, d)
        b_enc = torch.zeros(M)
        b_dec = torch.zeros(d)
        W_dec = torch.zeros(M, n_model_layers - i, d)
        if i in slot:
            s = slot[i]
            W_enc, b_enc, b_dec = clt.W_enc[s], clt.b_enc[s], clt.b_dec[s]
            for t in range(clt.n_layers - s):
                W_dec[:, clt.layers[s + t] - i] = clt.W_dec[s][:, t].detach().float().cpu()
        enc = {f"W_enc_{i}": W_enc, f"b_enc_{i}": b_enc, f"b_dec_{i}": b_dec}
        out[i] = (
            {k: v.detach().float().cpu().contiguous() for k, v in enc.items()},
            {f"W_dec_{i}": W_dec.contiguous()},
        )
    return out


@torch.no_grad()
def export_clt(
    clt: MatryoshkaCLT | str | Path,
    out_dir: str | Path,
    *,
    n_model_layers: int | None = None,
    activation: str = "topk",
    calibration: Tensor | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write circuit-tracer's cross-layer transcoder directory for a (Matryoshka) CLT.

    - TopK CLTs keep their exact activation (``activation="topk"``): ``config.yaml``
      says ``matryoshka_topk_cross_layer_transcoder`` with ``topk_k``, which the
      plugin's ``load_transcoders_dir`` turns into a ``cross_layer_transcoder`` with a
      ReLU-then-TopK activation. ``activation="jumprelu"`` writes per-latent
      thresholds calibrated on ``calibration`` (MLP inputs ``[n, L, d]``), which stock
      circuit-tracer loads (an approximation of TopK).
    - BatchTopK CLTs are thresholded at inference: written as JumpReLU with their exact
      per-layer threshold, ``model_kind: cross_layer_transcoder`` either way.
    """
    from .adapters.circuit_tracer.export import ACTIVATIONS

    if not isinstance(clt, MatryoshkaCLT):
        clt = load_clt(clt)
    clt = clt.cpu().float().eval()
    if activation not in ACTIVATIONS:
        raise ExportError(f"activation {activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    n_model_layers = n_model_layers or clt.source.get("n_model_layers") or max(clt.layers) + 1
    tensors = clt_tensors(clt, int(n_model_layers))
    M = clt.num_latents
    thresholds = None
    if clt.cfg.batch_topk:
        written = "jumprelu"
        thresholds = clt.batch_topk_threshold.clamp_min(0).float()
    elif activation == "jumprelu":
        if calibration is None:
            raise ExportError("activation jumprelu needs calibration MLP inputs [n, layers, d_model]")
        clt._check_input(calibration, "calibration")
        thresholds = _calibrate(clt, calibration)
        written = "jumprelu"
    else:
        written = "topk"
    if thresholds is not None:
        slot = {layer: s for s, layer in enumerate(clt.layers)}
        for i, (enc, _) in tensors.items():
            t = thresholds[slot[i]] if i in slot else torch.zeros(())
            enc[f"threshold_{i}"] = (t.expand(M) if t.ndim == 0 else t).contiguous().clone()
    sizes = clt.nested_sizes if clt.cfg.matryoshka else None
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        for i, (enc, dec) in tensors.items():
            save_file(enc, str(tmp / f"W_enc_{i}.safetensors"))
            save_file(dec, str(tmp / f"W_dec_{i}.safetensors"))
        write_config_yaml(
            tmp,
            base_kind="cross_layer_transcoder",
            activation=written,
            k=clt.cfg.k,
            model_name=model_name or clt.source.get("model") or None,
            scan=f"matryoshka-clt-{Path(out_dir).name}",
        )
        write_nested_sizes(
            tmp,
            sizes,
            M,
            activation=written,
            k=clt.cfg.k,
            trained_layers=clt.layers,
            n_layers=int(n_model_layers),
            prefix_schedule=clt.cfg.prefix_schedule if clt.cfg.matryoshka else None,
        )
    return Path(out_dir)


@torch.no_grad()
def export_per_layer(
    clts: list[MatryoshkaCLT | str | Path],
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one-layer CLTs as circuit-tracer's per-layer transcoder set.

    A one-layer CLT is a transcoder (same encoder, one decoder slot), so
    ``layer_{i}.safetensors`` holds its tensors unchanged and circuit-tracer attributes
    through it with its per-layer code path. This is how the plugin's CLT-vs-per-layer
    comparison trains both dictionaries with one trainer. TopK CLTs are written as
    exact TopK (the plugin's loader), BatchTopK ones as JumpReLU with their threshold.
    """
    clts = [c if isinstance(c, MatryoshkaCLT) else load_clt(c) for c in clts]
    if not clts:
        raise ExportError("export_per_layer needs at least one one-layer CLT")
    by_layer: dict[int, MatryoshkaCLT] = {}
    for c in clts:
        if c.n_layers != 1:
            raise ExportError(f"a CLT over layers {c.layers} is not a per-layer transcoder; allowed: one layer each")
        if c.layers[0] in by_layer:
            raise ExportError(f"two CLTs for layer {c.layers[0]}; allowed: one per layer")
        by_layer[c.layers[0]] = c.cpu().float().eval()
    first = clts[0]
    shape = (first.num_latents, first.cfg.k, first.cfg.batch_topk, first.nested_sizes if first.cfg.matryoshka else None)
    for layer, c in by_layer.items():
        got = (c.num_latents, c.cfg.k, c.cfg.batch_topk, c.nested_sizes if c.cfg.matryoshka else None)
        if got != shape:
            raise ExportError(
                f"layer {layer}: (width, k, batch_topk, nested sizes) {got} differ from {shape}; "
                "circuit-tracer needs one shape for all layers"
            )
    written = "jumprelu" if first.cfg.batch_topk else "topk"
    with atomic_dir(out_dir, overwrite=overwrite, error=ExportError) as tmp:
        for layer, c in sorted(by_layer.items()):
            tensors = {"W_enc": c.W_enc[0], "b_enc": c.b_enc[0], "W_dec": c.W_dec[0][:, 0], "b_dec": c.b_dec[0]}
            if c.cfg.batch_topk:
                tensors["activation_function.threshold"] = c.batch_topk_threshold[0].clamp_min(0).expand(c.num_latents)
            save_file({k: v.detach().float().contiguous().clone() for k, v in tensors.items()}, str(tmp / f"layer_{layer}.safetensors"))
        write_config_yaml(
            tmp,
            base_kind="transcoder_set",
            activation=written,
            k=first.cfg.k,
            model_name=model_name or first.source.get("model") or None,
            scan=f"matryoshka-clt-per-layer-{Path(out_dir).name}",
        )
        write_nested_sizes(
            tmp,
            shape[3],
            first.num_latents,
            activation=written,
            k=first.cfg.k,
            hookpoints={str(layer): c.source.get("hookpoints", {}).get(str(layer), "") for layer, c in by_layer.items()},
        )
    return Path(out_dir)


def _calibrate(clt: MatryoshkaCLT, x: Tensor) -> Tensor:
    """Per-layer JumpReLU thresholds from the circuit-tracer helper's calibration."""
    from types import SimpleNamespace

    from .adapters.circuit_tracer.activations import calibrate_jumprelu_thresholds

    out = []
    for s in range(clt.n_layers):
        shim = SimpleNamespace(
            dtype=clt.b_dec.dtype,
            encoder=SimpleNamespace(weight=clt.W_enc[s], bias=clt.b_enc[s]),
            encode=lambda c, s=s: clt.encode_layer(c, s),
        )
        out.append(calibrate_jumprelu_thresholds(shim, x[:, s]))
    return torch.stack(out)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _token_batches(model_spec: str, dataset: str, ctx_len: int, batch_size: int, seed: int, vocab: int):
    if dataset == "random":
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randint(1, vocab, (batch_size, ctx_len), generator=g)
    from .corpus import austen_dataset
    from .offline import load_tokenizer

    ds = austen_dataset(load_tokenizer(model_spec), ctx_len=ctx_len).shuffle(seed=seed)
    ids = ds.with_format("torch")["input_ids"]
    for start in range(0, len(ids), batch_size):
        yield ids[start : start + batch_size]


def cmd_cache(a) -> None:
    from .offline import SMOLLM2, load_pretrained

    spec = a.model or SMOLLM2
    model = load_pretrained(spec, device=a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    batches = _token_batches(spec, a.dataset, a.ctx_len, a.batch_size, a.seed, model.config.vocab_size)
    out = cache_activations(
        model, batches, parse_layers(a.layers), a.out, n_tokens=a.n_tokens, dtype=dtype,
        model_name=str(spec), overwrite=a.overwrite,
    )
    print(f"cached {a.n_tokens} tokens of layers {parse_layers(a.layers)} to {out}")


def cmd_train(cfg: CLTTrainConfig) -> None:
    if not cfg.cache:
        raise CLTError("--cache is required: an activation cache directory from `matryoshka-clt cache`")
    train_clt(cfg)
    metrics = json.loads((Path(cfg.save_dir) / "clt" / METRICS_FILE).read_text())
    print(f"trained CLT saved to {Path(cfg.save_dir) / 'clt'}")
    for p, fvu in metrics.get("holdout_prefix_fvu", {}).items():
        print(f"  prefix {p:>6}: held-out FVU per target layer " + " ".join(f"{v:.3f}" for v in fvu))


def cmd_export(a) -> None:
    calibration = None
    if a.calibration_cache:
        d = read_clt_config(a.clt)
        calibration, _ = ActivationCache(a.calibration_cache).load(d["layers"])
        calibration = calibration[: a.calibration_tokens]
    out = export_clt(
        a.clt, a.out, n_model_layers=a.n_model_layers, activation=a.activation,
        calibration=calibration, model_name=a.model_name, overwrite=a.overwrite,
    )
    print(f"exported circuit-tracer cross-layer transcoder to {out}")


def cmd_eval(a) -> None:
    clt = load_clt(a.clt)
    cache = ActivationCache(a.cache)
    x, y = cache.load(clt.layers)
    x, y = x[: a.n_tokens], y[: a.n_tokens]
    lens = [int(p) for p in a.prefix_lens.split(",")] if a.prefix_lens else eval_prefix_lens(clt)
    result = clt.prefix_fvu(x, y, lens)
    print(json.dumps({"layers": clt.layers, "prefix_fvu": {str(k): v for k, v in result.items()}}, indent=1))


def build_parser():
    from simple_parsing import ArgumentParser

    parser = ArgumentParser(prog="matryoshka-clt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cache", help="cache MLP inputs/outputs of chosen layers from a HF model")
    c.add_argument("--model", default=None, help="HF model folder, .gguf, or 'smollm2' (default)")
    c.add_argument("--layers", default="0-3", help="layers to cache, e.g. 0,1,2 or 0-3")
    c.add_argument("--out", required=True, help="cache directory to create")
    c.add_argument("--n-tokens", type=int, default=50_000, help="tokens to cache")
    c.add_argument("--ctx-len", type=int, default=128, help="tokens per sequence")
    c.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    c.add_argument("--dataset", choices=["austen", "random"], default="austen", help="token source")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace an existing cache")

    t = sub.add_parser("train", help="train a (Matryoshka) CLT from an activation cache")
    t.add_arguments(CLTTrainConfig, dest="cfg")

    e = sub.add_parser("export", help="export a trained CLT to circuit-tracer's format")
    e.add_argument("clt", help="CLT directory (save_dir/clt from train)")
    e.add_argument("out", help="circuit-tracer transcoder directory to create")
    e.add_argument("--n-model-layers", type=int, default=None, help="model layers (default: from the cache manifest)")
    e.add_argument("--activation", choices=["topk", "jumprelu"], default="topk")
    e.add_argument("--calibration-cache", default=None, help="cache with MLP inputs for --activation jumprelu")
    e.add_argument("--calibration-tokens", type=int, default=20_000)
    e.add_argument("--model-name", default=None)
    e.add_argument("--overwrite", action="store_true")

    v = sub.add_parser("eval", help="FVU per prefix per target layer of a CLT on a cache")
    v.add_argument("clt")
    v.add_argument("cache")
    v.add_argument("--prefix-lens", default="", help="comma-separated prefix lengths (default: nested sizes)")
    v.add_argument("--n-tokens", type=int, default=20_000)
    return parser


USER_ERRORS = (CLTError, MatryoshkaConfigError, ExportError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    from .core.errors import CheckpointError

    try:
        from .offline import OfflineAssetError
    except ImportError:  # pragma: no cover - offline helper missing
        OfflineAssetError = CLTError
    errors = (*USER_ERRORS, CheckpointError, OfflineAssetError)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "cache":
            cmd_cache(args)
        elif args.command == "train":
            cmd_train(args.cfg)
        elif args.command == "export":
            cmd_export(args)
        else:
            cmd_eval(args)
    except errors as e:
        print(f"matryoshka-clt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("matryoshka-clt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
