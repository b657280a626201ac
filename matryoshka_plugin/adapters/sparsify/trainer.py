"""sparsify's ``Trainer``, building Matryoshka coders and saving their extra state.

``MatryoshkaTrainer`` builds ``MatryoshkaSparseCoder`` when ``cfg.sae`` asks for a
plugin feature, writes each checkpoint whole into a temporary sibling before swapping
it in, saves and restores the coders' prefix sampler and BatchTopK threshold, and
mends two resume quirks of upstream (a replayed batch, the ScheduleFree point, k decay).
"""

import pickle
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import patch

import sparsify.trainer
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, TrainConfig, Trainer

from ...atomic import atomic_dir, commit_dir, link_missing, recover_dir, remove_stale, staging_dir
from ...core.errors import CheckpointError, MatryoshkaConfigError, MatryoshkaError
from ...core.plain_state import load_plain_state
from .coder import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, coder_class
from .run_config import (
    check_dataset_length,
    check_model_targets,
    check_train_config,
    check_weights_fit,
    checked_post_init,
)

MATRYOSHKA_STATE_FILE = "matryoshka_state.pt"
"""Checkpoint file beside sparsify's ``state.pt``: each coder's sampler and threshold."""


@dataclass
class MatryoshkaTrainConfig(TrainConfig):
    """sparsify's ``TrainConfig`` whose ``sae`` section accepts the Matryoshka options."""

    sae: MatryoshkaSparseCoderConfig = field(default_factory=MatryoshkaSparseCoderConfig)

    def __post_init__(self):
        checked_post_init(super().__post_init__)
        check_train_config(self)


@contextmanager
def building_coders(coder_cls: type[SparseCoder]):
    """Make sparsify's ``Trainer.__init__`` build ``coder_cls`` (it hard-codes the class)."""
    with patch.object(sparsify.trainer, "SparseCoder", coder_cls):
        yield


class _StopForward(Exception):
    """Raised after the last hookpoint of a forward pass: nothing later is needed."""


class MatryoshkaTrainer(Trainer):
    """sparsify's ``Trainer``; builds plugin coders when ``cfg.sae`` asks for them."""

    stop_after_last_hookpoint: bool = True
    """With ``loss_fn: fvu``, end the model's forward once every hookpoint has run."""

    def __init__(self, cfg: TrainConfig, dataset, model):
        check_model_targets(cfg, model)
        check_dataset_length(cfg, dataset)
        with building_coders(coder_class(cfg.sae)):
            super().__init__(cfg, dataset, model)
        if cfg.finetune and not getattr(cfg, "resume", False):  # upstream loads these next
            check_weights_fit(self.saes, cfg.finetune, f"finetune {cfg.finetune}")
        # sparsify saves mid-step, after the optimiser step and before `global_step`
        # counts it, so its state.pt is one batch behind and a resume replays a batch.
        # Remember at which global_step the optimiser last stepped to tell the cases apart.
        self._stepped_at: int | None = None
        self._resume_k: int | None = None
        for opt in self.optimizers:
            base = getattr(opt, "base", opt)  # ScheduleFreeWrapper is not an Optimizer
            base.register_step_post_hook(self._note_optimizer_step)
        if getattr(cfg.sae, "permute_every", 0):
            if dist.is_initialized():
                raise MatryoshkaConfigError(
                    f"permute_every={cfg.sae.permute_every} runs in a single process only: "
                    "each rank would reorder its latents by its own batches"
                )

    def fit(self):
        # Reorders run before the model's forward, not in the optimizer-step hook: after
        # that hook sparsify still zeroes the dead-latent counters of the latents that
        # fired in the step, indexed in the order before any reorder.
        permuting = bool(getattr(self.cfg.sae, "permute_every", 0))
        handle = self.model.register_forward_pre_hook(self._permute_if_due) if permuting else None
        try:
            with self._forward_up_to_last_hookpoint():
                super().fit()
        finally:
            if handle is not None:
                handle.remove()

    @contextmanager
    def _forward_up_to_last_hookpoint(self):
        """For the span of ``fit()``, make this model's forward stop after the last
        hookpoint runs, when the loss (``fvu``) needs nothing computed after it.

        sparsify's hooks train each coder (local backward) as the forward reaches its
        hookpoint; the later layers, the final norm and the unembedding only cost
        time. A forward hook on every hookpoint, added after sparsify's own in each
        call so it runs last, raises once all of them have run, and the wrapped
        forward swallows it: each coder sees the same inputs as in a full forward.
        """
        if not self.stop_after_last_hookpoint or self.cfg.loss_fn != "fvu":
            yield
            return
        model = self.model
        modules = {id(m): m for m in map(model.base_model.get_submodule, self.cfg.hookpoints)}
        own = model.__dict__.get("forward")  # e.g. accelerate's dispatch wrapper
        inner = model.forward

        def forward(*args, **kwargs):
            seen = set()

            def note(module, _inputs, _outputs):
                seen.add(id(module))
                if len(seen) == len(modules):
                    raise _StopForward

            handles = [m.register_forward_hook(note) for m in modules.values()]
            try:
                return inner(*args, **kwargs)
            except _StopForward:
                return None  # sparsify ignores the fvu forward's output
            finally:
                for h in handles:
                    h.remove()

        model.forward = forward
        try:
            yield
        finally:
            if own is None:
                del model.forward
            else:
                model.forward = own

    def _note_optimizer_step(self, *_):
        self._stepped_at = self.global_step

    def _permute_if_due(self, *_):
        """Reorder every coder's latents once each ``permute_every`` optimizer steps,
        before the next batch; counted from ``global_step`` so a resumed run reorders
        at the same batches."""
        acc, every = self.cfg.grad_acc_steps, self.cfg.sae.permute_every
        done, partial = divmod(self.global_step, acc)
        if partial or not done or done % every:
            return
        for name, coder in self._matryoshka_coders().items():
            coder.permute_by_mass(self.optimizers, (self.num_tokens_since_fired[name],))

    def _matryoshka_coders(self, saes=None) -> dict[str, MatryoshkaSparseCoder]:
        saes = self.saes if saes is None else saes
        return {n: s for n, s in saes.items() if isinstance(s, MatryoshkaSparseCoder)}

    def _checkpoint(self, saes, path: str, rank_zero: bool):
        # sparsify writes each file in place, so a crash mid-save leaves a mix of two
        # steps. Here the whole checkpoint goes to a temporary sibling that replaces
        # `path` once complete. With distribute_modules every rank writes its own coders
        # into one directory: `save` stages that for all ranks together; the per-coder
        # `best/` saves, which ranks make at different times, stay in place there.
        if dist.is_initialized() and self.cfg.distribute_modules:
            self._write_checkpoint(saes, path, rank_zero)
            return
        target = recover_dir(path)
        remove_stale(target)
        with atomic_dir(target) as tmp:
            self._write_checkpoint(saes, str(tmp), rank_zero)
            # Keep what sat beside the old checkpoint (sparsify's best/), as in-place
            # writing would have.
            link_missing(target, tmp)

    def save(self):
        if not (dist.is_initialized() and self.cfg.distribute_modules):
            return super().save()
        # Every rank writes its coders into one staging directory that rank 0 made;
        # rank 0 swaps it in once all have written, so a crash leaves the old checkpoint.
        target = Path(self.cfg.save_dir) / (self.cfg.run_name or "unnamed")
        rank_zero = dist.get_rank() == 0
        staged = [None]
        if rank_zero:
            recover_dir(target)
            remove_stale(target)
            staged = [str(staging_dir(target))]
        dist.broadcast_object_list(staged, src=0)
        self._write_checkpoint(self.saes, staged[0], rank_zero)
        if not rank_zero:
            self._save_rank_optimizers(staged[0])
        dist.barrier()
        if rank_zero:
            link_missing(target, staged[0])
            commit_dir(staged[0], target)
        dist.barrier()

    def _rank_files(self, path: str) -> list[tuple[str, object]]:
        r = dist.get_rank()
        return [(f"{path}/optimizer_{i}_rank_{r}.pt", o) for i, o in enumerate(self.optimizers)] + [
            (f"{path}/lr_scheduler_{i}_rank_{r}.pt", s) for i, s in enumerate(self.lr_schedulers)
        ]

    def _save_rank_optimizers(self, path: str) -> None:
        """This rank's optimizer and scheduler states, which hold its own coders under
        distribute_modules: upstream saves rank 0's alone and loads them on every rank."""
        for opt in self.optimizers:
            if isinstance(opt, ScheduleFreeWrapper):
                opt.eval()  # saved as upstream saves rank 0's, in eval mode
        for file, obj in self._rank_files(path):
            torch.save(obj.state_dict(), file)
        for opt in self.optimizers:
            if isinstance(opt, ScheduleFreeWrapper):
                opt.train()

    def _write_checkpoint(self, saes, path: str, rank_zero: bool):
        mid_step = self._stepped_at is not None and self._stepped_at == self.global_step
        self.global_step += mid_step  # batches consumed, as resume counts them
        try:
            super()._checkpoint(saes, path, rank_zero)
        finally:
            self.global_step -= mid_step
        if coders := self._matryoshka_coders(saes):
            # With distribute_modules each rank holds other coders and writes into the
            # same directory: one file per rank, as upstream does for its own state.
            per_rank = dist.is_initialized() and self.cfg.distribute_modules
            # (Not rank_R_*_state.pt: upstream's load_state reads every file of that name.)
            name = per_rank_state_file(dist.get_rank()) if per_rank else MATRYOSHKA_STATE_FILE
            torch.save({n: c.matryoshka_state() for n, c in coders.items()}, f"{path}/{name}")

    def load_state(self, path: str):
        # A crash between the renames of a checkpoint swap leaves the complete
        # checkpoint under a sibling name; put it back first.
        recover_dir(path)
        self._check_resume_files(path)
        try:
            # Upstream reads every file with weights_only=True: no code runs.
            super().load_state(path)
        except (*_CORRUPT_FILE_ERRORS, KeyError, TypeError, SafetensorError) as e:
            if isinstance(e, MatryoshkaError):
                raise
            raise CheckpointError(
                f"cannot resume from {path}: a checkpoint file is corrupt or does not fit "
                f"this run ({_first_line(e)})"
            ) from None
        if dist.is_initialized() and self.cfg.distribute_modules and dist.get_rank():
            for file, obj in self._rank_files(path):
                obj.load_state_dict(load_plain_state(file, CheckpointError, map_location="cpu"))
        for opt in self.optimizers:
            if isinstance(opt, ScheduleFreeWrapper):
                # The saved weights are the averaged (eval) point x. sparsify loads
                # them into a wrapper already in train mode, so training would go on
                # from x instead of y; redo the x -> y swap that a live run does after
                # each save.
                opt.train_mode = False
                opt.train()
        if self.cfg.k_decay_steps and self.global_step:
            # A live run's step s uses the k computed after step s-1; fit() starts with
            # the k of step s itself, and the current k is not saved.
            self.global_step -= 1
            self._resume_k = super().get_current_k()
            self.global_step += 1
        single = Path(path) / MATRYOSHKA_STATE_FILE
        state_files = [single] if single.exists() else sorted(Path(path).glob(per_rank_state_file("*")))
        if (coders := self._matryoshka_coders()) and state_files:
            state = load_matryoshka_state(state_files, list(coders))
            state_file = Path(path) / MATRYOSHKA_STATE_FILE
            for name, coder in coders.items():
                try:
                    coder.load_matryoshka_state(state[name])
                except (KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise CheckpointError(
                        f"{state_file}: the state of {name!r} does not fit ({_first_line(e)})"
                    ) from None

    def _check_resume_files(self, path: str) -> None:
        """Name the first missing checkpoint file; check the weights' shapes from headers."""
        run = Path(path)
        needed = ["state.pt"]
        needed += [f"lr_scheduler_{i}.pt" for i in range(len(self.lr_schedulers))]
        needed += [f"optimizer_{i}.pt" for i in range(len(self.optimizers))]
        for name in needed:
            if not (run / name).is_file():
                raise CheckpointError(f"cannot resume: {run / name} not found")
        check_weights_fit(self.saes, run, "resume")

    def get_current_k(self) -> int:
        if (k := self._resume_k) is not None:  # once, for fit()'s first call after resume
            self._resume_k = None
            return k
        return super().get_current_k()


# What torch.load raises on a damaged file: a bad zip (RuntimeError), a short read
# (EOFError, struct.error), a pickle that weights_only refuses (UnpicklingError).
_CORRUPT_FILE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, struct.error)


def _first_line(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError):  # torch's message spans lines, with ANSI codes
        return "it holds objects other than tensors and plain data, which could run code; refused"
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def per_rank_state_file(rank) -> str:
    """The Matryoshka state file of one rank of a ``distribute_modules`` run."""
    return f"{Path(MATRYOSHKA_STATE_FILE).stem}_rank_{rank}.pt"


def load_matryoshka_state(files: list[Path], names: list[str]) -> dict:
    """The coders' Matryoshka state from ``matryoshka_state.pt`` (or, written by a
    ``distribute_modules`` run, one ``matryoshka_state_rank_R.pt`` per rank): tensors and
    plain data only, an entry per coder in ``names``.

    A crafted pickle in a checkpoint must not run code on resume (``core.plain_state``).
    """
    state = {}
    for file in files:
        part = load_plain_state(file, CheckpointError, map_location="cpu")
        if not isinstance(part, dict):
            raise CheckpointError(f"{file} holds {type(part).__name__}; it needs an entry for each coder {names}")
        state.update(part)
    if any(n not in state for n in names):
        where = files[0] if len(files) == 1 else files[0].parent / per_rank_state_file("*")
        raise CheckpointError(f"{where} holds {sorted(state)}; it needs an entry for each coder {names}")
    return state
