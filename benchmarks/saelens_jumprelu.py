"""SAELens' saved inference SAE behind the coder interface the plugin's metrics read.

SAELens saves a trained BatchTopK coder (Matryoshka or not) as a JumpReLU SAE:
``pre = x' @ W_enc + b_enc`` with ``x' = x - b_dec`` if ``apply_b_dec_to_input`` (an
autoencoder) and ``x' = x`` otherwise (a transcoder: input and output spaces differ);
a latent fires where ``pre > threshold`` with value ``relu(pre)``; the output is
``acts @ W_dec + b_dec``. The toy and real-model benchmarks evaluate those SAEs with
the plugin's own metrics (``prefix_curve``, ``spliced_lm_metrics``, the toy's ground
truth) through this adapter, and check it against SAELens' own encode/decode (which
runs in the separate SAELens environment). ``benchmarks/authors`` puts Bussmann's (his
eval-mode threshold, no encoder bias) and Nabeshima's (threshold 0, his input scaling
folded into the weights) coders behind it the same way.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor


class SaeLensJumpReLU:
    """A SAELens JumpReLU inference SAE with sparsify's ``encode``/``decode`` interface.

    ``encode`` returns the active latents as ``(values, indices, None)``, padded with
    zeros to the most active row (the number firing varies per row, as in SAELens), as
    the plugin's prefix truncation and ``decode`` expect.
    """

    def __init__(self, tensors: dict[str, Tensor], *, apply_b_dec_to_input: bool, transcode: bool, k):
        self.W_enc, self.b_enc = tensors["W_enc"].float(), tensors["b_enc"].float()
        self.W_dec, self.b_dec = tensors["W_dec"].float(), tensors["b_dec"].float()
        self.threshold = tensors["threshold"].float()
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.d_in, self.num_latents = self.W_enc.shape
        self.dtype = torch.float32
        self.W_skip = None
        self.cfg = SimpleNamespace(transcode=transcode, k=k)

    @classmethod
    def load(cls, sae_dir: Path, *, transcode: bool) -> "SaeLensJumpReLU":
        """The SAE that SAELens' ``save_inference_model`` wrote to ``sae_dir``."""
        cfg = json.loads((sae_dir / "cfg.json").read_text())
        handled = {"architecture": "jumprelu", "normalize_activations": "none", "reshape_activations": "none"}
        for key, want in handled.items():
            if cfg.get(key) != want:
                raise ValueError(f"{sae_dir}: {key}={cfg.get(key)!r}; the adapter handles only {want!r}")
        return cls(
            load_file(str(sae_dir / "sae_weights.safetensors")),
            apply_b_dec_to_input=bool(cfg["apply_b_dec_to_input"]),
            transcode=transcode,
            k=cfg["metadata"]["training_architecture_details"]["k"],
        )

    @torch.no_grad()
    def dense_acts(self, x: Tensor) -> Tensor:
        """Every latent's activation, ``[rows, num_latents]``, zero where silent."""
        x = x.float()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        return pre.relu() * (pre > self.threshold)

    @torch.no_grad()
    def encode(self, x: Tensor):
        acts = self.dense_acts(x)
        most = max(int((acts > 0).sum(-1).max()), 1) if acts.shape[0] else 1
        values, indices = acts.topk(most, dim=-1, sorted=False)
        return values, indices, None

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
