"""A toy model with known, hierarchical features, and metrics against its ground truth.

Activations are sparse sums of known unit directions. Features come in three kinds:

- parents, which fire independently;
- children, each belonging to one parent, which can only fire when their parent does
  (at most one child per parent at a time, as in Chanin et al.'s "toy models of
  feature absorption" and Nabeshima's Matryoshka toy);
- independent features with no hierarchy, so the dictionary has more to learn than the
  tree;
- optionally grandchildren (``grandchildren_per_child``), a third level under each child
  with the same rule, for a 3-level tree.

By default the directions are orthonormal when they fit in ``d_model``. The harder
variants (``hard_toy_config``) make them non-orthogonal: random directions
(``orthogonal=False``), descendants planted at cosine ``descendant_cosine`` to their
ancestor, and pairs of parents that fire together (``parent_correlation``).

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

    grandchildren_per_child: int = 0
    """Features under each child (a third tree level), mutually exclusive; 0 gives a 2-level tree."""

    grandchild_prob: float = 0.8
    """Probability, given its child fires, that one of the child's grandchildren fires."""

    orthogonal: bool = True
    """Orthonormal directions when they fit in d_model; False keeps random (non-orthogonal) ones."""

    descendant_cosine: float = 0.0
    """Cosine planted between each child (grandchild) direction and its parent (child); 0 leaves them as drawn."""

    parent_correlation: float = 0.0
    """Probability that parent 2i+1 copies parent 2i's firing instead of drawing its own (same marginal rate)."""

    def __post_init__(self):
        for name in ("d_model", "n_parents", "children_per_parent"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_independent < 0:
            raise UsageError(f"n_independent={self.n_independent} must be >= 0")
        if self.grandchildren_per_child < 0:
            raise UsageError(f"grandchildren_per_child={self.grandchildren_per_child} must be >= 0")
        if not 0 <= self.descendant_cosine < 1:
            raise UsageError(f"descendant_cosine={self.descendant_cosine} must be in [0, 1)")
        for name in ("parent_prob", "child_prob", "independent_prob", "grandchild_prob",
                     "parent_correlation"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.magnitude_std < 0:
            raise UsageError(f"magnitude_std={self.magnitude_std} must be >= 0")

    @property
    def n_children(self) -> int:
        return self.n_parents * self.children_per_parent

    @property
    def n_grandchildren(self) -> int:
        return self.n_children * self.grandchildren_per_child

    @property
    def n_features(self) -> int:
        return self.n_parents + self.n_children + self.n_independent + self.n_grandchildren

    def true_l0(self) -> float:
        """Expected number of features firing per sample."""
        parents = self.n_parents * self.parent_prob
        children = parents * self.child_prob
        grandchildren = children * self.grandchild_prob * (self.grandchildren_per_child > 0)
        return parents + children + grandchildren + self.n_independent * self.independent_prob


def hard_toy_config(seed: int = 0, **overrides) -> ToyConfig:
    """A harder planted hierarchy than the default toy.

    A 3-level tree (8 parents x 3 children x 2 grandchildren) plus 16 independent
    features: 96 features in 32 dimensions, so directions interfere; descendants sit at
    cosine 0.3 to their ancestor and pairs of parents fire together half the time.
    The true L0 is about 3.7.
    """
    fields = dict(
        d_model=32, grandchildren_per_child=2, orthogonal=False, descendant_cosine=0.3,
        parent_correlation=0.5, seed=seed,
    )
    return ToyConfig(**{**fields, **overrides})


def _at_cosine(v: Tensor, anchor: Tensor, cosine: float) -> Tensor:
    """Unit rows at exactly ``cosine`` to the unit rows of ``anchor``, in the plane of ``v``."""
    ortho = v - (v * anchor).sum(1, keepdim=True) * anchor
    ortho = ortho / ortho.norm(dim=1, keepdim=True)
    return cosine * anchor + (1 - cosine**2) ** 0.5 * ortho


class ToyModel:
    """Feature directions and a sampler for the hierarchical toy.

    Feature order: parents ``[0, P)``, then children grouped by parent, then the
    independent features, then grandchildren grouped by child (``grandchildren[c]``
    indexes child ``c``'s, with ``c`` counted from 0 within the children).
    """

    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        raw = torch.randn(cfg.n_features, cfg.d_model, generator=g)
        if cfg.orthogonal and cfg.n_features <= cfg.d_model:
            # Orthonormal directions keep the ground truth unambiguous: any mixing a
            # coder shows comes from training, not from interference between features.
            q, _ = torch.linalg.qr(raw.T)
            raw = q.T
        directions = raw / raw.norm(dim=1, keepdim=True)
        P, C, G = cfg.n_parents, cfg.children_per_parent, cfg.grandchildren_per_child
        self.parents = torch.arange(P)
        self.children = P + torch.arange(P * C).view(P, C)
        first_grandchild = P + P * C + cfg.n_independent
        self.independent = torch.arange(P + P * C, first_grandchild)
        self.grandchildren = first_grandchild + torch.arange(P * C * G).view(P * C, G)
        if cfg.descendant_cosine:
            # Parents first, then children, then grandchildren: each descendant is bent
            # towards its (already bent) ancestor.
            ancestors = [(self.children, self.parents[:, None].expand(P, C))]
            ancestors.append((self.grandchildren, self.children.flatten()[:, None].expand(P * C, G)))
            for kids, elders in ancestors:
                kids, elders = kids.flatten(), elders.flatten()
                directions[kids] = _at_cosine(directions[kids], directions[elders], cfg.descendant_cosine)
        self.directions = directions

    def sample_features(self, n: int, generator: torch.Generator) -> Tensor:
        """Feature magnitudes ``[n, n_features]``; zero where a feature is off."""
        cfg = self.cfg
        P, C = cfg.n_parents, cfg.children_per_parent
        on = torch.zeros(n, cfg.n_features, dtype=torch.bool)
        parent_on = torch.rand(n, P, generator=generator) < cfg.parent_prob
        if cfg.parent_correlation:
            copy = torch.rand(n, P // 2, generator=generator) < cfg.parent_correlation
            odd = parent_on[:, 1 : 2 * (P // 2) : 2]
            parent_on[:, 1 : 2 * (P // 2) : 2] = torch.where(copy, parent_on[:, 0 : 2 * (P // 2) : 2], odd)
        on[:, :P] = parent_on
        child_fires = parent_on & (torch.rand(n, P, generator=generator) < cfg.child_prob)
        which = torch.randint(C, (n, P), generator=generator)
        child_on = torch.zeros(n, P, C, dtype=torch.bool)
        child_on.scatter_(2, which[..., None], child_fires[..., None])
        on[:, P : P + P * C] = child_on.view(n, P * C)
        if cfg.n_independent:
            on[:, self.independent] = (
                torch.rand(n, cfg.n_independent, generator=generator)
                < cfg.independent_prob
            )
        if G := cfg.grandchildren_per_child:
            child_on = child_on.view(n, P * C)
            gc_fires = child_on & (torch.rand(n, P * C, generator=generator) < cfg.grandchild_prob)
            which = torch.randint(G, (n, P * C), generator=generator)
            gc_on = torch.zeros(n, P * C, G, dtype=torch.bool)
            gc_on.scatter_(2, which[..., None], gc_fires[..., None])
            on[:, self.grandchildren.flatten()] = gc_on.view(n, P * C * G)
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
        # Grandchildren only fire with a child, so this is every sample with a descendant.
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
        "grandchildren": float(best[toy.grandchildren.flatten()].mean()) if toy.grandchildren.numel() else None,
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


@torch.no_grad()
def oracle_fvu(toy: ToyModel, feats: Tensor, k: int, *, absorb: bool) -> float:
    """FVU of a perfect coder that keeps ``k`` units per sample, with or without absorption.

    Without absorption each firing feature is its own unit (its true direction and
    magnitude); with it, each parent's whole firing chain (parent, child, grandchild)
    is one unit, as a coder whose child latents absorbed their ancestors encodes it.
    Each sample keeps its ``k`` units of largest norm. When the true L0 exceeds ``k``,
    the absorbing coder drops less, so at a fixed k absorption lowers the FVU.
    """
    x = feats @ toy.directions
    units = feats[:, :, None] * toy.directions[None]  # [n, features, d]
    if absorb:
        chain = torch.zeros(toy.cfg.n_features, dtype=torch.long)
        chain[toy.parents] = toy.parents
        chain[toy.children.flatten()] = toy.parents[:, None].expand_as(toy.children).flatten()
        if toy.grandchildren.numel():
            gc_parent = chain[toy.children.flatten()][:, None].expand_as(toy.grandchildren)
            chain[toy.grandchildren.flatten()] = gc_parent.flatten()
        chain[toy.independent] = toy.independent
        units = torch.zeros_like(units).index_add_(1, chain, units)
    norms = units.norm(dim=2)
    keep = norms.topk(min(k, norms.shape[1]), dim=1).indices
    recon = units.gather(1, keep[..., None].expand(-1, -1, units.shape[2])).sum(1)
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
