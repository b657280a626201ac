"""SAELens 6.x training steps, built the way SAELens' own ``SAETrainer`` steps them.

Imported only by ``run.py --_saelens-only`` in the separate SAELens environment
(``.venv-saelens``), so the main environment never needs ``sae_lens``.
"""

import torch
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput


class SaeLensStep:
    """One SAELens training step: forward, backward, clip (as SAETrainer does), Adam."""

    def __init__(self, sae, x: torch.Tensor):
        self.coder, self.x = sae.train(), x
        self.opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        self.coefficients = {
            name: (c.value if hasattr(c, "value") else c)
            for name, c in sae.get_coefficients().items()
        }

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        out = self.coder.training_forward_pass(
            TrainStepInput(
                sae_in=self.x,
                coefficients=self.coefficients,
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.coder.parameters(), 1.0)
        self.opt.step()
        return float(out.loss.detach())


def saelens_steps(d: int, width: int, k: int, sizes: list[int], x: torch.Tensor) -> dict:
    """SAELens BatchTopK and Matryoshka BatchTopK steps at the given shape."""
    torch.manual_seed(0)
    common = dict(d_in=d, d_sae=width, k=k, device="cpu", dtype="float32")
    plain = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    torch.manual_seed(0)
    matryoshka = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=list(sizes), **common)
    )
    return {
        "saelens_batchtopk": SaeLensStep(plain, x),
        "saelens_matryoshka5": SaeLensStep(matryoshka, x),
    }
