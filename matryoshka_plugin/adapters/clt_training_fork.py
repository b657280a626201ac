"""Matryoshka losses for EleutherAI clt-training, the CLT fork of sparsify (training path 2).

clt-training also installs as ``eai-sparsify`` and imports as ``sparsify``, but its
cross-layer transcoders are built differently from the plugin's own CLT
(``matryoshka_plugin.clt``): one ``SparseCoder`` per layer, a ``CrossLayerRunner`` that, at each
target layer, gathers the codes of every earlier source still in its window and returns
that target's ``ForwardOutput``, and a ``Trainer`` whose forward hook back-propagates
``out.fvu`` target by target. The seam is therefore the runner's ``decode``:

- ``MatryoshkaCLTCoderConfig``: the fork's ``SparseCoderConfig`` plus the Matryoshka
  options (``matryoshka: true`` ...); ``MatryoshkaCLTTrainConfig`` accepts it as ``sae``.
- ``MatryoshkaCLTRunner``: the fork's ``CrossLayerRunner``. Its ``decode`` lets the fork
  do all of its own bookkeeping and its full-width decode, then replaces ``out.fvu`` by
  the nested loss of that target, from one sparse decode of every prefix level
  (``core.nested``), with the fork's masked FVU normalisation.
- ``MatryoshkaCLTTrainer``: the fork's ``Trainer``; builds the runner for the span of
  ``fit()`` (the fork constructs it by name inside ``fit``), draws each step's prefixes
  once for all targets, and saves the prefix sampler with each checkpoint.

Prefix ``P`` keeps latents ``< P`` at every source layer, as in ``core.cross_layer``.

Supported cross-layer modes, as the fork defines them at its HEAD (``clt`` branch):

- ``coalesce_topk="concat"`` (what the fork's own training scripts use): at target ``j``
  the codes of every source in the window are concatenated (optionally re-TopK'd with
  ``topk_coalesced``) and decoded by target ``j``'s single decoder ``[M, d]``.
- ``coalesce_topk="none"`` with ``cross_layer <= 1``: one decoder per source and target,
  but only the source's own layer (per-layer transcoders).

``coalesce_topk="none"`` with ``cross_layer >= 2`` (and ``per_source_tied``,
``secondary_target_tied``) crash inside the fork itself before any loss is formed:
``MidDecoder.__call__(no_extras=True)`` builds ``ForwardOutput`` with 7 positional
arguments for a 5-field dataclass (``TypeError``). The trainer refuses them with one
line rather than fail mid-step. ``coalesce_topk="per-layer"``/``"group"``, tensor
parallelism, ``nested_decoders`` and the plugin's ``batch_topk`` are refused too.

This module imports ``sparsify`` and is meant only for when clt-training is installed
(``installed_sparsify.detect_clt_training()``); it raises one line otherwise. Its
Triton kernels need CUDA; on CPU, ``TRITON_INTERPRET=1`` runs the forward pass but the
encoder's backward kernel is rejected by Triton's interpreter.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from unittest.mock import patch

import torch
from torch import Tensor

from ..core import (
    MatryoshkaConfig,
    MatryoshkaConfigError,
    PrefixSampler,
    cumulative_reconstructions,
    level_decodes,
    nested_fvu,
)
from ..core.errors import CheckpointError, CLTTrainingNotInstalledError
from ..core.plain_state import load_plain_state
from ..core.prefixes import level_weights, with_bias_level
from .installed_sparsify import detect_clt_training

if detect_clt_training() is None:
    raise CLTTrainingNotInstalledError(
        "matryoshka_plugin.adapters.clt_training_fork needs EleutherAI clt-training as the "
        "installed sparsify (pip install --no-deps <clt-training checkout>); "
        "for PyPI eai-sparsify use matryoshka_plugin.adapters.sparsify / matryoshka_plugin.clt"
    )

import sparsify.trainer  # noqa: E402
from sparsify.config import SparseCoderConfig, TrainConfig  # noqa: E402
from sparsify.runner import CrossLayerRunner  # noqa: E402
from sparsify.sparse_coder import ForwardOutput, MidDecoder, SparseCoder  # noqa: E402

SAMPLER_STATE_FILE = "matryoshka_prefix_sampler.pt"
SUPPORTED_COALESCE = ("none", "concat")


@dataclass
class MatryoshkaCLTCoderConfig(MatryoshkaConfig, SparseCoderConfig):
    """clt-training's ``SparseCoderConfig`` with the Matryoshka options added."""

    def __post_init__(self):
        super().__post_init__()
        if self.matryoshka and self.nested_decoders:
            raise MatryoshkaConfigError(
                "nested_decoders=True is not available with clt-training: it would add "
                "decoders the fork's Trainer does not build; use nested_decoders=False"
            )
        if self.matryoshka and self.batch_topk:
            raise MatryoshkaConfigError(
                "batch_topk=True is the plugin's own encoder, not clt-training's; "
                "use the fork's activation='batchtopk' instead"
            )


@dataclass
class MatryoshkaCLTTrainConfig(TrainConfig):
    """clt-training's ``TrainConfig`` whose ``sae`` section takes the Matryoshka options."""

    sae: MatryoshkaCLTCoderConfig


def check_supported(train_cfg: TrainConfig) -> None:
    """Raise a one-line error for a fork setting the Matryoshka runner cannot drive."""
    sae = train_cfg.sae
    if not getattr(sae, "matryoshka", False):
        return
    bad = MatryoshkaConfigError
    if train_cfg.loss_fn not in ("fvu", "kl-fvu"):
        raise bad(
            f"loss_fn={train_cfg.loss_fn!r} does not train on the reconstruction, so "
            "matryoshka=True would change nothing; allowed: 'fvu', 'kl-fvu'"
        )
    if sae.coalesce_topk not in SUPPORTED_COALESCE:
        raise bad(
            f"coalesce_topk={sae.coalesce_topk!r} is not supported with matryoshka=True; "
            f"allowed: {', '.join(map(repr, SUPPORTED_COALESCE))}"
        )
    untied_multi = sae.coalesce_topk == "none" and train_cfg.cross_layer >= 2
    if untied_multi or sae.per_source_tied or sae.secondary_target_tied:
        raise bad(
            f"coalesce_topk={sae.coalesce_topk!r}, cross_layer={train_cfg.cross_layer}, "
            f"per_source_tied={sae.per_source_tied}, secondary_target_tied="
            f"{sae.secondary_target_tied}: clt-training itself fails there "
            "(MidDecoder builds ForwardOutput with 7 arguments for 5 fields); "
            "use coalesce_topk='concat', or cross_layer <= 1"
        )
    if train_cfg.tp > 1:
        raise bad(f"tp={train_cfg.tp}: tensor parallelism is not supported; use tp=1")
    if sae.activation == "groupmax":
        raise bad(
            "activation='groupmax' picks one latent per group, so a prefix that cuts a "
            "group is not a smaller model; allowed with matryoshka=True: 'topk', 'batchtopk'"
        )


class StepPrefixes:
    """Each step's prefix lengths per dictionary width, drawn once for every target."""

    def __init__(self, cfg: MatryoshkaConfig, k: int):
        self.cfg, self.k = cfg, k
        self.samplers: dict[int, PrefixSampler] = {}
        self.current: dict[int, list[int]] = {}

    def new_step(self) -> None:
        self.current = {}

    def sizes(self, width: int) -> list[int]:
        """This step's levels for ``width`` (the bias level, size 0, first if enabled)."""
        if width not in self.current:
            if width not in self.samplers:
                self.samplers[width] = PrefixSampler(self.cfg, width, self.k)
            self.current[width] = with_bias_level(self.samplers[width](), self.cfg.bias_level)
        return self.current[width]

    def state_dict(self) -> dict:
        return {w: s.state_dict() for w, s in self.samplers.items()}

    def load_state_dict(self, state: dict) -> None:
        for width, sampler_state in state.items():
            self.sizes(width)
            self.samplers[width].load_state_dict(sampler_state)
        self.new_step()


def masked_total_variance(y: Tensor, loss_mask: Tensor | None) -> Tensor:
    """Sum of squared deviations from the mean over the rows ``loss_mask`` keeps."""
    if loss_mask is None:
        return (y - y.mean(0)).pow(2).sum()
    m = loss_mask[..., None].to(y.dtype)
    mean = (y * m).sum(0) / m.sum(0)
    return ((y - mean).pow(2) * m).sum()


def target_nested_loss(
    coder: SparseCoder,
    x: Tensor,
    acts: Tensor,
    indices: Tensor,
    decoder_index: int,
    y: Tensor,
    sizes: Sequence[int],
    weights: Sequence[float],
    *,
    stop_gradient: bool,
    loss_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted nested FVU of one target and its per-level FVU ``[levels]``.

    ``acts``/``indices`` are the codes the fork decodes at this target with
    ``coder``'s decoder number ``decoder_index``; ``x`` is that coder's normalised input
    (for the skip connection). Every level comes from one ``embedding_bag``.
    """
    W_dec = coder.W_decs[decoder_index] if hasattr(coder, "W_decs") else coder.W_dec
    b_dec = coder.b_decs[decoder_index] if hasattr(coder, "b_decs") else coder.b_dec
    W_skip = coder.W_skips[decoder_index] if hasattr(coder, "W_skips") else coder.W_skip
    levels = level_decodes(acts.to(coder.dtype), indices, W_dec, sizes)
    recons = cumulative_reconstructions(levels, stop_gradient=stop_gradient)
    offset = b_dec
    if W_skip is not None:
        offset = (x.to(coder.dtype) @ W_skip.mT)[:, None, :] + b_dec
    recons = coder.denormalize_output(recons + offset)
    total_variance = masked_total_variance(y, loss_mask)
    if loss_mask is not None:
        m = loss_mask[..., None].to(y.dtype)
        y, recons = y * m, recons * m[:, None]
    return nested_fvu(recons, y, total_variance, weights)


class MatryoshkaCLTRunner(CrossLayerRunner):
    """clt-training's ``CrossLayerRunner`` whose ``decode`` returns the nested loss as ``fvu``.

    Coders whose config has ``matryoshka=False`` get the fork's result unchanged.
    ``level_fvu[module_name]`` holds the last per-level FVU of each target (detached).
    """

    def __init__(self, prefixes: StepPrefixes):
        super().__init__()
        self.prefixes = prefixes
        self.level_fvu: dict[str, Tensor] = {}
        self.level_sizes: dict[str, list[int]] = {}

    def reset(self):
        # The fork calls reset() once per batch: the step's prefixes are drawn anew.
        super().reset()
        self.prefixes.new_step()

    def decode(
        self,
        mid_out: MidDecoder,
        y: Tensor,
        module_name: str,
        detach_grad: bool = False,
        advance: bool = True,
        **kwargs,
    ) -> ForwardOutput:
        coder = mid_out.sparse_coder
        cfg = coder.cfg
        if not getattr(cfg, "matryoshka", False):
            return super().decode(mid_out, y, module_name, detach_grad, advance, **kwargs)
        if cfg.coalesce_topk not in SUPPORTED_COALESCE:
            raise MatryoshkaConfigError(
                f"coalesce_topk={cfg.coalesce_topk!r} is not supported with matryoshka=True"
            )
        if detach_grad:
            # The fork detaches every source's codes first thing (idempotently); doing
            # it now makes the codes read below the same leaf its backward restores.
            mid_out.detach()
        if cfg.coalesce_topk == "none":
            if any(name != module_name for name in self.outputs):
                raise MatryoshkaConfigError(
                    "coalesce_topk='none' with earlier sources in the window fails inside "
                    "clt-training; use coalesce_topk='concat' or cross_layer <= 1"
                )
            # Read before the fork advances the coder to its next target.
            decoder_index = mid_out.index
            acts, indices = mid_out.current_latent_acts, mid_out.latent_indices
        # The fork deletes the input from the MidDecoder once it has decoded (concat).
        x = mid_out.x
        out = super().decode(mid_out, y, module_name, detach_grad, advance, **kwargs)
        if cfg.coalesce_topk == "concat":
            # The fork decodes the (re-)selected codes of all sources with this
            # target's decoder 0; they come back in the output.
            decoder_index, acts, indices = 0, out.latent_acts, out.latent_indices

        sizes = self.prefixes.sizes(coder.num_latents)
        weights = level_weights(cfg, len(sizes))
        # The same autocast the fork's MidDecoder.__call__ computes its FVU under.
        with torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported()
        ):
            loss, level_fvu = target_nested_loss(
                coder,
                x,
                acts,
                indices,
                decoder_index,
                y,
                sizes,
                weights,
                stop_gradient=cfg.stop_gradient,
                loss_mask=kwargs.get("loss_mask"),
            )
        self.level_fvu[module_name] = level_fvu.detach()
        self.level_sizes[module_name] = list(sizes)
        return replace(out, fvu=loss)


class MatryoshkaCLTTrainer(sparsify.trainer.Trainer):
    """clt-training's ``Trainer`` that trains on the nested loss when ``cfg.sae.matryoshka``."""

    def __init__(self, cfg: TrainConfig, dataset, model, mesh=None):
        check_supported(cfg)
        if mesh is not None and getattr(cfg.sae, "matryoshka", False):
            raise MatryoshkaConfigError(
                "a device mesh (tensor/data parallel DTensors) is not supported with "
                "matryoshka=True; pass mesh=None"
            )
        super().__init__(cfg, dataset, model, mesh)
        self.prefixes = (
            StepPrefixes(cfg.sae, cfg.sae.k) if getattr(cfg.sae, "matryoshka", False) else None
        )
        if self.prefixes is not None:
            for coder in self.saes.values():
                self.prefixes.sizes(coder.num_latents)  # width checks fail here, not mid-fit
            self.prefixes.new_step()

    def make_runner(self) -> CrossLayerRunner:
        return CrossLayerRunner() if self.prefixes is None else MatryoshkaCLTRunner(self.prefixes)

    def fit(self):
        # The fork builds its runner by name inside fit(); there is no factory.
        with patch.object(sparsify.trainer, "CrossLayerRunner", self.make_runner):
            super().fit()

    def _checkpoint(self, saes, path: str):
        super()._checkpoint(saes, path)
        rank_zero = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if self.prefixes is not None and rank_zero:
            torch.save(self.prefixes.state_dict(), f"{path}/{SAMPLER_STATE_FILE}")

    def load_state(self, path: str):
        super().load_state(path)
        state_file = Path(path) / SAMPLER_STATE_FILE
        if self.prefixes is not None and state_file.exists():
            state = load_plain_state(state_file)
            try:
                self.prefixes.load_state_dict(state)
            except (AttributeError, KeyError, TypeError, RuntimeError, MatryoshkaConfigError) as e:
                raise CheckpointError(f"{state_file} is not a prefix-sampler state ({e})") from None
