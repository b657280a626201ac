"""Trainer step time with the model's forward cut after the last hookpoint, by depth.

``MatryoshkaTrainer`` (``loss_fn: fvu``) ends the language model's forward once every
hookpoint has run. This times whole ``fit()`` runs of one residual-stream SAE at several
layers of a randomly initialised model shaped like SmolLM2-135M (30 layers, d=576,
vocabulary 49152; random weights cost the same as trained ones), with the cut and
without it (``stop_after_last_hookpoint = False``), interleaved.

Reproduce from the repository root (about 5 minutes on 2 CPU cores)::

    .venv/bin/python -m benchmarks.training_cost.stop_forward
"""

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoderConfig  # noqa: E402
from matryoshka_plugin.adapters.sparsify.trainer import (  # noqa: E402
    MatryoshkaTrainConfig,
    MatryoshkaTrainer,
)

from benchmarks.common import provenance, scratch_dir, write_json, write_markdown  # noqa: E402

HERE = Path(__file__).resolve().parent
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
)


def fit_seconds(model, layer: int, stop: bool, args) -> float:
    """Seconds per training step of one SAE at ``layers.{layer}`` (first step excluded)."""
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (args.batch * (args.steps + 1), args.seq_len))
    data = Dataset.from_dict({"input_ids": ids}).with_format("torch")
    cfg = MatryoshkaTrainConfig(
        sae=MatryoshkaSparseCoderConfig(num_latents=args.width, k=32, matryoshka=True),
        batch_size=args.batch, hookpoints=[f"layers.{layer}"], log_to_wandb=False,
        save_dir=str(scratch_dir("stop_forward")), save_every=10**9,
    )
    trainer = MatryoshkaTrainer(cfg, data, model)
    trainer.stop_after_last_hookpoint = stop
    times = []
    hook = trainer.saes[f"layers.{layer}"].register_forward_pre_hook(lambda *_: times.append(time.perf_counter()))
    trainer.fit()
    hook.remove()
    # A step runs from one coder call to the next; the last ends with fit().
    ends = times[1:] + [time.perf_counter()]
    steps = [e - s for s, e in zip(times, ends)][1:]
    return statistics.median(steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="0,7,15,29", help="hookpoint layers to time")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps per fit (after one warm-up step)")
    p.add_argument("--width", type=int, default=4096, help="SAE latents")
    p.add_argument("--reps", type=int, default=2, help="interleaved fits per (layer, cut) pair")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval().requires_grad_(False)
    rows = []
    for layer in map(int, args.layers.split(",")):
        t = {True: [], False: []}
        for r in range(args.reps):
            for stop in ((True, False) if r % 2 == 0 else (False, True)):
                t[stop].append(fit_seconds(model, layer, stop, args))
        full, cut = statistics.median(t[False]), statistics.median(t[True])
        rows.append({"layer": layer, "full_s": full, "cut_s": cut, "speedup": full / cut})
        print(rows[-1], flush=True)
    meta = {**provenance(__spec__.name, argv), "threads": torch.get_num_threads(), **vars(args)}
    meta["out"] = str(meta["out"])
    write_json({"meta": meta, "rows": rows}, args.out / "stop_forward.json")
    n_tokens = args.batch * args.seq_len
    lines = [
        f"### Forward cut after the last hookpoint (SmolLM2-135M shape, random weights, "
        f"residual SAE width {args.width}, k=32, 5 levels, {n_tokens} tokens a step)",
        "",
        f"{meta['date']}, {meta['machine']}, {meta['threads']} threads. Command: `{meta['command']}`",
        "",
        "| hookpoint | full forward s/step | cut s/step | speed-up |",
        "|---|---|---|---|",
        *(f"| layers.{r['layer']} | {r['full_s']:.2f} | {r['cut_s']:.2f} | {r['speedup']:.2f}x |" for r in rows),
    ]
    write_markdown(lines, args.out / "stop_forward.md")


if __name__ == "__main__":
    main()
