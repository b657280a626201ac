"""Crash safety: SIGKILL a training process at random moments while it checkpoints.

Each trial forks a worker from one already-imported process (a fresh interpreter costs
~30 s of imports here), lets it train with a checkpoint every step (so it spends most of
its time saving), kills it with SIGKILL after a random delay, and then checks that what
is on disk loads with ``load_coder``, stock ``SparseCoder.load_from_disk``, the plugin's
``MatryoshkaTrainer.load_state`` and stock ``Trainer.load_state``, and is not a mix of
two steps: the BatchTopK threshold in ``cfg.json`` equals the one in
``matryoshka_state.pt`` (it changes every step). The next trial resumes from it.

Run by hand for a longer sweep, or against upstream's in-place writing (control):

    .venv/bin/python tests/test_reliability_crash.py --trials 60 --seconds 240 [--in-place]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_NAME = "fit"
HOOK = "site"


def _setup():
    import torch

    # One intra-op thread: forking after OpenMP has started its pool can hang the child.
    torch.set_num_threads(1)
    from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoderConfig

    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=64, k=4, batch_topk=True, nested_sizes=[16, 32, 64]
    )
    return x, cfg


def _worker(save_dir: str, x, cfg) -> None:
    from matryoshka_plugin.fit import fit_activations

    fit_activations(
        x, cfg, batch_size=64, seq_len=16, epochs=40, save_dir=save_dir, run_name=RUN_NAME,
        resume=True, save_every=1, save_best=True, optimizer="adam", lr=1e-3,
    )


def _in_place_saving() -> None:
    """Upstream's behaviour, for the control sweep: every file written in place."""
    import json as _json

    from sparsify import SparseCoder

    from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoder, MatryoshkaTrainer
    from matryoshka_plugin.adapters.sparsify.coder import THRESHOLD_KEY

    def save_to_disk(self, path):
        SparseCoder.save_to_disk(self, path)
        cfg_path = Path(path) / "cfg.json"
        d = _json.loads(cfg_path.read_text())
        d[THRESHOLD_KEY] = float(self.batch_topk_threshold)
        cfg_path.write_text(_json.dumps(d))

    MatryoshkaSparseCoder.save_to_disk = save_to_disk
    MatryoshkaTrainer._checkpoint = MatryoshkaTrainer._write_checkpoint


def _check(save_dir: Path, x, cfg) -> dict:
    """What the kill left, and whether every loader accepts it."""
    import torch
    from datasets import Dataset
    from sparsify import SparseCoder, Trainer

    from matryoshka_plugin.adapters.sparsify import MatryoshkaTrainConfig, MatryoshkaTrainer, load_coder
    from matryoshka_plugin.adapters.sparsify.coder import THRESHOLD_KEY
    from matryoshka_plugin.adapters.sparsify.trainer import MATRYOSHKA_STATE_FILE
    from matryoshka_plugin.fit import ActivationReplay

    run_dir = save_dir / RUN_NAME
    names = sorted(p.name for p in save_dir.iterdir())
    found = {
        "run_dir": run_dir.is_dir(),
        "staging_left": sum(n.endswith(".tmp") for n in names)
        + (sum(1 for _ in run_dir.rglob("*.tmp")) if run_dir.is_dir() else 0),
        "mid_swap": not run_dir.exists() and any(n.startswith(f".{RUN_NAME}.") for n in names),
    }
    if not run_dir.exists() and not found["mid_swap"]:
        return {**found, "outcome": "no checkpoint yet"}
    try:
        train_cfg = lambda: MatryoshkaTrainConfig(  # noqa: E731
            sae=cfg, batch_size=4, hookpoints=[HOOK], save_dir=str(save_dir),
            run_name=RUN_NAME, log_to_wandb=False, optimizer="adam",
        )
        model = ActivationReplay(x, None)
        data = Dataset.from_dict({"input_ids": [[0] * 16] * 8}).with_format("torch")
        trainer = MatryoshkaTrainer(train_cfg(), data, model)
        trainer.load_state(str(run_dir))  # recovers a checkpoint left mid-swap
        coder = load_coder(run_dir / HOOK)
        SparseCoder.load_from_disk(run_dir / HOOK)
        Trainer(train_cfg(), data, model).load_state(str(run_dir))
        saved_threshold = json.loads((run_dir / HOOK / "cfg.json").read_text())[THRESHOLD_KEY]
        state = torch.load(run_dir / MATRYOSHKA_STATE_FILE, weights_only=False)
        mixed = float(state[HOOK][THRESHOLD_KEY]) != saved_threshold
        if float(coder.batch_topk_threshold) != saved_threshold:
            mixed = True
        # save_best with the fvu loss keeps a full checkpoint per hookpoint.
        if (best := run_dir / "best" / HOOK).exists():
            load_coder(best / HOOK)
            Trainer(train_cfg(), data, model).load_state(str(best))
        step = torch.load(run_dir / "state.pt", weights_only=True)["global_step"]
        return {**found, "outcome": "mixed" if mixed else "loads", "step": step}
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return {**found, "outcome": f"fails: {type(e).__name__}: {str(e)[:200]}"}


def sweep(trials: int, seconds: float, in_place: bool, seed: int) -> list[dict]:
    x, cfg = _setup()
    if in_place:
        _in_place_saving()
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = Path(tmp)
        for _ in range(trials):
            if time.monotonic() > deadline:
                break
            pid = os.fork()
            if pid == 0:  # the worker
                try:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1), os.dup2(devnull, 2)
                    _worker(str(save_dir), x, cfg)
                finally:
                    os._exit(0)
            # Trainer construction takes ~0.2-0.5 s; then a save every step.
            time.sleep(rng.uniform(0.2, 2.5))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            results.append(_check(save_dir, x, cfg))
    return results


def test_sigkill_during_checkpoints_always_leaves_a_loadable_checkpoint():
    proc = subprocess.run(
        [sys.executable, __file__, "--trials", "16", "--seconds", "30"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    outcomes = [r["outcome"] for r in results]
    assert len(results) >= 8, results
    assert all(o in ("loads", "no checkpoint yet") for o in outcomes), results
    # The kills must actually land in checkpoints, or this proves nothing.
    assert outcomes.count("loads") >= 5, results
    steps = [r["step"] for r in results if "step" in r]
    assert steps[-1] > steps[0], "each trial should resume and train further"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=25)
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-place", action="store_true", help="upstream's in-place saving (control)")
    a = ap.parse_args()
    res = sweep(a.trials, a.seconds, a.in_place, a.seed)
    print(json.dumps(res))
