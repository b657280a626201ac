"""Evaluating sparse coders as progressive (prefix) coders.

Works on any sparsify ``SparseCoder`` or plugin ``MatryoshkaSparseCoder``. A prefix
model of length P is the full coder with every latent >= P switched off after the
activation, as in ``core.truncation.truncate_sparse``.

- ``prefix_metrics``: which prefix lengths to evaluate, ``reconstruct`` at a prefix,
  ``rsa`` (representational similarity) and ``prefix_curve`` (FVU, MSE, L0, RSA per
  prefix, on held-out activations).
- ``latent_stats``: L0, dead and dense latents, activation frequency per level.
- ``power_law``: power-law fits of per-latent importance against rank.
- ``reorder``: ``reorder_by_mean_squared_activation`` turns a vanilla coder into a
  progressive one by sorting its latents.
- ``splice``: the coder spliced into a Hugging Face causal LM; cross-entropy, loss
  recovered and KL per prefix.
- ``report``: all activation-level metrics as one JSON-ready dict (``evaluate``), and
  its plot.
- ``absorption``: SAEBench's first-letter feature absorption (Chanin et al.), ported
  to torch: ``probe_data`` once per model, ``absorption_eval`` per coder.
- ``meta_sae``: meta-SAE composition (``coder_meta_sae``): a small TopK coder trained on
  the unit decoder rows; its FVU per level (higher = more disentangled latents).
- ``autointerp``: Sort Eval, Contrastive Eval and Detection Eval (explain, then detect)
  per level (``autointerp``), judged and explained by an ``explainers`` backend: an
  OpenAI-compatible endpoint (``ChatJudge``) or a local LM (``LocalJudge``, SmolLM2 by
  default: a weak stand-in).
- ``checkpoint``: the same for a saved coder and held-out files (``matryoshka-eval``,
  whose flags live in ``cli.eval``).
- ``graph_paths``: path length of an attribution graph (influence-weighted steps from the
  embeddings to the logit in the pruned graph, seed 001's graph-simplicity measure).
"""

from .absorption import absorption_eval, probe_data, residual_reader
from .autointerp import autointerp
from .checkpoint import evaluate_checkpoint
from .explainers import ChatJudge, LocalJudge
from .graph_paths import PathLength, path_length
from .latent_stats import latent_activation_sums, latent_stats
from .meta_sae import coder_meta_sae, meta_sae_composition
from .power_law import dictionary_power_law, power_law_fit
from .prefix_metrics import default_prefix_lens, prefix_curve, reconstruct, rsa
from .reorder import permute_latents, reorder_by_mean_squared_activation
from .report import coder_summary, evaluate, plot_report, save_report
from .splice import spliced, spliced_lm_metrics

__all__ = [
    "absorption_eval",
    "ChatJudge",
    "LocalJudge",
    "autointerp",
    "coder_meta_sae",
    "PathLength",
    "path_length",
    "coder_summary",
    "default_prefix_lens",
    "dictionary_power_law",
    "evaluate",
    "evaluate_checkpoint",
    "latent_activation_sums",
    "latent_stats",
    "meta_sae_composition",
    "permute_latents",
    "plot_report",
    "power_law_fit",
    "prefix_curve",
    "probe_data",
    "reconstruct",
    "reorder_by_mean_squared_activation",
    "residual_reader",
    "rsa",
    "save_report",
    "spliced",
    "spliced_lm_metrics",
]
