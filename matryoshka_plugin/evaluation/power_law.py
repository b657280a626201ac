"""Power-law fits of per-latent importance against rank (seed 003, section 3).

Three importance measures: mean squared activation, activation frequency, and the
eigenvalues of the decoder's covariance.
"""

import torch
from torch import Tensor

from ..core.errors import UsageError
from .latent_stats import latent_activation_sums
from .prefix_metrics import DEFAULT_CHUNK


def power_law_fit(values: Tensor, *, trim: float = 0.0) -> dict:
    """Least-squares fit of log10(value) = a + b log10(rank), values sorted descending.

    ``trim`` drops that fraction of ranks at each end first (seed 003 sees the power law
    in the middle range, with a steeper tail). Zero values cannot be fitted and are
    dropped. Returns the exponent ``b``, the intercept, R^2 and the number of points.
    """
    if not 0 <= trim < 0.5:
        raise UsageError(f"trim={trim} must be in [0, 0.5)")
    v = values.detach().double().flatten().sort(descending=True).values
    rank = torch.arange(1, len(v) + 1, dtype=torch.float64)
    lo, hi = int(len(v) * trim), len(v) - int(len(v) * trim)
    v, rank = v[lo:hi], rank[lo:hi]
    keep = v > 0
    v, rank = v[keep], rank[keep]
    if len(v) < 2:
        return {"exponent": float("nan"), "intercept": float("nan"), "r2": float("nan"), "n": len(v)}
    lx, ly = rank.log10(), v.log10()
    A = torch.stack([torch.ones_like(lx), lx], dim=1)
    coef = torch.linalg.lstsq(A, ly[:, None]).solution.flatten()
    resid = ly - A @ coef
    ss_tot = (ly - ly.mean()).pow(2).sum()
    r2 = float(1 - resid.pow(2).sum() / ss_tot) if ss_tot > 0 else 1.0
    return {"exponent": float(coef[1]), "intercept": float(coef[0]), "r2": r2, "n": len(v)}


@torch.no_grad()
def dictionary_power_law(
    coder, x: Tensor, *, trim: float = 0.0, chunk_size: int = DEFAULT_CHUNK
) -> dict:
    """Power-law fits of mean squared activation, frequency and decoder covariance spectrum."""
    counts, sumsq, _ = latent_activation_sums(coder, x, chunk_size=chunk_size)
    n = x.shape[0]
    W = coder.W_dec.detach().double()
    eig = torch.linalg.eigvalsh(torch.cov(W.T))
    # With fewer latents than dimensions the covariance is rank-deficient; its
    # round-off "eigenvalues" are not part of the spectrum.
    eig = eig[eig > eig.max() * 1e-10]
    return {
        "mean_squared_activation": power_law_fit(sumsq / n, trim=trim),
        "frequency": power_law_fit(counts / n, trim=trim),
        "decoder_covariance_eigenvalues": power_law_fit(eig, trim=trim),
        "trim": trim,
    }
