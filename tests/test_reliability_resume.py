"""Exact resume and determinism of Matryoshka training on CPU, through sparsify's Trainer.

A run is interrupted (an exception raised inside a step, right after a checkpoint) and
resumed from the checkpoint by a fresh trainer; its per-step losses must equal an
uninterrupted run's step for step, bit for bit. That covers everything the loss depends
on: weights, optimiser and LR-scheduler state, the prefix sampler's RNG, the BatchTopK
threshold and the dead-latent counters (AuxK is on, with a low dead threshold so the
counters matter).
"""

import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from sparsify import SparseCoder

from matryoshka_plugin.adapters.sparsify import (
    MatryoshkaSparseCoderConfig,
    MatryoshkaTrainer,
    load_coder,
)
from matryoshka_plugin.adapters.sparsify.coder import THRESHOLD_KEY
from matryoshka_plugin.adapters.sparsify.trainer import MATRYOSHKA_STATE_FILE
from matryoshka_plugin.atomic import atomic_dir, commit_dir, recover_dir, staging_dir
from matryoshka_plugin.fit import fit_activations

STEPS_BEFORE = 3  # checkpoint after this many steps, interrupt in the next
TOTAL_STEPS = 8


class Interrupt(Exception):
    pass


@contextmanager
def recorded_losses(stop_after: int | None = None):
    """Per-step (fvu, auxk) of every training coder call; raise after `stop_after` steps."""
    losses: list[tuple[float, float]] = []

    def hook(module, args, out):
        if isinstance(module, SparseCoder) and module.training:
            losses.append((out.fvu.item(), out.auxk_loss.item()))
            if stop_after is not None and len(losses) > stop_after:
                raise Interrupt

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield losses
    finally:
        handle.remove()


def _data():
    g = torch.Generator().manual_seed(1)
    # Low-rank plus noise: some latents die quickly, so AuxK and the counters matter.
    return torch.randn(512, 4, generator=g) @ torch.randn(4, 16, generator=g) + 0.1 * torch.randn(
        512, 16, generator=g
    )


def _train(save_dir, cfg, optimizer, *, resume=False, stop_after=None, **extra):
    kwargs = dict(**extra,
        batch_size=64, seq_len=16, epochs=1, seed=0, save_dir=save_dir, resume=resume,
        save_every=STEPS_BEFORE, optimizer=optimizer, lr=3e-3, auxk_alpha=1 / 32,
        dead_feature_threshold=128,
    )
    if optimizer == "adam":
        kwargs["lr_warmup_steps"] = 2
    with recorded_losses(stop_after) as losses:
        try:
            fit_activations(_data(), cfg, **kwargs)
        except Interrupt:
            pass
    return losses


CASES = {
    "fixed-adam": (dict(nested_sizes=[8, 16, 32]), "adam"),
    "pareto-adam": (dict(prefix_schedule="pareto", num_prefixes=4), "adam"),
    "batchtopk-adam": (dict(nested_sizes=[8, 32], batch_topk=True), "adam"),
    "fixed-signum": (dict(nested_sizes=[8, 16, 32]), "signum"),
    "pareto-batchtopk-signum": (dict(prefix_schedule="pareto", batch_topk=True), "signum"),
    # k decays from the width to 4 over the run; sparsify does not save the current k.
    "fixed-adam-k-decay": (dict(nested_sizes=[8, 16, 32]), "adam", dict(k_decay_steps=6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_losses_equal_an_uninterrupted_run_step_for_step(case, tmp_path):
    fields, optimizer, *extra = CASES[case]
    extra = extra[0] if extra else {}
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=32, k=4, **fields)
    full = _train(tmp_path / "full", cfg, optimizer, **extra)
    assert len(full) == TOTAL_STEPS
    if "k_decay_steps" not in extra:  # with k near the width early on, every latent fires
        assert any(auxk > 0 for _, auxk in full[STEPS_BEFORE:]), "no dead latents: counters untested"

    first = _train(tmp_path / "cut", cfg, optimizer, stop_after=STEPS_BEFORE, **extra)
    assert first[:STEPS_BEFORE] == full[:STEPS_BEFORE]
    saved = torch.load(tmp_path / "cut" / "fit" / "state.pt", weights_only=True)["global_step"]
    # sparsify's save_every=N saves when (batches done + 1) % N == 0, i.e. after N-1.
    assert saved == STEPS_BEFORE - 1
    resumed = _train(tmp_path / "cut", cfg, optimizer, resume=True, **extra)
    assert resumed == full[saved:]


def test_resume_without_the_matryoshka_state_diverges(tmp_path):
    """The sampler RNG really is part of the state: dropping it changes the losses."""
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=32, k=4, prefix_schedule="pareto", num_prefixes=4
    )
    full = _train(tmp_path / "full", cfg, "adam")
    _train(tmp_path / "cut", cfg, "adam", stop_after=STEPS_BEFORE)
    (tmp_path / "cut" / "fit" / MATRYOSHKA_STATE_FILE).unlink()
    resumed = _train(tmp_path / "cut", cfg, "adam", resume=True)
    assert len(resumed) == len(full[STEPS_BEFORE - 1:])
    assert resumed != full[STEPS_BEFORE - 1:]


def _checkpoint_bytes(run_dir: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    # The run config names its own save_dir; everything else must match byte for byte.
    config = json.loads(files["config.json"])
    config.pop("save_dir")
    files["config.json"] = json.dumps(config).encode()
    return files


def test_same_seed_data_and_config_give_bit_identical_checkpoints(tmp_path):
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=32, k=4, prefix_schedule="pareto", batch_topk=True
    )
    runs = []
    for name in ("a", "b"):
        _train(tmp_path / name, cfg, "signum")
        runs.append(_checkpoint_bytes(tmp_path / name / "fit"))
    assert {"site/sae.safetensors", "site/cfg.json", "optimizer_0.pt", MATRYOSHKA_STATE_FILE} <= set(runs[0])
    assert runs[0] == runs[1]
    # A different seed gives different weights, so equality above is not vacuous.
    fit_activations(_data(), cfg, batch_size=64, seq_len=16, seed=1, save_dir=tmp_path / "c",
                    optimizer="signum", lr=3e-3)
    other = _checkpoint_bytes(tmp_path / "c" / "fit")
    assert other["site/sae.safetensors"] != runs[0]["site/sae.safetensors"]


# -- the directory swap itself, including the fallback without renameat2 -----------


def _write(d: Path, step: int):
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    (d / "sub" / "weights").write_bytes(bytes([step]) * 64)


def _read(d: Path) -> int:
    step = json.loads((d / "state.json").read_text())["step"]
    assert (d / "sub" / "weights").read_bytes() == bytes([step]) * 64
    return step


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("crash_at", [0, 1, 2, 3])
def test_a_crash_at_any_rename_leaves_one_complete_directory(tmp_path, exchange, crash_at):
    target = tmp_path / "run"
    with atomic_dir(target) as tmp:
        _write(tmp, 1)
    tmp = staging_dir(target)
    _write(tmp, 2)
    calls = {"n": 0}
    real_rename = os.rename

    def crashing_rename(a, b):
        if calls["n"] == crash_at:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after runs
        calls["n"] += 1
        real_rename(a, b)

    with ExitStack() as stack:
        stack.enter_context(patch("matryoshka_plugin.atomic.os.rename", crashing_rename))
        if not exchange:
            stack.enter_context(patch("matryoshka_plugin.atomic._exchange", lambda a, b: False))
        try:
            commit_dir(tmp, target)
            finished = True
        except KeyboardInterrupt:
            finished = False
    recover_dir(target)
    step = _read(target)
    if exchange:
        assert finished  # one renameat2 call: there is no in-between state to crash in
    if finished:
        assert step == 2
    else:
        # renames: tmp -> ready, run -> old, ready -> run. Until run is moved aside it
        # is the old complete one; after, recovery takes the complete new one.
        assert step == (2 if crash_at == 2 else 1)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) or not finished


def test_load_coder_and_load_state_recover_a_checkpoint_left_mid_swap(tmp_path):
    from datasets import Dataset

    from matryoshka_plugin.adapters.sparsify import MatryoshkaTrainConfig
    from matryoshka_plugin.fit import ActivationReplay

    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=32, k=4, batch_topk=True)
    _train(tmp_path, cfg, "adam")
    run = tmp_path / "fit"
    threshold = json.loads((run / "site" / "cfg.json").read_text())[THRESHOLD_KEY]
    os.rename(run, tmp_path / ".fit.ready-deadbeef")  # as a crash between renames leaves it
    coder = load_coder(run / "site")
    assert float(coder.batch_topk_threshold) == threshold

    os.rename(run, tmp_path / ".fit.old-deadbeef")
    train_cfg = MatryoshkaTrainConfig(sae=cfg, batch_size=4, hookpoints=["site"],
                                      log_to_wandb=False, optimizer="adam")
    data = Dataset.from_dict({"input_ids": [[0] * 16] * 8}).with_format("torch")
    trainer = MatryoshkaTrainer(train_cfg, data, ActivationReplay(_data(), None))
    trainer.load_state(str(run))
    assert trainer.global_step == TOTAL_STEPS
    assert float(trainer.saes["site"].batch_topk_threshold) == threshold
