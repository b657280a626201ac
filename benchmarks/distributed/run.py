"""Data-parallel ``sparsify-matryoshka`` on the CPU: tokens/s with 1 and 2 processes.

Trains one Matryoshka coder on a small random GPT-2 over random tokens, alone with
batch B and under ``torchrun --nproc_per_node 2`` with batch B per rank (gloo), and
reports the training loop's tokens/s of each, their ratio, and the communication share
of a 2-process step, estimated as 1 - (step time alone) / (step time on 2 ranks):
both do the same per-rank work, so the difference is gradient all-reduce and waiting.
Writes ``results.md`` here.

    .venv/bin/python -m benchmarks.distributed.run [--steps 40] [--batch 8]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPO, command_line, machine_description, scratch_dir, utc_timestamp, write_markdown

HERE = Path(__file__).resolve().parent


def tiny_gpt2(root: Path, d_model: int, vocab: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=d_model, n_layer=2, n_head=4)
    path = root / f"gpt2-d{d_model}"
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(nproc: int, cli_args: list[str], out: Path) -> dict:
    """The training loop's seconds and steps of one run."""
    script = ["-m", "benchmarks.distributed.timed_fit", str(out), *cli_args]
    if nproc > 1:
        script = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_port", str(free_port()), *script]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *script], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each run")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step (B)")
    p.add_argument("--ctx", type=int, default=64, help="tokens per sequence")
    p.add_argument("--d_model", type=int, default=128, help="the random GPT-2's width")
    p.add_argument("--latents", type=int, default=2048, help="the coder's width")
    a = p.parse_args(argv)

    root = scratch_dir("distributed")
    model = tiny_gpt2(root, a.d_model, vocab=512)
    n_rows = 2 * a.steps * a.batch
    data = root / f"tokens-{n_rows}x{a.ctx}.bin"
    np.random.default_rng(0).integers(0, 512, (n_rows, a.ctx), dtype=np.uint16).tofile(data)

    def args(batch: int, rows: int, save: str) -> list[str]:
        return [str(model), str(data), "--ctx_len", str(a.ctx), "--batch_size", str(batch),
                "--max_examples", str(rows), "--hookpoints", "h.0.mlp", "--matryoshka", "true",
                "--num_latents", str(a.latents), "--k", "32", "--device", "cpu",
                "--optimizer", "adam", "--log_to_wandb", "false", "--save_every", "100000",
                "--save_dir", str(root / save), "--run_name", "r"]

    half = a.steps * a.batch  # rows that give `steps` steps of batch B to one process
    alone = timed(1, args(a.batch, half, "alone"), root / "alone.json")
    two = timed(2, args(a.batch, 2 * half, "two"), root / "two.json")
    tokens = a.batch * a.ctx
    tps_1 = alone["steps"] * tokens / alone["fit_s"]
    tps_2 = two["steps"] * 2 * tokens / two["fit_s"]
    step_1, step_2 = alone["fit_s"] / alone["steps"], two["fit_s"] / two["steps"]
    lines = [
        "# Data-parallel sparsify-matryoshka on the CPU (gloo)",
        "",
        f"- command: `{command_line('benchmarks.distributed.run', argv)}`",
        f"- date: {utc_timestamp()}",
        f"- machine: {machine_description()}",
        f"- run: random GPT-2 (d_model {a.d_model}, 2 layers), one Matryoshka coder on h.0.mlp "
        f"({a.latents} latents, k 32, Adam), batch {a.batch} x {a.ctx} tokens per rank, {a.steps} steps; "
        "every process one thread (OMP_NUM_THREADS=1, as torchrun sets), so 2 processes use 2 cores",
        "",
        "| processes | steps | training loop s | s/step | tokens/s |",
        "|---|---|---|---|---|",
        f"| 1 | {alone['steps']} | {alone['fit_s']:.2f} | {step_1:.3f} | {tps_1:,.0f} |",
        f"| 2 | {two['steps']} | {two['fit_s']:.2f} | {step_2:.3f} | {tps_2:,.0f} |",
        "",
        f"- tokens/s ratio, 2 processes / 1: **{tps_2 / tps_1:.2f}**",
        f"- communication share of a 2-process step, 1 - (s/step alone) / (s/step on 2 ranks): "
        f"**{max(0.0, 1 - step_1 / step_2):.0%}** (an estimate: it also holds any slowdown from "
        "two processes sharing the machine's cores and memory bandwidth)",
    ]
    write_markdown(lines, HERE / "results.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
