"""SAELens' Matryoshka BatchTopK, trained as a transcoder by SAELens' own ``SAETrainer``.

Runs in the separate SAELens environment (``.venv-saelens``); ``run.py`` calls it as a
subprocess, so the main environment never imports ``sae_lens``:

    .venv-saelens/bin/python benchmarks/real_model/saelens_transcoder.py JOB_DIR

``JOB_DIR`` holds ``job.json`` (settings) and ``data.safetensors`` (``x_train``,
``y_train``: MLP inputs and outputs; ``x_ref``: rows for the reference outputs). It
receives ``sae/`` (SAELens' inference save: JumpReLU weights and cfg), ``reference.safetensors``
(SAELens' own encode/decode of ``x_ref``, for the adapter check in ``run.py``) and
``train_log.json``.

SAELens only trains autoencoders: ``training_forward_pass`` uses ``step_input.sae_in``
as both the encoder input and every loss's target. The one change made here is the
target: each batch packs ``[mlp_in | mlp_out]``; the encoder reads ``mlp_in`` and
SAELens' unmodified losses (outer MSE, the inner-prefix MSE of every Matryoshka level,
the TopK aux loss) see ``mlp_out`` as ``sae_in``. ``apply_b_dec_to_input`` is off
because input and output spaces differ. Everything else (BatchTopK, the threshold EMA,
decoder-norm rescaling, grad clipping, dead-neuron mask, lr schedule, the conversion to
JumpReLU on save) is SAELens' own code.
"""

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sae_lens import (
    SAE,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer


class MatryoshkaBatchTopKTrainingTranscoder(MatryoshkaBatchTopKTrainingSAE):
    """SAELens' Matryoshka BatchTopK SAE whose losses target the MLP output.

    ``step_input.sae_in`` arrives as ``[mlp_in | mlp_out]``. The parent's training pass
    runs on ``mlp_out`` as ``sae_in`` (so every loss term targets it), while the encoder
    is fed ``mlp_in``.
    """

    _encoder_input: torch.Tensor | None = None

    def training_forward_pass(self, step_input):
        x, y = step_input.sae_in.split(self.cfg.d_in, dim=-1)
        self._encoder_input = x
        try:
            return super().training_forward_pass(replace(step_input, sae_in=y))
        finally:
            self._encoder_input = None

    def encode_with_hidden_pre(self, x):
        if self._encoder_input is not None:
            x = self._encoder_input
        return super().encode_with_hidden_pre(x)


def batches(xy: torch.Tensor, batch_size: int, epochs: int, seed: int):
    """Shuffled full batches, one permutation per epoch (as ``fit_activations`` does)."""
    g = torch.Generator().manual_seed(seed)
    n = xy.shape[0] // batch_size * batch_size
    for _ in range(epochs):
        order = torch.randperm(xy.shape[0], generator=g)[:n]
        yield from xy[order].split(batch_size)


def main(job_dir: str) -> int:
    job_dir = Path(job_dir)
    job = json.loads((job_dir / "job.json").read_text())
    torch.set_num_threads(job.get("threads", 1))
    data = load_file(str(job_dir / "data.safetensors"))
    x = data["x_train"].float()
    d = x.shape[1]
    # transcode false (benchmarks/absorption): SAELens' own autoencoder, unchanged.
    transcode = job.get("transcode", True)
    torch.manual_seed(job["seed"])
    sae = (MatryoshkaBatchTopKTrainingTranscoder if transcode else MatryoshkaBatchTopKTrainingSAE)(
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d,
            d_sae=job["width"],
            k=job["k"],
            matryoshka_widths=list(job["nested_sizes"]),
            apply_b_dec_to_input=not transcode,
            device="cpu",
            dtype="float32",
        )
    )
    xy = torch.cat([x, data["y_train"].float()], dim=1) if transcode else x
    steps = xy.shape[0] // job["batch_size"] * job["epochs"]
    warmup = job["lr_warmup_steps"]
    cfg = SAETrainerConfig(
        total_training_samples=steps * job["batch_size"],
        train_batch_size_samples=job["batch_size"],
        lr=job["lr"],
        # sparsify's schedule: linear warm-up, then linear decay to 0 at the last step.
        lr_scheduler_name="constant",
        lr_warm_up_steps=warmup,
        lr_decay_steps=steps - warmup,
        lr_end=job["lr"],
        device="cpu",
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(xy, job["batch_size"], job["epochs"], job["seed"]))
    started = time.time()
    trainer.fit()
    train_s = time.time() - started
    sae.save_inference_model(job_dir / "sae")

    # Reference outputs with SAELens' own inference class, loaded back from disk.
    loaded = SAE.load_from_disk(str(job_dir / "sae"), device="cpu")
    x_ref = data["x_ref"].float()
    with torch.no_grad():
        acts = loaded.encode(x_ref)
        out = loaded.decode(acts)
        p = job["reference_prefix"]
        acts_p = acts.clone()
        acts_p[:, p:] = 0
        out_p = loaded.decode(acts_p)
    save_file(
        {"acts": acts.contiguous(), "out": out.contiguous(), "out_prefix": out_p.contiguous()},
        str(job_dir / "reference.safetensors"),
    )
    (job_dir / "train_log.json").write_text(json.dumps({
        "steps": trainer.n_training_steps,
        "samples": trainer.n_training_samples,
        "train_s": train_s,
        "inference_class": type(loaded).__name__,
        "inference_architecture": loaded.cfg.architecture(),
        "topk_threshold": float(sae.topk_threshold),
        "dead_at_end": int(trainer.dead_neurons.sum()),
        "reference_prefix": p,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
