"""Train a coder straight from activations, with no language model.

sparsify can only train on a model's forward pass. ``fit_activations`` gives its
``Trainer`` a stand-in model, ``ActivationReplay``, whose forward looks up cached
activation rows and passes them through a single hookpoint. Everything else (loss,
AuxK, dead latents, optimisers, checkpoints, resume) is sparsify's own.
"""

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .adapters.sparsify import (
    MatryoshkaSparseCoderConfig,
    MatryoshkaTrainConfig,
    MatryoshkaTrainer,
)
from .atomic import check_writable_dir, recover_dir, run_lock
from .core.errors import UsageError

HOOKPOINT = "site"


class _Site(nn.Module):
    """The hookpoint: input is the coder's input, output its target."""

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return targets


class ActivationReplay(nn.Module):
    """A stand-in for a transformer: token ids are row indices into the activations."""

    def __init__(self, inputs: Tensor, targets: Tensor | None):
        super().__init__()
        self.register_buffer("inputs", inputs, persistent=False)
        self.register_buffer("targets", targets, persistent=False)
        self.site = _Site()
        self.config = SimpleNamespace(num_hidden_layers=1)

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def dummy_inputs(self) -> dict:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long, device=self.device)}

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.inputs[input_ids]
        y = x if self.targets is None else self.targets[input_ids]
        return self.site(x, y)


def load_activations(source: Tensor | str | Path, key: str) -> Tensor:
    """A tensor as given, or tensor ``key`` of a safetensors file."""
    if isinstance(source, Tensor):
        return source
    path = Path(source)
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise UsageError(f"cannot read activations from {path}: {e}") from None
    if key not in tensors:
        raise UsageError(f"{path} has no tensor {key!r}; it holds {sorted(tensors)}")
    return tensors[key]


def fit_activations(
    inputs: Tensor | str | Path,
    cfg: MatryoshkaSparseCoderConfig,
    *,
    targets: Tensor | str | Path | None = None,
    batch_size: int = 1024,
    seq_len: int = 64,
    epochs: int = 1,
    seed: int = 0,
    save_dir: str | Path | None = None,
    run_name: str = "fit",
    device: str | torch.device = "cpu",
    resume: bool = False,
    **train_kwargs,
):
    """Train a sparsify coder (Matryoshka if ``cfg.matryoshka``) on activation rows.

    ``inputs`` (and ``targets`` for a transcoder) are ``[n, d]`` tensors or safetensors
    files holding tensors named ``inputs``/``targets``. Rows are grouped into
    pseudo-sequences of ``seq_len``; ``batch_size`` counts rows. Extra keyword arguments
    are ``TrainConfig`` fields (``optimizer``, ``lr``, ``auxk_alpha``, ...).
    Returns the trained coder in eval mode.
    """
    x = load_activations(inputs, "inputs").float()
    y = None if targets is None else load_activations(targets, "targets").float()
    if x.ndim != 2 or x.shape[0] == 0:
        raise UsageError(f"inputs must be a non-empty [rows, d] matrix, got shape {tuple(x.shape)}")
    if y is not None and (y.ndim != 2 or y.shape[0] != x.shape[0]):
        raise UsageError(
            f"targets shape {tuple(y.shape)} does not match inputs shape {tuple(x.shape)}"
        )
    for name, t in (("inputs", x), ("targets", y)):
        # One NaN or Inf row makes every weight NaN within a few steps, silently.
        if t is not None and not (finite := torch.isfinite(t).all(dim=1)).all():
            bad_rows = (~finite).nonzero().flatten()
            raise UsageError(
                f"{name} hold NaN or Inf values in {len(bad_rows)} rows (first: row "
                f"{int(bad_rows[0])}); allowed: finite values only"
            )
    if cfg.transcode != (y is not None):
        raise UsageError(
            f"transcode={cfg.transcode} needs targets {'given' if cfg.transcode else 'omitted'}"
        )
    n_seq = x.shape[0] // seq_len
    if n_seq * seq_len < batch_size:
        raise UsageError(
            f"batch_size={batch_size} rows exceeds the {n_seq * seq_len} usable rows"
        )
    order = torch.randperm(n_seq * seq_len, generator=torch.Generator().manual_seed(seed))
    rows = order.view(n_seq, seq_len).repeat(epochs, 1)
    dataset = Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")

    train_kwargs.setdefault("log_to_wandb", False)
    train_kwargs.setdefault("save_every", 10**9)
    train_cfg = MatryoshkaTrainConfig(
        sae=replace(cfg),
        batch_size=max(batch_size // seq_len, 1),
        hookpoints=[HOOKPOINT],
        init_seeds=[seed],
        save_dir=str(save_dir) if save_dir is not None else "",
        run_name=run_name,
        **train_kwargs,
    )
    run_dir = Path(train_cfg.save_dir) / run_name
    if save_dir is not None:
        check_writable_dir(run_dir)  # now, not at the first save after the whole run
    model = ActivationReplay(x.to(device), None if y is None else y.to(device))
    trainer = MatryoshkaTrainer(train_cfg, dataset, model)
    if save_dir is None:
        trainer.save = lambda: None  # no checkpoint was asked for
    # The lock keeps a second run on the same directory from deleting this one's staging.
    with run_lock(run_dir) if save_dir is not None else nullcontext():
        # A crash mid checkpoint swap leaves the run under a sibling name until recovered.
        if resume and (recover_dir(run_dir) / "state.pt").exists():
            trainer.load_state(str(run_dir))
        trainer.fit()
    return trainer.saes[HOOKPOINT].eval()
