"""A toy model with known, hierarchical features, and metrics against its ground truth.

Activations are sparse sums of known unit directions. Features come in three kinds:

- parents, which fire independently;
- children, each belonging to one parent, which can only fire when their parent does
  (at most one child per parent at a time, as in Chanin et al.'s "toy models of
  feature absorption" and Nabeshima's Matryoshka toy);
- independent features with no hierarchy, so the dictionary has more to learn than the
  tree.

Metrics compare a trained coder with that ground truth:

- ``absorption``: Chanin et al.'s *full absorption*. For a parent feature ``p`` and its
  main latent ``m`` (the latent whose decoder row is closest in cosine to ``p``'s
  direction), take every sample where one of ``p``'s children fires. The sample is
  absorbed when ``m`` does not fire while some other latent that does fire carries at
  least ``projection_threshold`` of the parent's magnitude along ``p``'s direction
  (activation x decoder-row . direction). The rate is absorbed samples over
  child-active samples, averaged over parents.
- ``splitting``: each latent is assigned to the true feature it is closest to (decoder
  cosine above ``split_cosine``); a feature is split when two or more latents are
  assigned to it.
- ``best_match_cosine``: for each true feature, the largest cosine between its
  direction and any decoder row.
"""

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .core.errors import UsageError


@dataclass
class ToyConfig:
    d_model: int = 64
    """Dimension of the activations."""

    n_parents: int = 8
    """Number of parent features."""

    children_per_parent: int = 3
    """Number of child features under each parent; children of one parent are mutually exclusive."""

    n_independent: int = 16
    """Number of features outside the hierarchy, each firing on its own."""

    parent_prob: float = 0.15
    """Probability that each parent fires in a sample."""

    child_prob: float = 0.8
    """Probability, given its parent fires, that one of the parent's children fires."""

    independent_prob: float = 0.05
    """Probability that each independent feature fires in a sample."""

    magnitude_std: float = 0.15
    """Standard deviation of a firing feature's magnitude around 1 (clamped positive)."""

    seed: int = 0
    """Seed of the feature directions (samples take their own generator)."""

    def __post_init__(self):
        for name in ("d_model", "n_parents", "children_per_parent"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_independent < 0:
            raise UsageError(f"n_independent={self.n_independent} must be >= 0")
        for name in ("parent_prob", "child_prob", "independent_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.magnitude_std < 0:
            raise UsageError(f"magnitude_std={self.magnitude_std} must be >= 0")

    @property
    def n_children(self) -> int:
        return self.n_parents * self.children_per_parent

    @property
    def n_features(self) -> int:
        return self.n_parents + self.n_children + self.n_independent


class ToyModel:
    """Feature directions and a sampler for the hierarchical toy.

    Feature order: parents ``[0, P)``, then children grouped by parent, then the
    independent features. ``parent_of[c]`` gives each child's parent.
    """

    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        raw = torch.randn(cfg.n_features, cfg.d_model, generator=g)
        if cfg.n_features <= cfg.d_model:
            # Orthonormal directions keep the ground truth unambiguous: any mixing a
            # coder shows comes from training, not from interference between features.
            q, _ = torch.linalg.qr(raw.T)
            raw = q.T
        self.directions = raw / raw.norm(dim=1, keepdim=True)
        P, C = cfg.n_parents, cfg.children_per_parent
        self.parents = torch.arange(P)
        self.children = P + torch.arange(P * C).view(P, C)
        self.independent = torch.arange(P + P * C, cfg.n_features)

    def sample_features(self, n: int, generator: torch.Generator) -> Tensor:
        """Feature magnitudes ``[n, n_features]``; zero where a feature is off."""
        cfg = self.cfg
        P, C = cfg.n_parents, cfg.children_per_parent
        on = torch.zeros(n, cfg.n_features, dtype=torch.bool)
        parent_on = torch.rand(n, P, generator=generator) < cfg.parent_prob
        on[:, :P] = parent_on
        child_fires = parent_on & (torch.rand(n, P, generator=generator) < cfg.child_prob)
        which = torch.randint(C, (n, P), generator=generator)
        child_on = torch.zeros(n, P, C, dtype=torch.bool)
        child_on.scatter_(2, which[..., None], child_fires[..., None])
        on[:, P : P + P * C] = child_on.view(n, P * C)
        if cfg.n_independent:
            on[:, P + P * C :] = (
                torch.rand(n, cfg.n_independent, generator=generator)
                < cfg.independent_prob
            )
        mags = 1 + cfg.magnitude_std * torch.randn(n, cfg.n_features, generator=generator)
        return mags.clamp_min(0.05) * on

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``n`` activations ``[n, d_model]`` and their feature magnitudes."""
        feats = self.sample_features(n, torch.Generator().manual_seed(seed))
        return feats @ self.directions, feats


def _decoder_rows(coder) -> Tensor:
    W = coder.W_dec.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def dense_codes(coder, x: Tensor) -> Tensor:
    """The coder's latent activations as a dense ``[n, num_latents]`` matrix."""
    top_acts, top_indices, _ = coder.encode(x)
    dense = torch.zeros(x.shape[0], coder.num_latents, dtype=top_acts.dtype)
    # scatter_add: BatchTopK pads rows with repeated indices at activation 0.
    return dense.scatter_add_(1, top_indices, top_acts).float()


@torch.no_grad()
def feature_cosines(coder, toy: ToyModel) -> Tensor:
    """Cosine between each true direction and each decoder row, ``[features, latents]``."""
    return toy.directions @ _decoder_rows(coder).T


@torch.no_grad()
def absorption(
    coder,
    toy: ToyModel,
    x: Tensor,
    feats: Tensor,
    *,
    projection_threshold: float = 0.4,
) -> dict:
    """Full-absorption rate of each parent (see the module docstring), and their mean.

    Also reports ``parent_miss_rate``: how often the parent's main latent is silent
    when a child fires, whether or not another latent makes up for it.
    """
    acts = dense_codes(coder, x)
    W = _decoder_rows(coder)
    cos = feature_cosines(coder, toy)
    per_parent, misses, counts = [], [], []
    for p in toy.parents.tolist():
        main = int(cos[p].argmax())
        child_active = (feats[:, toy.children[p]] > 0).any(dim=1)
        n = int(child_active.sum())
        counts.append(n)
        if n == 0:
            per_parent.append(float("nan"))
            misses.append(float("nan"))
            continue
        a = acts[child_active]
        silent = a[:, main] <= 0
        # Each firing latent's contribution along the parent's direction.
        along = a * (W @ toy.directions[p])[None, :]
        along[:, main] = 0
        compensated = along.max(dim=1).values >= projection_threshold * feats[child_active, p]
        per_parent.append(float((silent & compensated).float().mean()))
        misses.append(float(silent.float().mean()))
    rates = torch.tensor(per_parent)
    miss = torch.tensor(misses)
    return {
        "absorption_rate": float(rates.nanmean()),
        "parent_miss_rate": float(miss.nanmean()),
        "per_parent": per_parent,
        "child_active_samples": counts,
        "projection_threshold": projection_threshold,
    }


@torch.no_grad()
def splitting(coder, toy: ToyModel, *, split_cosine: float = 0.5) -> dict:
    """How many latents each true feature has (see the module docstring)."""
    cos = feature_cosines(coder, toy)
    best_cos, best_feature = cos.max(dim=0)
    assigned = best_feature[best_cos > split_cosine]
    per_feature = torch.bincount(assigned, minlength=toy.cfg.n_features)
    return {
        "split_fraction": float((per_feature >= 2).float().mean()),
        "mean_latents_per_feature": float(per_feature.float().mean()),
        "unmatched_fraction": float((per_feature == 0).float().mean()),
        "latents_per_feature": per_feature.tolist(),
        "split_cosine": split_cosine,
    }


@torch.no_grad()
def best_match_cosine(coder, toy: ToyModel) -> dict:
    """Each true feature's best decoder cosine, and the mean per feature kind."""
    best = feature_cosines(coder, toy).max(dim=1).values
    return {
        "mean": float(best.mean()),
        "parents": float(best[toy.parents].mean()),
        "children": float(best[toy.children.flatten()].mean()),
        "independent": float(best[toy.independent].mean()) if len(toy.independent) else None,
        "per_feature": best.tolist(),
    }


@torch.no_grad()
def ground_truth_metrics(coder, toy: ToyModel, x: Tensor, feats: Tensor) -> dict:
    """Absorption, splitting and best-match cosine of ``coder`` on held-out toy data."""
    return {
        "absorption": absorption(coder, toy, x, feats),
        "splitting": splitting(coder, toy),
        "best_match_cosine": best_match_cosine(coder, toy),
        "toy": asdict(toy.cfg),
    }
