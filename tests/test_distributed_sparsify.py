"""``sparsify-matryoshka`` under ``torchrun`` on the CPU (gloo), against one process.

Every run is a subprocess: ``torchrun`` (``python -m torch.distributed.run``), or for a
crash the ranks started by hand with the environment torchrun would give them. The
ranks record what they saw in ``dist_scripts/sparsify_recording.py``.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_scripts" / "sparsify_recording.py"
CTX = 16
HOOK = "h.0.mlp"
TIMEOUT = 240
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_args(model, data, save_dir, *extra):
    return [
        str(model), str(data), "--ctx_len", str(CTX), "--log_to_wandb", "false",
        "--data_preprocessing_num_proc", "1", "--num_latents", "32", "--k", "4",
        "--device", "cpu", "--optimizer", "adam", "--lr_warmup_steps", "1",
        "--save_dir", str(save_dir), "--run_name", "r", "--dist_timeout", "60", *extra,
    ]


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def torchrun(args, record, *, nproc=2, launcher=None):
    launcher = launcher or ["--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(SCRIPT), str(record), "0", *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)


def alone(args, record):
    cmd = [sys.executable, str(SCRIPT), str(record), "0", *args]
    return check(subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT))


def ranks_by_hand(args, record, *, crash_after_save=0, world=2):
    """Each rank started as torchrun starts it; their (exit code, stderr)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(record), str(crash_after_save), *args],
            env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for r in range(world)
    ]
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def record(path, rank=0):
    return json.loads((Path(path) / f"rank{rank}.json").read_text())


def weights(save_dir, hook=HOOK):
    return load_file(Path(save_dir) / "r" / hook / "sae.safetensors")


def global_step(save_dir):
    return torch.load(Path(save_dir) / "r" / "state.pt", weights_only=True)["global_step"]


def write_memmap(path, rows):
    np.asarray(rows, dtype=np.uint16).tofile(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), "gpt2")


@pytest.fixture(scope="module")
def rows():
    """16 random sequences of CTX tokens (the tiny tokenizer has 96 ids)."""
    return np.random.default_rng(0).integers(2, 96, size=(16, CTX))


def distance(a, b) -> float:
    return float(sum((a[n] - b[n]).pow(2).sum() for n in a) ** 0.5)


# Level decoders and the bias level: DDP (without find_unused_parameters, as sparsify
# wraps) fails the second step if a step leaves a parameter without a gradient.
MATRYOSHKA = ["--matryoshka", "true", "--nested_sizes", "8", "16", "--nested_decoders", "true",
              "--bias_level", "true", "--hookpoints", HOOK]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, model_dir, rows):
    """A torchrun run on two ranks, batch 2 each, over ``rows``: (data, save_dir)."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_memmap(root / "a.bin", rows)
    args = run_args(model_dir, data, root / "dp", "--batch_size", "2", *MATRYOSHKA)
    check(torchrun(args, root / "record"))
    return data, root


def test_ddp_equals_one_process_with_twice_the_batch(tmp_path, model_dir, rows, ddp_run):
    data, root = ddp_run
    # sparsify gives rank r the contiguous rows [8r, 8r + 8); one process with a batch of
    # 4 sees at each step the rows of both ranks' batches of 2 when they are interleaved.
    both = rows.reshape(2, 4, 2, CTX).transpose(1, 0, 2, 3).reshape(16, CTX)
    merged = write_memmap(tmp_path / "b.bin", both)
    rank0_rows = write_memmap(tmp_path / "c.bin", rows[:8])
    alone(run_args(model_dir, merged, tmp_path / "big", "--batch_size", "4", *MATRYOSHKA), tmp_path / "rbig")
    alone(run_args(model_dir, data, tmp_path / "small", "--batch_size", "2", *MATRYOSHKA), tmp_path / "rsmall")
    alone(run_args(model_dir, rank0_rows, tmp_path / "own", "--batch_size", "2", *MATRYOSHKA), tmp_path / "rown")

    # Not equal to the last bit: each rank's FVU divides by its own batch's variance
    # (sparsify's loss), one process by that of both batches together.
    dp_losses = np.mean([record(root / "record", r)["losses"] for r in (0, 1)], axis=0)
    np.testing.assert_allclose(dp_losses, record(tmp_path / "rbig")["losses"], rtol=3e-2)
    dp, big = weights(root / "dp"), weights(tmp_path / "big")
    # Far closer to it than rank 0 trained on its own rows is (gradients not averaged).
    assert distance(dp, big) < 0.25 * distance(weights(tmp_path / "own"), big)
    assert global_step(root / "dp") == 4 and global_step(tmp_path / "small") == 8


def test_two_nodes_through_a_rendezvous_endpoint_train_as_two_local_ranks(tmp_path, model_dir, ddp_run):
    data, root = ddp_run
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(SCRIPT), str(tmp_path / "rec"), "0",
           *run_args(model_dir, data, tmp_path / "nodes", "--batch_size", "2", *MATRYOSHKA)]
    nodes = [subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for node in nodes:
        err = node.communicate(timeout=TIMEOUT)[1]
        assert node.returncode == 0, err[-3000:]
    got, want = weights(tmp_path / "nodes"), weights(root / "dp")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_distribute_modules_trains_each_coder_as_one_process_does(tmp_path, model_dir, rows):
    data = write_memmap(tmp_path / "a.bin", rows)
    both = rows.reshape(2, 4, 2, CTX).transpose(1, 0, 2, 3).reshape(16, CTX)
    merged = write_memmap(tmp_path / "b.bin", both)
    hooks = ["--matryoshka", "true", "--nested_sizes", "8", "16", "--hookpoints", "h.0.mlp", "h.1.mlp"]
    # Each rank's coder trains on both ranks' batches (sparsify all-gathers them).
    check(torchrun(run_args(model_dir, data, tmp_path / "dm", "--batch_size", "2",
                            "--distribute_modules", "true", *hooks), tmp_path / "rdm"))
    alone(run_args(model_dir, merged, tmp_path / "one", "--batch_size", "4", *hooks), tmp_path / "rone")
    for hook in ("h.0.mlp", "h.1.mlp"):
        got, want = weights(tmp_path / "dm", hook), weights(tmp_path / "one", hook)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_sampled_prefixes_and_batch_topk_agree_on_every_rank_through_a_crash(tmp_path, model_dir):
    data = write_memmap(tmp_path / "a.bin", np.random.default_rng(1).integers(2, 96, size=(32, CTX)))
    sampled = ["--matryoshka", "true", "--prefix_schedule", "pareto", "--num_prefixes", "3",
               "--min_prefix", "2", "--batch_topk", "true", "--hookpoints", HOOK, "--save_every", "2",
               "--batch_size", "2"]
    check(torchrun(run_args(model_dir, data, tmp_path / "full", *sampled), tmp_path / "rfull"))
    full = [record(tmp_path / "rfull", r) for r in (0, 1)]
    assert len(full[0]["sizes"]) == 8 and len({tuple(s) for s in full[0]["sizes"]}) > 1
    assert full[0]["sizes"] == full[1]["sizes"]
    # Averaged after every step, so each save sees one threshold on every rank.
    assert full[0]["thresholds"] == full[1]["thresholds"]
    assert all(t[HOOK] > 0 for t in full[0]["thresholds"])

    # Rank 1 dies right after the first checkpoint; rank 0 stops at its next collective.
    args = run_args(model_dir, data, tmp_path / "crash", *sampled)
    (code0, err0), (code1, _) = ranks_by_hand(args, tmp_path / "rcrash", crash_after_save=1)
    assert code1 == -signal.SIGKILL and code0 == 2
    # tqdm redraws its bar with "\r", so the error may share a "line" with it.
    errors = [line for line in re.split(r"[\r\n]", err0) if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err0, err0[-2000:]
    assert "sparsify-matryoshka: error: rank 0 of 2: " in errors[0] and "--resume" in errors[0]

    step = global_step(tmp_path / "crash")
    resumed = ranks_by_hand([*args, "--resume", "true"], tmp_path / "rresumed")
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-2000:]
    for r in (0, 1):  # the sampler goes on where the checkpoint left it, on every rank
        assert record(tmp_path / "rresumed", r)["sizes"] == full[0]["sizes"][step:]
    got, want = weights(tmp_path / "crash"), weights(tmp_path / "full")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_bad_dist_timeout_is_one_line_before_any_model_load(tmp_path, capsys):
    from matryoshka_plugin.cli.sparsify import main

    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tmp_path / "no-model", tmp_path / "no.bin", tmp_path / "ck", "--dist_timeout", "0"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsify-matryoshka: error: --dist_timeout 0.0: must be a positive number of seconds"]
    assert not (tmp_path / "ck").exists()


def test_distribute_modules_resumes_matryoshka_coders_after_a_crash(tmp_path, model_dir):
    # Each rank holds other coders; their sampler states live in one file per rank, and
    # the checkpoint is staged for all ranks and swapped in whole.
    data = write_memmap(tmp_path / "a.bin", np.random.default_rng(2).integers(2, 96, size=(32, CTX)))
    hooks = ["--matryoshka", "true", "--prefix_schedule", "pareto", "--num_prefixes", "3",
             "--min_prefix", "2", "--hookpoints", "h.0.mlp", "h.1.mlp", "--distribute_modules", "true",
             "--save_every", "2", "--batch_size", "2"]
    check(torchrun(run_args(model_dir, data, tmp_path / "full", *hooks), tmp_path / "rfull"))
    run = tmp_path / "full" / "r"
    assert sorted(p.name for p in run.glob("matryoshka_state*.pt")) == [
        "matryoshka_state_rank_0.pt", "matryoshka_state_rank_1.pt"]
    assert not list(tmp_path.glob("full/.r.*.tmp"))  # no staging left behind

    args = run_args(model_dir, data, tmp_path / "crash", *hooks)
    (code0, _), (code1, _) = ranks_by_hand(args, tmp_path / "rcrash", crash_after_save=1)
    assert code1 == -signal.SIGKILL and code0 == 2
    resumed = ranks_by_hand([*args, "--resume", "true"], tmp_path / "rresumed")
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-2000:]
    for hook in ("h.0.mlp", "h.1.mlp"):
        got, want = weights(tmp_path / "crash", hook), weights(tmp_path / "full", hook)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path, model_dir):
    # Data-parallel checkpoints are rank 0's alone (its coders equal every rank's), so a
    # different number of ranks can go on from them, as upstream allows.
    data = write_memmap(tmp_path / "a.bin", np.random.default_rng(3).integers(2, 96, size=(32, CTX)))
    args = run_args(model_dir, data, tmp_path / "crash", *MATRYOSHKA, "--save_every", "2", "--batch_size", "2")
    (_, _), (code1, _) = ranks_by_hand(args, tmp_path / "rcrash", crash_after_save=1)
    assert code1 == -signal.SIGKILL
    step = global_step(tmp_path / "crash")
    alone([*args, "--resume", "true"], tmp_path / "ralone")
    assert global_step(tmp_path / "crash") > step
