"""The Matryoshka coder: sparsify's ``SparseCoder`` trained with the nested loss.

``MatryoshkaSparseCoder``'s training forward returns the nested loss in ``fvu``, the one
field of the output sparsify's trainer optimises; outside training it is the plain
coder. It also offers BatchTopK and prefix-specific decoders. Its ``sae.safetensors``
holds exactly sparsify's tensors unless ``nested_decoders`` adds the level decoders;
the BatchTopK threshold and the adaptive schedule's nested sizes travel in ``cfg.json``.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput
from torch import Tensor, nn

from ...atomic import atomic_dir, atomic_write_text
from ...core import (
    MatryoshkaConfig,
    MatryoshkaConfigError,
    PrefixSampler,
    cumulative_reconstructions,
    level_decodes,
    nested_fvu,
    prefix_decodes,
)
from ...core.batch_topk import (
    batch_topk_encode,
    encode_pre_acts,
    threshold_select,
    update_threshold,
)
from ...core.permutation import LatentMass, permute_latents
from ...core.prefixes import level_weights, with_bias_level

THRESHOLD_KEY = "batch_topk_threshold"
"""The ``cfg.json`` key (and state key) holding the BatchTopK inference threshold."""

ADAPTED_SIZES_KEY = "adapted_nested_sizes"
"""The ``cfg.json`` key holding the nested sizes ``prefix_schedule='adaptive'`` moved to:
the config keeps the sizes it starts from (and whose shares it aims for)."""

UPDATES_KEY = "batch_topk_updates"
"""The state key holding how many training batches the threshold has seen."""


ACTIVATIONS = ("groupmax", "topk")
"""sparsify's coder activations (``SparseCoderConfig.activation``)."""


def check_coder_fields(cfg: SparseCoderConfig) -> None:
    """Refuse sparsify coder fields that would only fail (or train nothing) later.

    sparsify checks none of them: ``k=0`` trains a coder that never fires, a negative
    width fails deep inside ``torch.empty``.
    """
    bad = MatryoshkaConfigError
    if cfg.activation not in ACTIVATIONS:
        raise bad(f"activation={cfg.activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    for name, low in (("k", 1), ("num_latents", 0), ("expansion_factor", 1)):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise bad(f"{name}={value!r} is not allowed; expected an integer >= {low}")
    if cfg.num_latents and cfg.k > cfg.num_latents:
        raise bad(f"k={cfg.k} exceeds the width num_latents={cfg.num_latents}")


@dataclass
class MatryoshkaSparseCoderConfig(MatryoshkaConfig, SparseCoderConfig):
    """sparsify's ``SparseCoderConfig`` with the Matryoshka options added."""

    def __post_init__(self):
        super().__post_init__()
        check_coder_fields(self)


def _group_size_check(cfg: SparseCoderConfig, sizes: list[int], width: int) -> None:
    # groupmax picks one latent per group of width/k; a prefix that cuts a group
    # would keep a different number of latents per token, so it is not a prefix model.
    if cfg.activation != "groupmax":
        return
    # Both move latents (or level boundaries) one at a time, across groups.
    for name, on in (("prefix_schedule='adaptive'", cfg.prefix_schedule == "adaptive"),
                     (f"permute_every={cfg.permute_every}", cfg.permute_every > 0)):
        if on and cfg.matryoshka:
            raise MatryoshkaConfigError(
                f"{name} needs activation='topk': groupmax ties latents to fixed groups "
                "of the width, which moving latents or level boundaries would cut"
            )
    group = width // cfg.k
    if any(s % group for s in sizes):
        raise MatryoshkaConfigError(
            f"nested sizes {sizes} must be multiples of the groupmax group size "
            f"{group} (num_latents={width} / k={cfg.k})"
        )


class MatryoshkaSparseCoder(SparseCoder):
    """A sparsify ``SparseCoder`` trained with the Matryoshka nested loss.

    Outside training (``.eval()``) it is the plain coder: only the full decoder is used.
    """

    def __init__(
        self,
        d_in: int,
        cfg: MatryoshkaSparseCoderConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        decoder: bool = True,
    ):
        super().__init__(d_in, cfg, device, dtype, decoder=decoder)
        self.sampler = PrefixSampler(cfg, self.num_latents, cfg.k)
        _group_size_check(cfg, self.sampler.fixed_sizes, self.num_latents)
        # A prefix-specific decoder per level below the full width; each level's bias
        # is the shared b_dec plus its own offset, so sparsify's b_dec initialisation
        # reaches every level.
        inner = self.sampler.fixed_sizes[:-1] if cfg.nested_decoders and decoder else []
        self.W_dec_levels = nn.ParameterList(
            nn.Parameter(self.W_dec.data[:s].clone()) for s in inner
        )
        self.b_dec_levels = nn.ParameterList(
            nn.Parameter(torch.zeros_like(self.b_dec)) for _ in inner
        )
        # Non-persistent: sae.safetensors keeps sparsify's tensors; cfg.json carries it.
        self.register_buffer(
            "batch_topk_threshold",
            torch.tensor(-1.0, device=device, dtype=dtype),
            persistent=False,
        )
        # Sizes the threshold's EMA window (core.batch_topk.update_threshold); training
        # state only, in matryoshka_state.pt.
        self.register_buffer(
            "batch_topk_updates", torch.zeros((), device=device, dtype=torch.long), persistent=False
        )
        self.latent_mass = LatentMass(self.num_latents)
        """Activation mass since the last reorder (``permute_every``)."""
        self._pending_sizes: list[int] | None = None
        self._level_recons: Tensor | None = None
        self._full_recon: Tensor | None = None
        self.last_level_fvu: Tensor | None = None
        self.last_sizes: list[int] | None = None

    @property
    def nested_sizes(self) -> list[int]:
        """The fixed prefix lengths, ending at the width."""
        return list(self.sampler.fixed_sizes)

    def step_sizes(self) -> list[int]:
        """This step's prefix lengths, with the bias level (size 0) first if enabled."""
        return with_bias_level(self.sampler(), self.cfg.bias_level)

    # -- encoder: BatchTopK --------------------------------------------------
    def encode(self, x: Tensor) -> EncoderOutput:
        """sparsify's TopK, or BatchTopK: the batch's k x tokens largest activations in
        training, every activation above the running threshold in eval mode. BatchTopK
        output is ragged (``core.batch_topk``): ``[tokens, K]`` with ``K`` this batch's
        largest per-token count, each row's entries independent of the other rows in eval."""
        if not self.cfg.batch_topk:
            return super().encode(x)
        if not self.cfg.transcode:
            x = x - self.b_dec
        W, b = self.encoder.weight, self.encoder.bias
        if self.training:
            # Sparse backward over the kept entries only, as sparsify's fused encoder.
            values, indices, pre_acts, min_kept = batch_topk_encode(x, W, b, self.cfg.k)
            update_threshold(
                self.batch_topk_threshold, self.batch_topk_updates, min_kept,
                self.cfg.batch_topk_momentum,
            )
        else:
            pre_acts = encode_pre_acts(x, W, b)
            threshold = self.batch_topk_threshold.clamp_min(0)
            values, indices = threshold_select(pre_acts, threshold)
        # The returned pre_acts carry no gradient, as from sparsify's fused encoder, so
        # AuxK trains only the decoder in both paths.
        return EncoderOutput(values, indices, pre_acts.detach())

    # -- decoder: every prefix from one sparse decode ------------------------
    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        sizes = self._pending_sizes
        if sizes is None:
            return super().decode(top_acts, top_indices)
        # One-shot: the multi-TopK decode that sparsify may run next is a plain one.
        self._pending_sizes = None
        if self.cfg.nested_decoders:
            recons = self._prefix_decoder_recons(top_acts, top_indices, sizes)
        else:
            levels = level_decodes(top_acts, top_indices, self.W_dec, sizes)
            recons = cumulative_reconstructions(
                levels, stop_gradient=self.cfg.stop_gradient
            )
        # Every level less the shared b_dec (and skip term): forward moves those to
        # the target once instead of adding them to each level.
        self._level_recons = recons
        # Kept because sparsify adds the skip term to it in place, and with multi-TopK
        # it returns a different reconstruction as sae_out.
        self._full_recon = recons[:, -1] + self.b_dec
        return self._full_recon

    def _prefix_decoder_recons(
        self, top_acts: Tensor, top_indices: Tensor, sizes: list[int]
    ) -> Tensor:
        """Each level through its own decoder, plus its bias offset from b_dec."""
        inner = iter(zip(self.W_dec_levels, self.b_dec_levels))
        W_decs, offsets = [], []
        for s in sizes:
            if 0 < s < self.num_latents:
                W, b_offset = next(inner)
                W_decs.append(W)
                offsets.append(b_offset)
            else:
                W_decs.append(self.W_dec[:s])
                offsets.append(torch.zeros_like(self.b_dec))
        recons = prefix_decodes(top_acts, top_indices, W_decs, sizes)
        return recons + torch.stack(offsets)

    # sparsify's forward is wrapped in this autocast; a subclass forward is not.
    @torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())
    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | None = None,
    ):
        sizes = self.step_sizes() if self.training and self.cfg.matryoshka else None
        if sizes is None or (sizes == [self.num_latents] and not self.cfg.bias_level):
            out = super().forward(
                x, y, dead_mask=dead_mask, total_variance=total_variance
            )
            if sizes is not None:
                self._observe(out)
            return out
        self._pending_sizes = sizes
        try:
            out = super().forward(
                x, y, dead_mask=dead_mask, total_variance=total_variance
            )
            recons, full_recon = self._level_recons, self._full_recon
        finally:
            self._pending_sizes = self._level_recons = self._full_recon = None
        if y is None:
            y = x
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()
        # full_recon = recons[:, -1] + b_dec + skip, so this target is y - b_dec - skip
        # as a function (values and gradients) without recomputing the skip matmul.
        target = y - full_recon + recons[:, -1]
        weights = level_weights(self.cfg, len(sizes))
        loss, level_fvu = nested_fvu(recons, target, total_variance, weights)
        self.last_level_fvu, self.last_sizes = level_fvu.detach(), sizes
        self._observe(out)
        return out._replace(fvu=loss)

    def _observe(self, out) -> None:
        """Count a training forward's activations for the adaptive schedule and reorders."""
        self.sampler.observe(out.latent_acts, out.latent_indices)
        if self.cfg.permute_every:
            self.latent_mass.observe(out.latent_acts, out.latent_indices)

    # -- latent permutation (permute_every) -----------------------------------
    @torch.no_grad()
    def permute_by_mass(self, optimizers=(), counters: tuple[Tensor, ...] = ()) -> Tensor:
        """Reorder latents by mass since the last reorder, largest first, and reset it.

        Moves the encoder rows and bias, the decoder rows, their optimizer state and
        ``counters`` (per-latent tensors such as sparsify's dead-latent counts); the
        adaptive schedule's mass follows. The coder's output is unchanged. Returns the
        permutation (new latent ``i`` is old latent ``perm[i]``).
        """
        perm = self.latent_mass.order()
        tensors = [(self.encoder.weight, 0), (self.encoder.bias, 0)]
        if self.W_dec is not None:
            tensors.append((self.W_dec, 0))
        permute_latents(tensors + [(c, 0) for c in counters], perm, optimizers)
        self.sampler.mass.permute(perm)
        self.latent_mass.reset()
        return perm

    # -- evaluation ------------------------------------------------------------
    @torch.no_grad()
    def prefix_fvu(self, x: Tensor, y: Tensor | None = None, prefix_lens=None) -> dict:
        """FVU of the coder truncated to each prefix length (default: nested sizes), each
        decoded by the decoder trained for it (``evaluation.prefix_metrics.prefix_decode``)."""
        return prefix_fvu(self, x, y, prefix_lens or self.nested_sizes)

    # -- decoder normalisation, extended to the prefix-specific decoders ---------
    # sparsify's methods only touch ``self.W_dec``; run them on each extra decoder.
    def _extra_decoders(self) -> list[nn.Parameter]:
        # sparsify's __init__ normalises the decoder before the levels exist.
        return list(getattr(self, "W_dec_levels", ()))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        super().set_decoder_norm_to_unit_norm()
        for W in self._extra_decoders():
            SparseCoder.set_decoder_norm_to_unit_norm(SimpleNamespace(W_dec=W))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        super().remove_gradient_parallel_to_decoder_directions()
        for W in self._extra_decoders():
            if W.grad is not None:
                SparseCoder.remove_gradient_parallel_to_decoder_directions(
                    SimpleNamespace(W_dec=W)
                )

    # -- state beyond the weights ------------------------------------------------
    def matryoshka_state(self) -> dict:
        state = {
            "sampler": self.sampler.state_dict(),
            THRESHOLD_KEY: self.batch_topk_threshold.detach().cpu(),
            UPDATES_KEY: self.batch_topk_updates.cpu(),
        }
        if self.cfg.permute_every:
            state["latent_mass"] = self.latent_mass.state_dict()
        return state

    def load_matryoshka_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.batch_topk_threshold.copy_(state[THRESHOLD_KEY])
        # A state written before the count existed restarts the window: the next batch
        # sets the threshold, which then averages over a tenth of the steps since.
        self.batch_topk_updates.fill_(int(state.get(UPDATES_KEY, 0)))
        if self.cfg.permute_every:
            self.latent_mass.load_state_dict(state["latent_mass"])

    def save_to_disk(self, path: Path | str):
        # Written whole into a temporary sibling, then swapped in: a crash leaves the
        # previous coder directory or the new one, never a cfg.json without its weights.
        with atomic_dir(path) as tmp:
            super().save_to_disk(tmp)
            extra = {}
            if self.cfg.batch_topk:
                extra[THRESHOLD_KEY] = float(self.batch_topk_threshold)
            if self.sampler.adaptive:
                extra[ADAPTED_SIZES_KEY] = self.nested_sizes
            if extra:
                cfg_path = tmp / "cfg.json"
                cfg_dict = json.loads(cfg_path.read_text())
                atomic_write_text(cfg_path, json.dumps({**cfg_dict, **extra}))


@torch.no_grad()
def prefix_fvu(
    coder: SparseCoder, x: Tensor, y: Tensor | None, prefix_lens
) -> dict[int, float]:
    """FVU at each prefix length: TopK over the full width, then latents >= P zeroed, decoded
    by the decoder that serves P (a level's own under ``nested_decoders``)."""
    from ...evaluation.prefix_metrics import prefix_decode

    y = x if y is None else y
    top_acts, top_indices, _ = coder.encode(x)
    skip = x.to(coder.dtype) @ coder.W_skip.mT if coder.W_skip is not None else 0
    total_variance = (y - y.mean(0)).pow(2).sum()
    result = {}
    for p in prefix_lens:
        recon = prefix_decode(coder, top_acts, top_indices, p) + skip
        result[int(p)] = float((y - recon).pow(2).sum() / total_variance)
    return result


def coder_class(cfg) -> type[SparseCoder]:
    """The plugin coder when any plugin feature is on, else stock sparsify's."""
    plugin = getattr(cfg, "matryoshka", False) or getattr(cfg, "batch_topk", False)
    return MatryoshkaSparseCoder if plugin else SparseCoder
