"""Which prefix lengths to evaluate, the coder's output at one, and FVU/MSE/L0/RSA per prefix.

A prefix model of length P is the full coder with every latent >= P switched off after
the activation (TopK over the full width, then truncation), as in
``core.truncation.truncate_sparse``. A coder trained with ``nested_decoders`` decodes a
prefix with the decoder trained for it (``core.level_decoders.decoder_level``).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.errors import UsageError
from ..core.level_decoders import decoder_level
from ..core.nested import prefix_decodes
from ..core.prefixes import check_prefix_len, default_prefix_ladder
from ..core.truncation import truncate_sparse

DEFAULT_CHUNK = 4096
"""Rows encoded at once: bounds memory on long held-out sets."""


def default_prefix_lens(coder) -> list[int]:
    """A Matryoshka coder's nested sizes, else powers of two up to the width."""
    return default_prefix_ladder(coder.num_latents, getattr(coder, "nested_sizes", ()))


def prefix_lens_to_evaluate(coder, prefix_lens: Sequence[int] | None) -> list[int]:
    """The prefix lengths asked for, checked, sorted and without repeats (default if None).

    Unlike ``core.prefixes.check_prefix_lens`` a repeated length is not an error here:
    a report has one row per distinct length, in increasing order.
    """
    lens = default_prefix_lens(coder) if prefix_lens is None else list(prefix_lens)
    if not lens:
        raise UsageError("prefix_lens is empty; give at least one length in 1..width")
    return sorted({check_prefix_len(p, coder.num_latents) for p in lens})


def row_chunks(n: int, size: int):
    """Slices of ``size`` rows covering ``0..n``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _skip(coder, x: Tensor):
    return x.to(coder.dtype) @ coder.W_skip.mT if coder.W_skip is not None else 0


def level_decoder_sizes(coder) -> list[int]:
    """The nested sizes below the width that have their own decoder (``nested_decoders``)."""
    return [int(W.shape[0]) for W in getattr(coder, "W_dec_levels", ())]


def prefix_decode(coder, top_acts: Tensor, top_indices: Tensor, prefix_len: int) -> Tensor:
    """Decode the latents below ``prefix_len`` (no skip term) with the decoder that serves
    that prefix: the level's own under ``nested_decoders``, else the full decoder."""
    sizes = level_decoder_sizes(coder)
    level = decoder_level(prefix_len, sizes, coder.num_latents)
    if level == coder.num_latents:
        return coder.decode(*truncate_sparse(top_acts, top_indices, prefix_len))
    i = sizes.index(level)
    W, b_offset = coder.W_dec_levels[i], coder.b_dec_levels[i]
    recon = prefix_decodes(top_acts, top_indices, [W], [prefix_len])[:, 0]
    return recon + coder.b_dec + b_offset


@torch.no_grad()
def reconstruct(coder, x: Tensor, prefix_len: int | None = None) -> Tensor:
    """The coder's output for ``x`` with latents >= ``prefix_len`` switched off."""
    top_acts, top_indices, _ = coder.encode(x)
    p = coder.num_latents if prefix_len is None else prefix_len
    return prefix_decode(coder, top_acts, top_indices, p) + _skip(coder, x)


@torch.no_grad()
def rsa(original: Tensor, reconstructed: Tensor) -> float:
    """Representational similarity (seed 003): Pearson correlation of the upper
    triangles of the two Euclidean distance matrices.

    NaN when either distance matrix is constant (correlation is undefined there).
    """
    if original.shape != reconstructed.shape or original.shape[0] < 3:
        raise UsageError(
            f"rsa needs two [n >= 3, d] matrices of one shape, got "
            f"{tuple(original.shape)} and {tuple(reconstructed.shape)}"
        )
    a, b = original.double(), reconstructed.double()
    iu = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    da = torch.cdist(a, a)[iu[0], iu[1]]
    db = torch.cdist(b, b)[iu[0], iu[1]]
    da, db = da - da.mean(), db - db.mean()
    denom = da.norm() * db.norm()
    if denom == 0:
        return float("nan")
    return float((da @ db) / denom)


@torch.no_grad()
def prefix_curve(
    coder,
    x: Tensor,
    y: Tensor | None = None,
    prefix_lens: Sequence[int] | None = None,
    *,
    rsa_samples: int = 1000,
    chunk_size: int = DEFAULT_CHUNK,
) -> list[dict]:
    """FVU, MSE, L0 and RSA of the coder truncated to each prefix length.

    FVU divides the summed squared error by the summed squared deviation of ``y`` from
    its mean over all rows, as sparsify does over a batch. RSA uses the first
    ``rsa_samples`` rows (0 skips it).
    """
    y = x if y is None else y
    lens = prefix_lens_to_evaluate(coder, prefix_lens)
    total_var = (y.double() - y.double().mean(0)).pow(2).sum()
    sse = torch.zeros(len(lens), dtype=torch.float64)
    active = torch.zeros(len(lens), dtype=torch.float64)
    n_rsa = min(rsa_samples, x.shape[0]) if rsa_samples >= 3 else 0
    rsa_recons: list[list[Tensor]] = [[] for _ in lens]
    for sl in row_chunks(x.shape[0], chunk_size):
        xc, yc = x[sl], y[sl]
        # One encode serves every prefix: truncation happens after the TopK.
        top_acts, top_indices, _ = coder.encode(xc)
        skip = _skip(coder, xc)
        for i, p in enumerate(lens):
            recon = prefix_decode(coder, top_acts, top_indices, p) + skip
            sse[i] += (yc - recon).double().pow(2).sum()
            active[i] += ((top_acts > 0) & (top_indices < p)).sum()
            if sl.start < n_rsa:
                rsa_recons[i].append(recon[: n_rsa - sl.start].float())
    n, d = y.shape
    curve = []
    for i, p in enumerate(lens):
        row = {
            "prefix_len": p,
            "fvu": float(sse[i] / total_var) if total_var > 0 else float("nan"),
            "mse": float(sse[i] / (n * d)),
            "l0": float(active[i] / n),
        }
        if n_rsa:
            row["rsa"] = rsa(y[:n_rsa].float(), torch.cat(rsa_recons[i]))
        curve.append(row)
    return curve
