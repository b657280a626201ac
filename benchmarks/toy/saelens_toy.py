"""Train SAELens' BatchTopK and MatryoshkaBatchTopK SAEs on the toy rows, with SAELens' own trainer.

Run by ``run.py`` with the separate SAELens environment's Python (``.venv-saelens``,
which cannot share the main venv: see benchmarks/RESULTS.md, "Training cost"), so this
file imports only torch, safetensors and sae_lens:

    .venv-saelens/bin/python benchmarks/toy/saelens_toy.py DATA.safetensors SPEC.json OUT_DIR

DATA holds ``x_train`` (the training rows), ``x_check`` (rows to check the evaluation
adapter against) and ``order_<seed>`` (each seed's row order, the one the plugin's
``fit_activations`` feeds sparsify). SPEC is a JSON object with ``runs`` (a list of
``{"name", "architecture", "seed"}``), ``width``, ``k``, ``matryoshka_widths``,
``batch_size``, ``epochs``, ``lr`` and ``lr_warmup_steps``.

Each run is trained by ``sae_lens.training.sae_trainer.SAETrainer`` itself (so its
coefficients, dead-neuron window, gradient clipping, Adam and LR scheduler are SAELens'
own), then saved as SAELens' inference model (BatchTopK SAEs become JumpReLU SAEs with the
learnt threshold, decoder norms folded into the encoder) and loaded back with
``SAE.load_from_disk``. OUT_DIR/<name>_seed<seed>.safetensors gets that inference SAE's
W_enc, b_enc, W_dec, b_dec, threshold, and its own ``encode``/``decode`` of ``x_check``
(``ref_acts``, ``ref_recon``) for the caller to check its adapter against;
OUT_DIR/meta.json gets the SAELens version, the configs and each run's training time.
"""

import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import sae_lens
import torch
from safetensors.torch import load_file, save_file
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


def batches(x: torch.Tensor, order: torch.Tensor, batch_size: int, epochs: int):
    """The same row batches, in the same order, as the plugin baselines get."""
    for _ in range(epochs):
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield x[order[start : start + batch_size]]


def build_sae(architecture: str, spec: dict, d_in: int):
    common = dict(d_in=d_in, d_sae=spec["width"], k=float(spec["k"]), device="cpu", dtype="float32")
    if architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    if architecture == "matryoshka_batchtopk":
        return MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=list(spec["matryoshka_widths"]), **common)
        )
    raise ValueError(f"unknown SAELens architecture {architecture!r}; allowed: batchtopk, matryoshka_batchtopk")


def train_one(run: dict, spec: dict, x: torch.Tensor, order: torch.Tensor, x_check: torch.Tensor, out_dir: Path) -> dict:
    torch.manual_seed(run["seed"])  # SAELens initialises its weights from the global RNG
    sae = build_sae(run["architecture"], spec, x.shape[1])
    n_steps = (len(order) // spec["batch_size"]) * spec["epochs"]
    warmup = spec["lr_warmup_steps"]
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_steps * spec["batch_size"],
        train_batch_size_samples=spec["batch_size"],
        lr=spec["lr"],
        # lr_end only matters for cosine schedules; SAELens' runner defaults it to lr / 10.
        lr_end=spec["lr"] / 10,
        # sparsify (the plugin baselines) warms up linearly, then decays linearly to 0 by the
        # last step; SAELens' constant schedule with warm-up and decay steps does the same.
        lr_scheduler_name="constant",
        lr_warm_up_steps=warmup,
        lr_decay_steps=n_steps - warmup,
    )
    trainer = SAETrainer(
        cfg=trainer_cfg, sae=sae, data_provider=batches(x, order, spec["batch_size"], spec["epochs"])
    )
    started = time.time()
    trainer.fit()
    seconds = time.time() - started
    assert trainer.n_training_steps == n_steps, (trainer.n_training_steps, n_steps)
    training_threshold = float(sae.topk_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device="cpu")
    inference.eval()
    with torch.no_grad():
        ref_acts = inference.encode(x_check)
        ref_recon = inference.decode(ref_acts)
    state = {k: v.detach().contiguous() for k, v in inference.state_dict().items()}
    expected = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    if set(state) != expected:
        raise RuntimeError(f"SAELens inference SAE has parameters {sorted(state)}, expected {sorted(expected)}")
    state.update(ref_acts=ref_acts.contiguous(), ref_recon=ref_recon.contiguous())
    save_file(state, str(out_dir / f"{run['name']}_seed{run['seed']}.safetensors"))
    return {
        **run,
        "seconds": round(seconds, 1),
        "steps": trainer.n_training_steps,
        "final_lr": trainer.optimizer.param_groups[0]["lr"],
        "training_topk_threshold": training_threshold,
        "dead_latents_at_end": int(trainer.dead_neurons.sum()),
        "inference_class": type(inference).__name__,
        "inference_architecture": inference.cfg.architecture(),
        "apply_b_dec_to_input": inference.cfg.apply_b_dec_to_input,
        "training_cfg": {k: v for k, v in asdict(sae.cfg).items() if k != "metadata"},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: saelens_toy.py DATA.safetensors SPEC.json OUT_DIR", file=sys.stderr)
        return 2
    data = load_file(argv[0])
    spec = json.loads(Path(argv[1]).read_text())
    out_dir = Path(argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(spec.get("threads", 1))
    meta = {"sae_lens_version": sae_lens.__version__, "torch_version": torch.__version__, "runs": []}
    for run in spec["runs"]:
        order = data[f"order_{run['seed']}"]
        meta["runs"].append(train_one(run, spec, data["x_train"], order, data["x_check"], out_dir))
        print(f"trained {run['name']} seed {run['seed']}", file=sys.stderr, flush=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
