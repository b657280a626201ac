"""Training a Matryoshka CLT from an activation cache (training path 1, CPU or GPU).

``train_clt`` trains a ``MatryoshkaCLT`` on a cache written by ``cache_activations``
with a plain loop: Adam or sparsify's SignSGD, sparsify's default learning rate and
first-step bias initialisation, AuxK on latents dead for ``dead_feature_threshold``
tokens, a tqdm bar and periodic atomic checkpoints (``save_dir/checkpoint``) that
``resume`` continues from. At the end it measures held-out FVU per prefix length and
writes the CLT to ``save_dir/clt`` with ``metrics.json`` and a plot.

Under ``torchrun`` it is data-parallel: each rank reads only its own contiguous
``n_tokens // world_size`` rows of the cache, holds out and orders them as a lone run
orders all of them, and trains a DDP copy on ``batch_size`` tokens per step; the first
step's biases, the dead-latent counts and the logged losses are averaged over the
ranks, and rank 0 alone writes the checkpoints, the CLT and its metrics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import distributed
from ..atomic import check_writable_dir
from ..core.config import SAMPLED_SCHEDULES
from ..core.errors import CLTError
from ..device import resolve_device
from ..core.plain_state import load_plain_state
from .cache import ActivationCache
from .model import CLTConfig, MatryoshkaCLT, load_clt, save_clt

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


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
    """Tokens per optimisation step (per rank under torchrun)."""

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

    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S
    """Under torchrun, seconds a rank waits for the others before it stops."""

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
    if clt.cfg.matryoshka and clt.cfg.prefix_schedule not in SAMPLED_SCHEDULES:
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


def resume_from(ckpt: Path, clt: MatryoshkaCLT, opt, sched) -> tuple[torch.Tensor, list, int]:
    """Load ``ckpt`` (weights and ``state.pt``) into ``clt``, ``opt`` and ``sched``.

    Returns ``(since_fired, history, step)``. ``state.pt`` is read as plain data only
    (``core.plain_state``); a missing, corrupt or mismatched file is one ``CLTError``.
    """
    loaded = load_clt(ckpt, device=clt.device)
    if (loaded.cfg, loaded.layers, loaded.d_model) != (clt.cfg, clt.layers, clt.d_model):
        raise CLTError(
            f"{ckpt} holds a CLT over layers {loaded.layers} (d_model {loaded.d_model}, "
            f"{loaded.cfg}); this run asks for layers {clt.layers} (d_model {clt.d_model}, "
            f"{clt.cfg}): resume with the same CLT config, or use a new --save_dir"
        )
    path = ckpt / STATE_FILE
    state = load_plain_state(path, CLTError, map_location=clt.device)
    try:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        clt.sampler.load_state_dict(state["sampler"])
        if clt.cfg.permute_every:
            clt.load_latent_mass_state(state["latent_mass"])
        since_fired = state["since_fired"].to(clt.device, torch.long)
        history, step = list(state["history"]), int(state["step"])
        if since_fired.shape != (clt.n_layers, clt.num_latents) or len(history) != step:
            raise ValueError(f"since_fired {tuple(since_fired.shape)}, {len(history)} history rows for step {step}")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLTError(f"{path} is not a training state of this CLT (bad {msg})") from None
    clt.load_state_dict(loaded.state_dict())
    # Every training step updates each source's BatchTopK threshold once.
    clt.batch_topk_updates.fill_(step if clt.cfg.batch_topk else 0)
    return since_fired, history, step


def _average_over_ranks(*tensors: torch.Tensor) -> None:
    """Replace each tensor in place by its mean over the ranks (nothing when alone)."""
    for t in tensors:
        if distributed.world_size() > 1:
            dist.all_reduce(t)
            t /= distributed.world_size()


def train_clt(cfg: CLTTrainConfig, *, show_progress: bool = True) -> MatryoshkaCLT:
    """Train a CLT from ``cfg.cache``; writes ``save_dir/clt`` and ``save_dir/metrics.json``.

    Returns the trained CLT in eval mode. Under ``torchrun``, one rank of a
    data-parallel run (see the module docstring).
    """
    device = resolve_device(cfg.device)
    local_rank = distributed.join_process_group(device, cfg.dist_timeout)
    if local_rank is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    hint = f"rerun every rank with --resume to go on from {Path(cfg.save_dir) / 'checkpoint'}"
    with distributed.reporting_lost_ranks(hint):
        clt = _train_clt_on(device, cfg, show_progress)
        if dist.is_initialized():  # the others return once rank 0 has written the CLT
            dist.barrier()
    distributed.leave_process_group()
    return clt


def _train_clt_on(device: torch.device, cfg: CLTTrainConfig, show_progress: bool) -> MatryoshkaCLT:
    from sparsify.sign_sgd import SignSGD

    check_writable_dir(cfg.save_dir)
    cache = ActivationCache(cfg.cache)
    layers = cache.check_layers(cfg.layers or cache.layers)
    rank, world = distributed.rank(), distributed.world_size()
    adaptive = cfg.clt.matryoshka and cfg.clt.prefix_schedule == "adaptive"
    if world > 1 and (cfg.clt.permute_every or adaptive):
        what = f"permute_every={cfg.clt.permute_every}" if cfg.clt.permute_every else "prefix_schedule='adaptive'"
        raise CLTError(f"{what} runs in a single process only: each rank would follow its own batches' activations")
    # Equal shards: every rank must take the same number of steps.
    shard = cache.n_tokens // world
    x_all, y_all = cache.load(layers, dtype=None, rows=slice(rank * shard, (rank + 1) * shard))
    n_hold = int(len(x_all) * cfg.holdout_fraction)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(x_all), generator=gen)
    hold, train_idx = order[:n_hold], order[n_hold:]
    n_train = len(train_idx)
    if n_train < cfg.batch_size:
        raise CLTError(
            f"batch_size={cfg.batch_size} exceeds the {n_train} training tokens in {cache.path}"
        )
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
    if cfg.resume and ckpt.exists():
        since_fired, history, step = resume_from(ckpt, clt, opt, sched)

    def write_checkpoint():
        if rank:
            return
        state = {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "sampler": clt.sampler.state_dict(),
            "latent_mass": clt.latent_mass_state(),
            "since_fired": since_fired.cpu(),
            "history": history,
            "step": step,
            "config": asdict(cfg),
        }
        save_clt(clt, ckpt, extra_files={STATE_FILE: lambda p: torch.save(state, p)})

    clt.train()
    model = clt  # what the steps run through: DDP once the first step has set the biases
    bar = tqdm(total=total, initial=step, desc="training CLT", unit="step", disable=not show_progress or rank)
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
            # Means of equal shards' batch means: the biases of the global batch.
            with torch.no_grad():
                _average_over_ranks(*clt.b_enc, clt.b_dec)
        if world > 1 and model is clt:
            model = DistributedDataParallel(
                clt, device_ids=[device.index] if device.type == "cuda" else None
            )
        dead = since_fired > cfg.clt.dead_feature_threshold if cfg.clt.auxk_alpha > 0 else None
        out = model(xb, yb, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        since_fired += len(rows) * world
        for s, idx in enumerate(out.top_indices):
            since_fired[s, idx.flatten()] = 0
        if world > 1:  # a latent that fired on any rank fired
            dist.all_reduce(since_fired, op=dist.ReduceOp.MIN)
        step += 1
        if cfg.clt.permute_every and step % cfg.clt.permute_every == 0:
            clt.permute_by_mass([opt], since_fired)
        loss, fvu = out.loss.detach().clone(), out.fvu.detach().clone()
        _average_over_ranks(loss, fvu)
        row = {
            "step": step,
            "loss": float(loss),
            "fvu": fvu.tolist(),
            "fvu_mean": float(fvu.mean()),
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
    if rank:
        return clt
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
