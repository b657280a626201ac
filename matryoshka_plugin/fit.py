"""Train a coder straight from activations, with no language model.

sparsify can only train on a model's forward pass. ``fit_activations`` gives its
``Trainer`` a stand-in model, ``ActivationReplay``, whose forward looks up cached
activation rows and passes them through a single hookpoint. Everything else (loss,
AuxK, dead latents, optimisers, checkpoints, resume) is sparsify's own, with three
defaults fitted to runs on cached rows (the last two printed as a notice when they
apply): rows are reshuffled every epoch, Adam's warm-up is a tenth of the run, and with
AuxK on a latent counts as dead after a tenth of an epoch without firing.
"""

import sys
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Dataset
from safetensors import SafetensorError
from safetensors.torch import load_file
from sparsify import SparseCoder
from torch import Tensor, nn

from .adapters.sparsify import (
    MatryoshkaSparseCoder,
    MatryoshkaSparseCoderConfig,
    MatryoshkaTrainConfig,
    MatryoshkaTrainer,
)
from .atomic import check_writable_dir, recover_dir, run_lock
from .core.errors import UsageError

HOOKPOINT = "site"

WARMUP_FRACTION = 0.1
"""Share of the run that Adam's (and Muon's Adam part) warm-up takes when not given."""

DEAD_FRACTION = 0.1
"""With AuxK on, a latent counts as dead after this share of an epoch without firing (when not given)."""


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
    shuffle_epochs: bool = True,
    **train_kwargs,
):
    """Train a sparsify coder (Matryoshka if ``cfg.matryoshka``) on activation rows.

    ``inputs`` (and ``targets`` for a transcoder) are ``[n, d]`` tensors or safetensors
    files holding tensors named ``inputs``/``targets``. Rows are grouped into
    pseudo-sequences of ``seq_len``; ``batch_size`` counts rows. Extra keyword arguments
    are ``TrainConfig`` fields (``optimizer``, ``lr``, ``auxk_alpha``, ...).
    ``shuffle_epochs``: draw a new row order every epoch (False repeats the first one).
    Returns the trained coder in eval mode, always a ``MatryoshkaSparseCoder`` (a plain
    one when ``cfg`` asks for no plugin feature) so every result has ``prefix_fvu`` and
    ``nested_sizes``; its weights are sparsify's own.
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
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise UsageError(f"epochs={epochs!r} is not allowed; expected an integer >= 1")
    rows = epoch_row_order(n_seq * seq_len, epochs, seed, shuffle_epochs).view(-1, seq_len)
    dataset = Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")

    train_kwargs.setdefault("log_to_wandb", False)
    train_kwargs.setdefault("save_every", 10**9)
    seqs_per_batch = max(batch_size // seq_len, 1)
    steps = len(rows) // seqs_per_batch // train_kwargs.get("grad_acc_steps", 1)
    run_defaults(train_kwargs, steps, rows_per_epoch=n_seq * seq_len)
    train_cfg = MatryoshkaTrainConfig(
        sae=replace(cfg),
        batch_size=seqs_per_batch,
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
    return as_prefix_coder(trainer.saes[HOOKPOINT]).eval()


def epoch_row_order(n_rows: int, epochs: int, seed: int, shuffle: bool) -> Tensor:
    """Row indices for ``epochs`` passes: each a permutation of ``range(n_rows)``.

    The first epoch is the same for ``shuffle`` True and False (and the order older
    versions repeated every epoch); later ones are new draws of the same generator.
    """
    g = torch.Generator().manual_seed(seed)
    first = torch.randperm(n_rows, generator=g)
    later = [torch.randperm(n_rows, generator=g) if shuffle else first for _ in range(epochs - 1)]
    return torch.cat([first, *later])


def _notice(message: str) -> None:
    print(f"fit_activations: {message}", file=sys.stderr)


def run_defaults(train_kwargs: dict, steps: int, rows_per_epoch: int) -> None:
    """Fill the warm-up and AuxK defaults that sparsify sizes for long LM runs.

    sparsify warms Adam up over 1000 steps and counts a latent dead after 10M tokens: a
    run on cached rows is often shorter than either, so it would end inside the
    warm-up, and AuxK would never see a dead latent. Only options the caller left out
    are set.
    """
    optimizer = train_kwargs.get("optimizer", "signum")  # sparsify's default
    if optimizer != "signum" and "lr_warmup_steps" not in train_kwargs:
        warmup = max(1, round(WARMUP_FRACTION * steps))
        train_kwargs["lr_warmup_steps"] = warmup
        _notice(f"lr_warmup_steps={warmup} ({WARMUP_FRACTION:.0%} of the {steps} steps; "
                "sparsify's default of 1000 is for long runs); pass lr_warmup_steps to change it")
    alpha = train_kwargs.get("auxk_alpha", 0)
    # A bad alpha is left to the config checks, which name it in one line.
    if isinstance(alpha, (int, float)) and alpha > 0 and "dead_feature_threshold" not in train_kwargs:
        threshold = max(1, round(DEAD_FRACTION * rows_per_epoch))
        train_kwargs["dead_feature_threshold"] = threshold
        _notice(f"dead_feature_threshold={threshold} rows ({DEAD_FRACTION:.0%} of an epoch; "
                "sparsify's 10M tokens would never count a latent dead here); pass it to change it")


def as_prefix_coder(coder: SparseCoder) -> MatryoshkaSparseCoder:
    """``coder`` as a ``MatryoshkaSparseCoder``: the same object if it is one, else a copy.

    A plain sparsify coder becomes one with ``matryoshka=False``: the same weights and
    outputs, plus ``prefix_fvu`` and ``nested_sizes`` (the full width).
    """
    if isinstance(coder, MatryoshkaSparseCoder):
        return coder
    cfg = MatryoshkaSparseCoderConfig(**asdict(coder.cfg))
    twin = MatryoshkaSparseCoder(coder.d_in, cfg, coder.device, coder.dtype, decoder=coder.W_dec is not None)
    twin.load_state_dict(coder.state_dict())
    return twin
