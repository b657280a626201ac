"""One side of the sparsify parity check; the pytest file runs it twice.

    python sparsify_side.py --side plugin  OUT   # plugin venv: stock sparsify + plugin
    python sparsify_side.py --side patched OUT [--other PLUGIN_OUT]   # patched sparsify

Both sides build the same coders from the same seeds and write, per case, the losses,
outputs and gradients of a few training steps to ``OUT/<case>.safetensors``, the coder
checkpoint to ``OUT/<case>/coder``, and a short ``Trainer.fit`` run on a tiny random
GPT-2 to ``OUT/train-<case>``. With ``--other``, the patched side also loads the
plugin's coder checkpoints with stock-API ``SparseCoder.load_from_disk`` and records
their eval outputs. The two sides never import each other's ``sparsify``.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

D_IN = 16
N_TOKENS = 64
N_STEPS = 3
LR = 0.05

# Matryoshka options (shared field names); matryoshka=True is added to each.
CASES: dict[str, dict] = {
    "default_groups": dict(num_latents=64, k=8),
    "sizes_weights_bias_skip": dict(
        num_latents=48, k=6, nested_sizes=[6, 24], level_weights=[1.0, 2.0, 3.0, 4.0],
        bias_level=True, skip_connection=True,
    ),
    "stop_gradient_transcoder": dict(
        num_latents=32, k=4, nested_sizes=[8, 16], stop_gradient=True, transcode=True
    ),
    "pareto": dict(num_latents=64, k=8, prefix_schedule="pareto", num_prefixes=5, prefix_seed=3),
    "uniform_multi_topk": dict(num_latents=64, k=4, prefix_schedule="uniform", multi_topk=True),
    "nested_decoders": dict(num_latents=48, k=6, nested_sizes=[12, 24], nested_decoders=True),
    "batch_topk": dict(num_latents=64, k=4, nested_sizes=[16], batch_topk=True),
    # The sizes move before steps 2 and 3 (of the coder run) and every step in training.
    "adaptive": dict(num_latents=64, k=8, nested_sizes=[8, 24], prefix_schedule="adaptive", adaptive_every=1),
    # Reordered once at the end of the coder run, and before every training step after the first.
    "permute": dict(num_latents=64, k=8, nested_sizes=[8, 24], permute_every=1),
}
# Cases also trained end to end through sparsify's Trainer.
TRAIN_CASES = ["pareto", "nested_decoders", "sizes_weights_bias_skip", "adaptive", "permute"]


def classes(side: str):
    if side == "plugin":
        from matryoshka_plugin.adapters.sparsify import (
            MatryoshkaSparseCoder,
            MatryoshkaSparseCoderConfig,
            MatryoshkaTrainConfig,
            MatryoshkaTrainer,
        )

        return MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, MatryoshkaTrainConfig, MatryoshkaTrainer
    from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer

    return SparseCoder, SparseCoderConfig, TrainConfig, Trainer


def data(cfg_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TOKENS, D_IN, generator=g)
    if not cfg_kwargs.get("transcode"):
        return x, None
    mix = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5
    return x, torch.tanh(x @ mix)


def run_case(name: str, kwargs: dict, side: str, out: Path) -> None:
    Coder, Config, _, _ = classes(side)
    torch.manual_seed(0)
    coder = Coder(D_IN, Config(matryoshka=True, **kwargs))
    x, y = data(kwargs)
    # a few dead latents exercise the AuxK path
    dead = torch.zeros(coder.num_latents, dtype=torch.bool)
    dead[-coder.num_latents // 4 :] = True
    record: dict[str, torch.Tensor] = {}
    params = dict(coder.named_parameters())
    for step in range(N_STEPS):
        coder.train()
        result = coder(x, y, dead_mask=dead)
        loss = result.fvu + result.auxk_loss + result.multi_topk_fvu / 8
        loss.backward()
        record[f"{step}.fvu"] = result.fvu.detach()
        record[f"{step}.auxk_loss"] = result.auxk_loss.detach()
        record[f"{step}.multi_topk_fvu"] = result.multi_topk_fvu.detach()
        record[f"{step}.sae_out"] = result.sae_out.detach()
        record[f"{step}.latent_acts"] = result.latent_acts.detach()
        record[f"{step}.latent_indices"] = result.latent_indices.detach()
        for pname, p in params.items():
            if p.grad is not None:
                record[f"{step}.grad.{pname}"] = p.grad.detach().clone()
        coder.remove_gradient_parallel_to_decoder_directions()
        with torch.no_grad():
            for pname, p in params.items():
                if p.grad is not None:
                    record[f"{step}.grad_projected.{pname}"] = p.grad.clone()
                    p -= LR * p.grad
                    p.grad = None
        coder.set_decoder_norm_to_unit_norm()
    if kwargs.get("permute_every"):
        record["permutation"] = coder.permute_by_mass()
    for pname, p in params.items():
        record[f"param.{pname}"] = p.detach().clone()
    record["nested_sizes"] = torch.tensor(coder.nested_sizes)
    record["sampler_state"] = coder.sampler.generator.get_state()
    record["batch_topk_threshold"] = coder.batch_topk_threshold.detach().clone()
    coder.eval()
    with torch.no_grad():
        result = coder(x, y)
    record["eval.sae_out"] = result.sae_out
    record["eval.fvu"] = result.fvu
    save_file({k: v.contiguous() for k, v in record.items()}, str(out / f"{name}.safetensors"))
    coder.save_to_disk(out / name / "coder")


def load_other(name: str, kwargs: dict, other: Path, out: Path) -> None:
    """Load the other side's checkpoint with the stock-API loader and run it in eval."""
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(other / name / "coder").eval()
    x, y = data(kwargs)
    with torch.no_grad():
        result = coder(x, y)
    save_file(
        {
            "eval.sae_out": result.sae_out.contiguous(),
            "eval.fvu": result.fvu,
            # eval mode ignores the levels, so the adaptive case's restored sizes need their own check
            "nested_sizes": torch.tensor(coder.nested_sizes),
        },
        str(out / f"{name}.loaded.safetensors"),
    )


def train_case(name: str, kwargs: dict, side: str, out: Path) -> None:
    from datasets import Dataset
    from transformers import GPT2Config, GPT2Model

    _, Config, TrainConfig, Trainer = classes(side)
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=D_IN, n_head=2, n_positions=16, vocab_size=64))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (8, 16), generator=g)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cfg = TrainConfig(
        Config(matryoshka=True, **kwargs),
        batch_size=2,
        optimizer="adam",
        lr=3e-3,
        lr_warmup_steps=1,
        hookpoints=["h.0", "h.1"],
        save_every=3,
        log_to_wandb=False,
        save_dir=str(out / f"train-{name}"),
        run_name="run",
    )
    Trainer(cfg, dataset, model).fit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["plugin", "patched"], required=True)
    parser.add_argument("out", type=Path)
    parser.add_argument("--other", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # same reduction order in both processes
    for name, kwargs in CASES.items():
        run_case(name, kwargs, args.side, args.out)
        if args.other is not None:
            load_other(name, kwargs, args.other, args.out)
    for name in TRAIN_CASES:
        train_case(name, CASES[name], args.side, args.out)
    (args.out / "cases.json").write_text(json.dumps({"cases": list(CASES), "train": TRAIN_CASES}))


if __name__ == "__main__":
    main()
