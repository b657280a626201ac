"""``matryoshka-clt train`` under ``torchrun`` on the CPU (gloo), against one process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from matryoshka_plugin.clt.cache import MANIFEST, cache_activations
from test_distributed_sparsify import child_env, distance, free_port
from tiny import random_model, tiny_config

SEED, SHARD, B, STEPS = 0, 256, 32, 6
TRAIN = ["--layers", "0", "1", "--num_latents", "32", "--k", "4", "--matryoshka", "true",
         "--nested_sizes", "8", "16", "--lr", "1e-3", "--lr_warmup_steps", "1",
         "--holdout_fraction", "0", "--max_steps", str(STEPS), "--seed", str(SEED), "--device", "cpu"]


def train(cache, save_dir, batch, nproc=1, *extra):
    cmd = ["-m", "matryoshka_plugin.cli.clt", "train", "--cache", str(cache), "--save_dir",
           str(save_dir), "--batch_size", str(batch), *TRAIN, *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *cmd]
    proc = subprocess.run([sys.executable, *cmd], env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: v for k, v in load_file(Path(save_dir) / "clt" / "clt.safetensors").items()}


def epoch_order(n: int) -> torch.Tensor:
    """The rows a lone ``train_clt`` visits in epoch 0 with no holdout, in order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    return order[torch.randperm(n, generator=torch.Generator().manual_seed(SEED * 1_000_003))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model = random_model(tiny_config("llama", 64, d_model=16, n_layers=2))
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: torch.randint(4, 64, (8, 17), generator=g), None)
    return cache_activations(model, batches, [0, 1], root / "c", n_tokens=2 * SHARD, show_progress=False)


def cache_of_rows(cache: Path, out: Path, index: torch.Tensor) -> Path:
    """A copy of ``cache`` whose row ``i`` is its row ``index[i]``."""
    out.mkdir()
    for f in cache.glob("*.safetensors"):
        save_file({k: v[index].contiguous() for k, v in load_file(f).items()}, out / f.name)
    manifest = json.loads((cache / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "n_tokens": len(index)}))
    return out


@pytest.fixture(scope="module")
def dp(cache, tmp_path_factory):
    return train(cache, tmp_path_factory.mktemp("dp"), B, 2)


def test_clt_data_parallel_equals_one_process_with_twice_the_batch(tmp_path, cache, dp):
    # Rank r trains on rows [r * SHARD, (r + 1) * SHARD) in the order a lone run gives a
    # shard that size. Lay the cache out so one process with batch 2B visits, at every
    # step, rank 0's batch and then rank 1's.
    local, lone = epoch_order(SHARD), epoch_order(2 * SHARD)
    dp_rows = torch.stack([local.view(-1, B), local.view(-1, B) + SHARD], 1).reshape(-1)
    index = torch.empty(2 * SHARD, dtype=torch.long)
    index[lone] = dp_rows
    big = train(cache_of_rows(cache, tmp_path / "both", index), tmp_path / "big", 2 * B)
    # Rank 0 alone on its rows: what it would train without averaged gradients.
    own = train(cache_of_rows(cache, tmp_path / "shard0", torch.arange(SHARD)), tmp_path / "own", B)
    # Not equal to the last bit: each rank's FVU divides by its own batch's variance.
    assert distance(dp, big) < 0.25 * distance(own, big)


def test_clt_data_parallel_resume_continues_exactly(tmp_path, cache, dp):
    train(cache, tmp_path / "r", B, 2, "--max_steps", str(STEPS // 2))
    resumed = train(cache, tmp_path / "r", B, 2, "--resume", "true")
    for name in dp:
        torch.testing.assert_close(resumed[name], dp[name], rtol=0, atol=0)
