"""The plugin's own Matryoshka cross-layer transcoder (CLT), built from sparsify's pieces.

- ``CLTConfig``: width, TopK ``k``, AuxK, plus every Matryoshka option.
- ``MatryoshkaCLT``: an encoder per source layer (sparsify's ``fused_encoder``, or the
  core BatchTopK), a decoder per source into every later target, circuit-tracer's
  tensor layout. Its training forward returns the nested cross-layer loss, computed
  from one sparse decode per source layer (see ``core.cross_layer``).
- ``save_clt`` / ``load_clt``: a directory with ``config.json`` and ``clt.safetensors``.
- Refuses EleutherAI clt-training (training path 2) with one line when it is the
  installed ``sparsify`` (``adapters.installed_sparsify``).

Layer slots ``0..L-1`` are positions in ``layers`` (the model's layer numbers).
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..adapters.installed_sparsify import require_pypi_sparsify
from ..core import (
    MatryoshkaConfig,
    MatryoshkaConfigError,
    PrefixSampler,
    check_prefix_len,
    truncate_sparse,
)
from ..core.batch_topk import (
    batch_topk_encode,
    encode_pre_acts,
    threshold_select,
    update_threshold,
)
from ..core.cross_layer import (
    cross_layer_nested_fvu,
    cross_layer_recons,
    gather_targets,
    source_level_decodes,
    source_prefix_decodes,
    target_level_decodes,
    target_variance,
)
from ..core.errors import CLTError
from ..core.level_decoders import decoder_level
from ..core.permutation import LatentMass, permute_latents
from ..core.prefixes import level_weights, with_bias_level

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "clt.safetensors"
FORMAT = "matryoshka-clt/1"

# Before any ``import sparsify``: clt-training's package import fails on Triton.
require_pypi_sparsify()

from sparsify.fused_encoder import EncoderOutput, fused_encoder  # noqa: E402

from ..atomic import atomic_dir  # noqa: E402


@dataclass
class CLTConfig(MatryoshkaConfig):
    """A cross-layer transcoder's shape and activation, plus the Matryoshka options."""

    num_latents: int = 256
    """Latents per source layer; nested sizes index each source layer's latents."""

    k: int = 16
    """Active latents per token at each source layer (TopK, or the BatchTopK average)."""

    auxk_alpha: float = 1 / 32
    """Weight of sparsify's AuxK loss, which revives dead latents."""

    dead_feature_threshold: int = 1_000_000
    """Tokens without firing after which a latent counts as dead for AuxK."""

    def __post_init__(self):
        super().__post_init__()
        if self.num_latents < 1 or self.k < 1:
            raise MatryoshkaConfigError(
                f"num_latents={self.num_latents} and k={self.k} must be positive"
            )
        if self.permute_every and self.prefix_schedule == "adaptive":
            raise MatryoshkaConfigError(
                f"permute_every={self.permute_every} reorders each source layer's latents "
                "its own way, and prefix_schedule='adaptive' places one set of sizes from "
                "their summed mass: a CLT takes one of them"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLTConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CLTError(f"unknown CLT config keys {unknown}; allowed: {sorted(names)}")
        return cls(**d)


class CLTOutput(NamedTuple):
    loss: Tensor
    """Nested loss summed over targets, plus ``auxk_alpha`` x AuxK: what training minimises."""

    recon: Tensor
    """Full-width reconstruction of every target, ``[N, L, d]``."""

    fvu: Tensor
    """Full-width FVU per target, ``[L]`` (detached)."""

    level_fvu: Tensor
    """FVU per target and prefix level, ``[L, levels]`` (detached)."""

    auxk_loss: Tensor
    """AuxK loss summed over sources (0 when no latent is dead)."""

    sizes: list[int]
    """The prefix lengths used (the bias level is size 0)."""

    top_indices: list[Tensor]
    """Each source layer's active latent indices, for dead-latent tracking."""


class MatryoshkaCLT(nn.Module):
    """A (Matryoshka) cross-layer transcoder over ``layers`` of a model.

    Tensors use circuit-tracer's layout per source ``s``: ``W_enc[s] [M, d]``, ``b_enc[s] [M]``,
    ``W_dec[s] [M, L - s, d]``, ``b_dec [L, d]`` (per target layer).
    """

    def __init__(
        self,
        d_model: int,
        layers: list[int],
        cfg: CLTConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        layers = [int(i) for i in layers]
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
            raise CLTError(
                f"layers={layers} must be a non-empty, strictly increasing list of layer numbers"
            )
        self.cfg, self.d_model, self.layers = cfg, d_model, layers
        L, M = len(layers), cfg.num_latents
        self.n_layers, self.num_latents = L, M
        self.sampler = PrefixSampler(cfg, M, cfg.k)

        # nn.Linear's default initialisation for every source's encoder, as sparsify.
        bound = 1 / d_model**0.5
        # One parameter per source layer: slicing a stacked [L, M, d] parameter makes
        # autograd build (and zero-fill) a full-size gradient for every slice.
        self.W_enc = nn.ParameterList(
            nn.Parameter(torch.empty(M, d_model, device=device, dtype=dtype).uniform_(-bound, bound))
            for _ in range(L)
        )
        self.b_enc = nn.ParameterList(
            nn.Parameter(torch.zeros(M, device=device, dtype=dtype)) for _ in range(L)
        )
        # Zero decoders, as sparsify initialises transcoders.
        self.W_dec = nn.ParameterList(
            nn.Parameter(torch.zeros(M, L - s, d_model, device=device, dtype=dtype))
            for s in range(L)
        )
        self.b_dec = nn.Parameter(torch.zeros(L, d_model, device=device, dtype=dtype))

        inner = [s for s in self.sampler.fixed_sizes[:-1]] if cfg.nested_decoders else []
        self.inner_sizes = inner
        # Flat list: entry s * len(inner) + l is source s's decoder for prefix inner[l].
        self.W_dec_levels = nn.ParameterList(
            nn.Parameter(torch.zeros(size, L - s, d_model, device=device, dtype=dtype))
            for s in range(L)
            for size in inner
        )
        self.b_dec_levels = (
            nn.Parameter(torch.zeros(len(inner), L, d_model, device=device, dtype=dtype))
            if inner
            else None
        )
        self.register_buffer(
            "batch_topk_threshold", torch.full((L,), -1.0, device=device, dtype=dtype)
        )
        # Batches each source's threshold has seen, which size its EMA window
        # (core.batch_topk.update_threshold): a resumed run sets them from its step.
        self.register_buffer(
            "batch_topk_updates", torch.zeros(L, device=device, dtype=torch.long), persistent=False
        )
        self.source: dict = {}
        """Where the CLT came from (model, n_model_layers, hookpoints); saved with it."""
        self.latent_mass = [LatentMass(M) for _ in range(L)]
        """Each source layer's activation mass since the last reorder (``permute_every``)."""

    # -- shapes and checks ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.b_dec.device

    @property
    def nested_sizes(self) -> list[int]:
        """The fixed prefix lengths shared by every source layer, ending at the width."""
        return list(self.sampler.fixed_sizes)

    def _check_input(self, x: Tensor, name: str) -> None:
        want = (self.n_layers, self.d_model)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise CLTError(
                f"{name} has shape {tuple(x.shape)}; expected [tokens, {want[0]} layers, "
                f"{want[1]}] for layers {self.layers}"
            )

    def step_sizes(self) -> list[int]:
        """This step's prefix lengths (sampled or fixed), with the bias level first if enabled."""
        if not self.cfg.matryoshka:
            return [self.num_latents]
        return with_bias_level(self.sampler(), self.cfg.bias_level)

    # -- encoder ---------------------------------------------------------------
    def encode_layer(self, x: Tensor, s: int) -> EncoderOutput:
        """Source slot ``s``'s active latents for inputs ``[N, d]``."""
        W, b = self.W_enc[s], self.b_enc[s]
        if not self.cfg.batch_topk:
            return fused_encoder(x, W, b, self.cfg.k, "topk")
        # The returned pre_acts carry no gradient, as from sparsify's fused encoder (whose
        # backward drops theirs): AuxK, which ranks dead latents by them, then trains
        # only the decoder, with TopK and BatchTopK alike.
        if not self.training:
            pre_acts = encode_pre_acts(x, W, b)
            threshold = self.batch_topk_threshold[s].clamp_min(0)
            return EncoderOutput(*threshold_select(pre_acts, threshold), pre_acts.detach())
        values, indices, pre_acts, min_kept = batch_topk_encode(x, W, b, self.cfg.k)
        update_threshold(
            self.batch_topk_threshold[s], self.batch_topk_updates[s], min_kept,
            self.cfg.batch_topk_momentum,
        )
        return EncoderOutput(values, indices, pre_acts.detach())

    def encode(self, x: Tensor) -> list[EncoderOutput]:
        """Every source layer's active latents for inputs ``[N, L, d]``."""
        self._check_input(x, "inputs")
        x = x.to(self.b_dec.dtype)
        return [self.encode_layer(x[:, s], s) for s in range(self.n_layers)]

    # -- decoder ---------------------------------------------------------------
    def level_recons(self, codes: list[EncoderOutput], sizes: list[int]) -> Tensor:
        """Reconstructions of every target at every prefix in ``sizes``, ``[N, levels, L, d]``.

        One sparse decode per source layer covers every level and target.
        """
        if self.cfg.nested_decoders and any(0 < s < self.num_latents for s in sizes):
            return self._prefix_decoder_recons(codes, sizes)
        summed = self._target_decodes(codes, sizes)
        return cross_layer_recons(
            summed, self.b_dec, stop_gradient=self.cfg.stop_gradient and self.training
        )

    def _target_decodes(self, codes: list[EncoderOutput], sizes: list[int]) -> Tensor:
        return target_level_decodes(
            [c.top_acts for c in codes], [c.top_indices for c in codes], list(self.W_dec), sizes
        )

    def _prefix_decoder_recons(self, codes: list[EncoderOutput], sizes: list[int]) -> Tensor:
        n_inner = len(self.inner_sizes)
        per_source = []
        for s, c in enumerate(codes):
            W_decs = []
            for size in sizes:
                if 0 < size < self.num_latents:
                    W_decs.append(self.W_dec_levels[s * n_inner + self.inner_sizes.index(size)])
                else:
                    W_decs.append(self.W_dec[s][:size])
            per_source.append(source_prefix_decodes(c.top_acts, c.top_indices, W_decs, sizes))
        offsets = [
            self.b_dec_levels[self.inner_sizes.index(size)]
            if 0 < size < self.num_latents
            else torch.zeros_like(self.b_dec)
            for size in sizes
        ]
        b_dec = self.b_dec + torch.stack(offsets)
        summed = gather_targets(per_source, self.n_layers)
        return cross_layer_recons(summed, b_dec, stop_gradient=False, cumulative=False)

    def level_decoder(self, size: int) -> tuple[list[Tensor], Tensor]:
        """Nested size ``size``'s own decoder, per source ``[size, L - s, d]``, and its full
        bias ``[L, d]`` (the shared ``b_dec`` plus the level's offset, as training adds them)."""
        if size not in self.inner_sizes:
            raise CLTError(f"size {size} has no decoder of its own; allowed: {self.inner_sizes}")
        i, n = self.inner_sizes.index(size), len(self.inner_sizes)
        W = [self.W_dec_levels[s * n + i] for s in range(self.n_layers)]
        return W, self.b_dec + self.b_dec_levels[i]

    def decode(self, codes: list[EncoderOutput], prefix_len: int | None = None) -> Tensor:
        """Reconstruction ``[N, L, d]``, optionally keeping only latents < prefix_len.

        Under ``nested_decoders`` a prefix is decoded by the decoder that serves it
        (``core.level_decoders.decoder_level``: a nested size's own, between sizes the
        next size's first rows), else by the full decoder.
        """
        if prefix_len is None:
            prefix_len = self.num_latents
        check_prefix_len(prefix_len, self.num_latents)
        level = decoder_level(prefix_len, self.inner_sizes, self.num_latents)
        if level < self.num_latents:
            W_decs, b_dec = self.level_decoder(level)
            per_source = [
                source_prefix_decodes(c.top_acts, c.top_indices, [W], [prefix_len])
                for c, W in zip(codes, W_decs)
            ]
            summed = gather_targets(per_source, self.n_layers)
            return cross_layer_recons(summed, b_dec, stop_gradient=False, cumulative=False)[:, 0]
        if prefix_len < self.num_latents:
            codes = [
                EncoderOutput(*truncate_sparse(c.top_acts, c.top_indices, prefix_len), c.pre_acts)
                for c in codes
            ]
        summed = self._target_decodes(codes, [self.num_latents])
        return cross_layer_recons(summed, self.b_dec, stop_gradient=False)[:, 0]

    # -- training forward -------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        sizes: list[int] | None = None,
        dead_mask: Tensor | None = None,
    ) -> CLTOutput:
        """Loss and reconstructions for inputs/targets ``[N, L, d]``.

        ``sizes`` defaults to this step's prefixes when training a Matryoshka CLT and
        to the full width otherwise; the full width is always the last level.
        """
        self._check_input(x, "inputs")
        self._check_input(y, "targets")
        if sizes is None:
            sizes = self.step_sizes() if self.training else [self.num_latents]
        if sizes[-1] != self.num_latents:
            sizes = [*sizes, self.num_latents]
        y = y.to(self.b_dec.dtype)
        codes = self.encode(x)
        if self.training and self.cfg.matryoshka:
            for c, mass in zip(codes, self.latent_mass):
                self.sampler.observe(c.top_acts, c.top_indices)
                if self.cfg.permute_every:
                    mass.observe(c.top_acts, c.top_indices)
        recons = self.level_recons(codes, sizes)
        total_variance = target_variance(y)
        weights = level_weights(self.cfg, len(sizes))
        loss, level_fvu = cross_layer_nested_fvu(recons, y, weights, total_variance)
        recon = recons[:, -1]
        auxk = self._auxk_loss(codes, y - recon.detach(), total_variance, dead_mask)
        return CLTOutput(
            loss=loss + self.cfg.auxk_alpha * auxk,
            recon=recon,
            fvu=level_fvu[:, -1].detach(),
            level_fvu=level_fvu.detach(),
            auxk_loss=auxk.detach(),
            sizes=sizes,
            top_indices=[c.top_indices for c in codes],
        )

    def _auxk_loss(
        self,
        codes: list[EncoderOutput],
        residual: Tensor,
        total_variance: Tensor,
        dead_mask: Tensor | None,
    ) -> Tensor:
        """sparsify's AuxK per source: its top dead latents predict the residual of its targets.

        The plugin's only AuxK: sparsify computes its own inline in
        ``SparseCoder.forward`` (no function to call), and the plugin's sparsify coder
        runs that forward. A CLT source decodes into several targets, so this is the
        same formula with the source's targets' residuals, each over its own variance.
        It trains only the decoders: the encoders' pre-activations carry no gradient.
        """
        auxk = residual.new_zeros(())
        if dead_mask is None:
            return auxk
        for s, c in enumerate(codes):
            num_dead = int(dead_mask[s].sum())
            if num_dead == 0:
                continue
            k_aux = self.d_model // 2
            scale = min(num_dead / k_aux, 1.0)
            k_aux = min(k_aux, num_dead)
            dead = torch.where(dead_mask[s][None], c.pre_acts, -torch.inf)
            acts, idx = dead.topk(k_aux, sorted=False)
            e_hat = source_level_decodes(acts, idx, self.W_dec[s], [self.num_latents])[:, 0]
            err = (e_hat - residual[:, s:]).pow(2).sum(dim=(0, 2)) / total_variance[s:]
            auxk = auxk + scale * err.sum()
        return auxk

    # -- latent permutation (permute_every) ---------------------------------------
    @torch.no_grad()
    def permute_by_mass(self, optimizers=(), since_fired: Tensor | None = None) -> list[Tensor]:
        """Reorder each source layer's latents by its mass since the last reorder, largest
        first, and reset it: encoder rows and bias, decoder rows, their optimizer state
        and row ``s`` of ``since_fired``. The CLT's output is unchanged. Returns each
        source's permutation (new latent ``i`` is old latent ``perm[i]``)."""
        perms = []
        for s, mass in enumerate(self.latent_mass):
            perm = mass.order()
            tensors = [(self.W_enc[s], 0), (self.b_enc[s], 0), (self.W_dec[s], 0)]
            if since_fired is not None:
                tensors.append((since_fired[s], 0))
            permute_latents(tensors, perm, optimizers)
            mass.reset()
            perms.append(perm)
        return perms

    def latent_mass_state(self) -> list[dict]:
        return [mass.state_dict() for mass in self.latent_mass]

    def load_latent_mass_state(self, state: list[dict]) -> None:
        if len(state) != len(self.latent_mass):
            raise ValueError(f"latent mass of {len(state)} source layers, expected {len(self.latent_mass)}")
        for mass, part in zip(self.latent_mass, state):
            mass.load_state_dict(part)

    # -- evaluation --------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor, prefix_len: int | None = None) -> Tensor:
        """Reconstruction of every target's MLP output from inputs ``[N, L, d]``."""
        return self.decode(self.encode(x), prefix_len)

    @torch.no_grad()
    def prefix_fvu(
        self, x: Tensor, y: Tensor, prefix_lens: list[int] | None = None
    ) -> dict[int, list[float]]:
        """FVU per target layer at each prefix length: TopK over the full width, then latents
        >= P zeroed, decoded as ``decode`` does (a nested size's own decoder, if it has one)."""
        self._check_input(y, "targets")
        lens = sorted(set(prefix_lens or self.nested_sizes))
        for p in lens:
            check_prefix_len(p, self.num_latents)
        codes = self.encode(x)
        if self.inner_sizes:
            recons = torch.stack([self.decode(codes, p) for p in lens], dim=1)
        else:
            recons = cross_layer_recons(self._target_decodes(codes, lens), self.b_dec, stop_gradient=False)
        _, level_fvu = cross_layer_nested_fvu(
            recons, y.to(recons.dtype), [1.0] * len(lens)
        )
        return {p: level_fvu[:, i].tolist() for i, p in enumerate(lens)}

    @torch.no_grad()
    def init_biases(self, x: Tensor, y: Tensor) -> None:
        """sparsify's first-step initialisation: centred pre-activations, b_dec at the target mean."""
        self._check_input(x, "inputs")
        self._check_input(y, "targets")
        mean_in = x.to(self.b_dec.dtype).mean(0)
        for s in range(self.n_layers):
            self.b_enc[s].copy_(-self.W_enc[s] @ mean_in[s])
        self.b_dec.copy_(y.to(self.b_dec.dtype).mean(0))

    # -- state beyond weights ------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "d_model": self.d_model,
            "layers": self.layers,
            "nested_sizes_by_layer": {str(i): self.nested_sizes for i in self.layers},
            "clt": self.cfg.to_dict(),
            "source": self.source,
        }


def shared_nested_sizes(by_layer: dict) -> list[int]:
    """The one list of nested sizes every source layer shares; raise if layers differ.

    A CLT prefix keeps latents < P at every source layer at once, so per-layer
    nested sizes must agree.
    """
    distinct = {tuple(v) for v in by_layer.values()}
    if len(distinct) > 1:
        raise CLTError(
            "nested sizes differ across layers ("
            + "; ".join(f"layer {k}: {list(v)}" for k, v in by_layer.items())
            + "); a cross-layer transcoder shares one list across all source layers"
        )
    return list(next(iter(distinct))) if distinct else []


def save_clt(clt: MatryoshkaCLT, path: str | Path, extra_files: dict | None = None) -> Path:
    """Write ``config.json`` + ``clt.safetensors`` to ``path`` atomically (temp dir, then rename).

    ``extra_files`` maps file names to callables ``fn(path)`` that write into the temp dir.
    """
    from safetensors.torch import save_model

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_model(clt, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(clt.config_dict(), indent=1))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    return path


def read_clt_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a CLT directory, checked for the keys a load needs."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CLTError(f"{cfg_path} not found; a CLT directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        d = json.loads(cfg_path.read_text())
        if d.get("format") != FORMAT:
            raise KeyError("format")
        d["d_model"], d["layers"], d["clt"]  # noqa: B018
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CLTError(f"{cfg_path} is not a matryoshka CLT config (missing or bad {e})") from None
    return d


def load_clt(path: str | Path, device: str | torch.device = "cpu") -> MatryoshkaCLT:
    """Load a CLT directory written by ``save_clt``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    d = read_clt_config(path)
    cfg = CLTConfig.from_dict(d["clt"])
    clt = MatryoshkaCLT(int(d["d_model"]), list(d["layers"]), cfg, device=device)
    if cfg.matryoshka and "nested_sizes_by_layer" in d:
        shared = shared_nested_sizes(d["nested_sizes_by_layer"])
        # Sampled schedules record the width only; fixed ones must match the config;
        # the adaptive schedule records where training left its levels.
        if cfg.prefix_schedule == "adaptive":
            try:
                clt.sampler.adopt_sizes(shared)
            except ValueError as e:
                raise CLTError(f"{path / CONFIG_FILE}: {e}") from None
        elif shared and shared != clt.nested_sizes:
            raise CLTError(
                f"{path / CONFIG_FILE}: recorded nested sizes {shared} do not match the "
                f"config's {clt.nested_sizes}"
            )
    clt.source = dict(d.get("source") or {})
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CLTError(f"{weights} not found")
    try:
        load_model(clt, str(weights), device=str(device), strict=True)
    except SafetensorError as e:
        raise CLTError(f"{weights} is not a readable safetensors file ({e})") from None
    except RuntimeError as e:
        msg = str(e).replace("\n", " ").replace("\t", "")
        raise CLTError(f"{weights} does not match {path / CONFIG_FILE}: {msg}") from None
    return clt.eval()
