"""Evaluation of sparse coders as progressive (prefix) coders.

Works on any sparsify ``SparseCoder`` or plugin ``MatryoshkaSparseCoder``. A prefix
model of length P is the full coder with every latent >= P switched off after the
activation (TopK over the full width, then truncation), as in
``core.truncation.truncate_sparse``.

Metrics:

- ``prefix_curve``: FVU, MSE, L0 and RSA at each prefix length, on held-out activations.
- ``latent_stats``: L0, dead and dense latents, activation frequency per level.
- ``dictionary_power_law``: power-law fits of per-latent importance against rank
  (seed 003, section 3: mean squared activation, activation frequency, and the
  eigenvalues of the decoder's covariance).
- ``rsa``: representational similarity (seed 003): Pearson correlation of the
  Euclidean distance matrices of the original and reconstructed activations.
- ``spliced_lm_metrics``: cross-entropy, loss recovered and KL divergence per prefix
  with the coder spliced into a Hugging Face causal LM at a hookpoint.
- ``reorder_by_mean_squared_activation``: turns a vanilla coder into a progressive one
  by sorting its latents by importance (seed 003, section 4).

``main`` is the ``matryoshka-eval`` command.
"""

import argparse
import copy
import json
import operator
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .atomic import atomic_write, atomic_write_text
from .core.prefixes import check_prefix_len
from .core.truncation import truncate_sparse
from .core.errors import UsageError

DEFAULT_CHUNK = 4096


# -- helpers ---------------------------------------------------------------------
def default_prefix_lens(coder) -> list[int]:
    """A Matryoshka coder's nested sizes, else powers of two up to the width."""
    width = coder.num_latents
    sizes = list(getattr(coder, "nested_sizes", []) or [])
    if len(sizes) > 1:
        return sizes
    lens, p = [], 1
    while p < width:
        lens.append(p)
        p *= 2
    return lens + [width]


def _checked_prefix_lens(coder, prefix_lens) -> list[int]:
    lens = default_prefix_lens(coder) if prefix_lens is None else list(prefix_lens)
    if not lens:
        raise ValueError("prefix_lens is empty; give at least one length in 1..width")
    checked = set()
    for p in lens:
        try:
            p = operator.index(p)  # numpy/torch integers are fine; 2.5 is not
        except TypeError:
            pass
        checked.add(check_prefix_len(p, coder.num_latents))
    return sorted(checked)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _skip(coder, x: Tensor):
    return x.to(coder.dtype) @ coder.W_skip.mT if coder.W_skip is not None else 0


def _level_bounds(coder, levels: Sequence[int] | None) -> list[int]:
    sizes = list(levels) if levels is not None else default_prefix_lens(coder)
    if not sizes or sizes[-1] != coder.num_latents:
        sizes = [s for s in sizes if s < coder.num_latents] + [coder.num_latents]
    return sizes


@torch.no_grad()
def reconstruct(coder, x: Tensor, prefix_len: int | None = None) -> Tensor:
    """The coder's output for ``x`` with latents >= ``prefix_len`` switched off."""
    top_acts, top_indices, _ = coder.encode(x)
    if prefix_len is not None and prefix_len < coder.num_latents:
        top_acts, top_indices = truncate_sparse(top_acts, top_indices, prefix_len)
    return coder.decode(top_acts, top_indices) + _skip(coder, x)


# -- RSA -------------------------------------------------------------------------
@torch.no_grad()
def rsa(original: Tensor, reconstructed: Tensor) -> float:
    """Pearson correlation of the upper triangles of the two Euclidean distance matrices.

    NaN when either distance matrix is constant (correlation is undefined there).
    """
    if original.shape != reconstructed.shape or original.shape[0] < 3:
        raise ValueError(
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


# -- FVU / MSE / RSA per prefix ------------------------------------------------------
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
    lens = _checked_prefix_lens(coder, prefix_lens)
    total_var = (y.double() - y.double().mean(0)).pow(2).sum()
    sse = torch.zeros(len(lens), dtype=torch.float64)
    active = torch.zeros(len(lens), dtype=torch.float64)
    n_rsa = min(rsa_samples, x.shape[0]) if rsa_samples >= 3 else 0
    rsa_recons: list[list[Tensor]] = [[] for _ in lens]
    for sl in _chunks(x.shape[0], chunk_size):
        xc, yc = x[sl], y[sl]
        top_acts, top_indices, _ = coder.encode(xc)
        skip = _skip(coder, xc)
        for i, p in enumerate(lens):
            acts, idx = truncate_sparse(top_acts, top_indices, p)
            recon = coder.decode(acts, idx) + skip
            sse[i] += (yc - recon).double().pow(2).sum()
            active[i] += (acts > 0).sum()
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


# -- latent statistics -----------------------------------------------------------
@torch.no_grad()
def latent_activation_sums(
    coder, x: Tensor, *, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-latent firing counts and summed squared activations, and active latents per row."""
    width = coder.num_latents
    counts = torch.zeros(width, dtype=torch.float64)
    sumsq = torch.zeros(width, dtype=torch.float64)
    per_row = []
    for sl in _chunks(x.shape[0], chunk_size):
        top_acts, top_indices, _ = coder.encode(x[sl])
        # BatchTopK pads rows with repeated indices at activation 0: count only firing.
        fired = top_acts > 0
        counts += torch.bincount(top_indices[fired], minlength=width).double()
        sumsq += torch.bincount(
            top_indices.flatten(), weights=top_acts.double().pow(2).flatten(), minlength=width
        )
        per_row.append(fired.sum(dim=1))
    return counts, sumsq, torch.cat(per_row)


@torch.no_grad()
def latent_stats(
    coder,
    x: Tensor,
    levels: Sequence[int] | None = None,
    *,
    dense_threshold: float = 0.1,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict:
    """L0, dead and dense latents overall and per level (group between nested sizes).

    A latent is dead if it never fires on ``x`` and dense if it fires on more than
    ``dense_threshold`` of the rows.
    """
    counts, _, per_row = latent_activation_sums(coder, x, chunk_size=chunk_size)
    freq = counts / x.shape[0]
    bounds = _level_bounds(coder, levels)
    per_level, start = [], 0
    for end in bounds:
        f = freq[start:end]
        per_level.append({
            "start": start,
            "end": end,
            "mean_frequency": float(f.mean()),
            "l0_share": float(counts[start:end].sum() / max(counts.sum(), 1)),
            "dead": int((f == 0).sum()),
            "dense": int((f > dense_threshold).sum()),
        })
        start = end
    return {
        "l0": float(per_row.double().mean()),
        "dead": int((freq == 0).sum()),
        "dense": int((freq > dense_threshold).sum()),
        "dense_threshold": dense_threshold,
        "levels": per_level,
        "frequency": freq.tolist(),
    }


# -- dictionary power law ------------------------------------------------------------
def power_law_fit(values: Tensor, *, trim: float = 0.0) -> dict:
    """Least-squares fit of log10(value) = a + b log10(rank), values sorted descending.

    ``trim`` drops that fraction of ranks at each end first (seed 003 sees the power law
    in the middle range, with a steeper tail). Zero values cannot be fitted and are
    dropped. Returns the exponent ``b``, the intercept, R^2 and the number of points.
    """
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim={trim} must be in [0, 0.5)")
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


# -- reordering a vanilla coder into a progressive one ---------------------------
@torch.no_grad()
def permute_latents(coder, perm: Tensor):
    """A copy of ``coder`` whose latent ``i`` is the original's latent ``perm[i]``.

    Encoder rows, encoder bias and decoder rows move together, so every output is
    unchanged (seed 003, section 4: latents are conditionally independent).
    """
    width = coder.num_latents
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (width,) or not torch.equal(perm.sort().values, torch.arange(width)):
        raise ValueError(f"perm must be a permutation of 0..{width - 1}")
    if len(getattr(coder, "W_dec_levels", ())):
        raise ValueError(
            "cannot permute a coder with nested_decoders: its per-level decoders "
            "are tied to the latent order it was trained with"
        )
    new = copy.deepcopy(coder)
    p = perm.to(coder.encoder.weight.device)
    new.encoder.weight.copy_(coder.encoder.weight[p])
    new.encoder.bias.copy_(coder.encoder.bias[p])
    if coder.W_dec is not None:
        new.W_dec.copy_(coder.W_dec[p])
    return new


@torch.no_grad()
def reorder_by_mean_squared_activation(
    coder, x: Tensor, *, chunk_size: int = DEFAULT_CHUNK
) -> tuple[object, Tensor]:
    """The coder with latents sorted by descending mean squared activation on ``x``.

    Returns the reordered copy and the permutation (new index -> old index). Ties keep
    the original order, so the result is deterministic.
    """
    _, sumsq, _ = latent_activation_sums(coder, x, chunk_size=chunk_size)
    perm = torch.sort(-sumsq, stable=True).indices
    return permute_latents(coder, perm), perm


# -- the coder spliced into a language model ----------------------------------------
def _hook_module(model, hookpoint: str):
    base = getattr(model, "base_model", model)
    try:
        return base.get_submodule(hookpoint)
    except AttributeError:
        names = [n for n, _ in base.named_modules() if n][:8]
        raise ValueError(
            f"hookpoint {hookpoint!r} is not a submodule of the model "
            f"(names look like: {', '.join(names)}, ...)"
        ) from None


@contextmanager
def spliced(
    model, coder, hookpoint: str, prefix_len: int | None = None, *, ablate=False, first_position: int = 0
):
    """Replace the hookpoint module's output by the coder's (or by zeros if ``ablate``).

    A transcoder reads the module's input, an autoencoder its output. Sequence
    outputs that are tuples get their first element replaced. Positions before
    ``first_position`` keep the module's own output: a coder trained without position
    0 (activation caches skip that outlier) is then neither tested nor ablated there.
    """
    module = _hook_module(model, hookpoint)

    def hook(mod, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if ablate:
            new = torch.zeros_like(out)
        else:
            src = args[0] if coder.cfg.transcode else out
            flat = src.reshape(-1, src.shape[-1]).to(coder.dtype)
            new = reconstruct(coder, flat, prefix_len).view_as(out).to(out.dtype)
        if first_position:
            new = torch.cat([out[:, :first_position], new[:, first_position:]], dim=1)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def spliced_lm_metrics(
    model,
    coder,
    hookpoint: str,
    token_batches: Iterable[Tensor],
    prefix_lens: Sequence[int] | None = None,
    *,
    first_position: int = 0,
) -> dict:
    """Next-token CE, loss recovered and KL(clean || spliced) at each prefix length.

    Loss recovered is ``(ce_ablated - ce_spliced) / (ce_ablated - ce_clean)``, with the
    hookpoint's output zero-ablated as the reference. KL is averaged over predicted
    positions. ``token_batches`` are ``[batch, seq]`` token-id tensors without padding.
    Splicing and ablation start at ``first_position`` (see ``spliced``).
    """
    lens = _checked_prefix_lens(coder, prefix_lens)
    sums = {"clean": 0.0, "ablated": 0.0}
    ce = dict.fromkeys(lens, 0.0)
    kl = dict.fromkeys(lens, 0.0)
    n_tokens = 0
    device = next(model.parameters()).device

    def next_token_ce(logits, ids):
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
        )

    for ids in token_batches:
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError(f"token batches must be [batch, seq >= 2], got {tuple(ids.shape)}")
        clean = model(ids).logits
        clean_logp = clean[:, :-1].float().log_softmax(-1)
        sums["clean"] += float(next_token_ce(clean, ids))
        with spliced(model, coder, hookpoint, ablate=True, first_position=first_position):
            sums["ablated"] += float(next_token_ce(model(ids).logits, ids))
        for p in lens:
            with spliced(model, coder, hookpoint, p, first_position=first_position):
                logits = model(ids).logits
            ce[p] += float(next_token_ce(logits, ids))
            logp = logits[:, :-1].float().log_softmax(-1)
            kl[p] += float(F.kl_div(logp, clean_logp, log_target=True, reduction="sum"))
        n_tokens += ids.shape[0] * (ids.shape[1] - 1)
    if n_tokens == 0:
        raise ValueError("token_batches is empty")
    ce_clean, ce_ablated = sums["clean"] / n_tokens, sums["ablated"] / n_tokens
    gap = ce_ablated - ce_clean
    rows = []
    for p in lens:
        ce_p = ce[p] / n_tokens
        rows.append({
            "prefix_len": p,
            "ce": ce_p,
            "kl": kl[p] / n_tokens,
            "loss_recovered": (ce_ablated - ce_p) / gap if gap != 0 else float("nan"),
        })
    return {"ce_clean": ce_clean, "ce_zero_ablated": ce_ablated, "n_tokens": n_tokens, "prefix": rows}


# -- everything at once -------------------------------------------------------------
def coder_summary(coder) -> dict:
    cfg = coder.cfg
    return {
        "class": type(coder).__name__,
        "d_in": coder.d_in,
        "num_latents": coder.num_latents,
        "k": cfg.k,
        "transcode": bool(cfg.transcode),
        "matryoshka": bool(getattr(cfg, "matryoshka", False)),
        "batch_topk": bool(getattr(cfg, "batch_topk", False)),
        "nested_sizes": list(getattr(coder, "nested_sizes", [])) or None,
    }


@torch.no_grad()
def evaluate(
    coder,
    x: Tensor,
    y: Tensor | None = None,
    prefix_lens: Sequence[int] | None = None,
    *,
    rsa_samples: int = 1000,
    dense_threshold: float = 0.1,
    power_law_trim: float = 0.0,
) -> dict:
    """Every activation-level metric of this module, as one JSON-ready dict."""
    if x.ndim != 2 or x.shape[1] != coder.d_in:
        raise ValueError(f"inputs have shape {tuple(x.shape)}; the coder needs [rows, {coder.d_in}]")
    if coder.cfg.transcode and y is None:
        raise ValueError("the coder is a transcoder: give targets as well as inputs")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"targets have {y.shape[0]} rows but inputs have {x.shape[0]}")
    stats = latent_stats(coder, x, prefix_lens, dense_threshold=dense_threshold)
    stats.pop("frequency")
    return {
        "coder": coder_summary(coder),
        "n_rows": x.shape[0],
        "prefix": prefix_curve(coder, x, y, prefix_lens, rsa_samples=rsa_samples),
        "latents": stats,
        "power_law": dictionary_power_law(coder, x, trim=power_law_trim),
    }


def plot_report(result: dict, path: str | Path, title: str = "") -> None:
    """FVU, RSA (and loss recovered if present) per prefix, and level frequencies, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = result.get("lm")
    n_panels = 3 + bool(lm)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.6))
    curve = result["prefix"]
    P = [r["prefix_len"] for r in curve]
    axes[0].plot(P, [r["fvu"] for r in curve], "o-")
    axes[0].set(xscale="log", xlabel="prefix length", ylabel="FVU", title="FVU vs prefix")
    if "rsa" in curve[0]:
        axes[1].plot(P, [r["rsa"] for r in curve], "o-", color="C1")
    axes[1].set(xscale="log", xlabel="prefix length", ylabel="RSA", title="RSA vs prefix")
    levels = result["latents"]["levels"]
    axes[2].bar(range(len(levels)), [lv["mean_frequency"] for lv in levels])
    axes[2].set_xticks(range(len(levels)), [f"{lv['start']}-{lv['end']}" for lv in levels], rotation=45, fontsize=7)
    axes[2].set(ylabel="mean activation frequency", title="frequency per level")
    if lm:
        rows = lm["prefix"]
        axes[3].plot([r["prefix_len"] for r in rows], [r["loss_recovered"] for r in rows], "o-", color="C2")
        axes[3].set(xscale="log", xlabel="prefix length", ylabel="loss recovered", title="loss recovered vs prefix")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def machine_description() -> str:
    """CPU model, CPU count, torch threads and version, platform: what a benchmark ran on."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs (torch threads {torch.get_num_threads()}), "
        f"torch {torch.__version__}, {platform.platform()}"
    )


def write_json(obj, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# -- CLI ------------------------------------------------------------------------

def resolve_coder_dir(path: Path, hookpoint: str | None) -> Path:
    """A coder directory (with cfg.json), from itself or from a run directory."""
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if hookpoint is not None:
        path = path / hookpoint
        if not (path / "cfg.json").is_file():
            raise UsageError(f"{path} holds no cfg.json; is --hookpoint {hookpoint!r} right?")
        return path
    if (path / "cfg.json").is_file():
        return path
    found = sorted(p.parent for p in path.glob("*/cfg.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"{path} holds no cfg.json, nor any <hookpoint>/cfg.json")
    names = ", ".join(p.name for p in found)
    raise UsageError(f"{path} holds several coders ({names}); pick one with --hookpoint")


def _parse_prefix_lens(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        lens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--prefix-lens {text!r} must be comma-separated integers") from None
    if not lens:
        raise UsageError("--prefix-lens is empty")
    return lens


def _load_data(path: Path, max_rows: int | None) -> tuple[Tensor, Tensor | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise UsageError(f"cannot read --data {path}: {e}") from None
    if "inputs" not in tensors:
        raise UsageError(f"--data {path} has no 'inputs' tensor; it holds {sorted(tensors)}")
    x, y = tensors["inputs"].float(), tensors.get("targets")
    y = None if y is None else y.float()
    if max_rows is not None:
        x = x[:max_rows]
        y = None if y is None else y[:max_rows]
    return x, y


def _load_tokens(path: Path, batch_size: int) -> list[Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path)).get("input_ids")
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise UsageError(f"cannot read --tokens {path}: {e}") from None
    if ids is None or ids.ndim != 2:
        raise UsageError(f"--tokens {path} needs an 'input_ids' tensor of shape [sequences, length]")
    return list(ids.long().split(batch_size))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matryoshka-eval",
        description="Evaluate a sparsify or Matryoshka coder as a progressive coder: "
        "FVU/MSE/RSA per prefix, L0, dead/dense latents, frequency per level, "
        "dictionary power law; optionally loss recovered/KL in a language model.",
    )
    p.add_argument("checkpoint", type=Path, help="coder directory (cfg.json + sae.safetensors) or a run directory")
    p.add_argument("--data", type=Path, required=True, help="held-out activations: safetensors with 'inputs' (and 'targets' for transcoders)")
    p.add_argument("--hookpoint", help="which coder of a run directory to evaluate")
    p.add_argument("--prefix-lens", help="comma-separated prefix lengths (default: nested sizes, or powers of two)")
    p.add_argument("--max-rows", type=int, help="evaluate only the first N rows")
    p.add_argument("--rsa-samples", type=int, default=1000, help="rows used for RSA (0 skips it)")
    p.add_argument("--dense-threshold", type=float, default=0.1, help="frequency above which a latent counts as dense")
    p.add_argument("--power-law-trim", type=float, default=0.0, help="fraction of ranks dropped at each end before the power-law fit")
    p.add_argument("--model", type=Path, help="local Hugging Face causal LM directory, for loss recovered / KL")
    p.add_argument("--tokens", type=Path, help="safetensors with 'input_ids' [sequences, length], needed with --model")
    p.add_argument("--splice-hookpoint", help="module to splice the coder into (default: the coder directory's name)")
    p.add_argument("--splice-from-position", type=int, default=0,
                   help="splice (and ablate) positions >= this; earlier ones keep the model's output "
                   "(1 for coders trained without position 0)")
    p.add_argument("--lm-batch-size", type=int, default=8, help="sequences per language-model batch")
    p.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON output path")
    p.add_argument("--plot", type=Path, help="PNG plot path (default: the JSON path with .png)")
    p.add_argument("--device", default="cpu")
    return p


def run(args: argparse.Namespace) -> dict:
    from .adapters.sparsify import load_coder
    from .core.errors import CheckpointError

    for name in ("max_rows", "lm_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v} must be at least 1")
    if args.rsa_samples < 0:
        raise UsageError(f"--rsa-samples {args.rsa_samples} must be >= 0")
    if not 0 <= args.dense_threshold <= 1:
        raise UsageError(f"--dense-threshold {args.dense_threshold} must be in [0, 1]")
    if args.splice_from_position < 0:
        raise UsageError(f"--splice-from-position {args.splice_from_position} is negative; allowed: 0 or more")
    if (args.model is None) != (args.tokens is None):
        raise UsageError("--model and --tokens go together")
    coder_dir = resolve_coder_dir(args.checkpoint, args.hookpoint)
    try:
        coder = load_coder(coder_dir, device=args.device)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    prefix_lens = _parse_prefix_lens(args.prefix_lens)
    x, y = _load_data(args.data, args.max_rows)
    x = x.to(args.device)
    y = None if y is None else y.to(args.device)
    if not coder.cfg.transcode:
        y = None  # an autoencoder reconstructs its input; ignore any 'targets'
    try:
        result = evaluate(
            coder, x, y, prefix_lens,
            rsa_samples=args.rsa_samples,
            dense_threshold=args.dense_threshold,
            power_law_trim=args.power_law_trim,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    result["checkpoint"] = str(coder_dir)
    if args.model is not None:
        from transformers import AutoModelForCausalLM

        batches = _load_tokens(args.tokens, args.lm_batch_size)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
        except OSError as e:
            raise UsageError(f"cannot load --model {args.model}: {e}".splitlines()[0]) from None
        model = model.to(args.device).eval()
        try:
            result["lm"] = spliced_lm_metrics(
                model, coder, args.splice_hookpoint or coder_dir.name, batches, prefix_lens,
                first_position=args.splice_from_position,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        result["lm"]["hookpoint"] = args.splice_hookpoint or coder_dir.name
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plot_path = args.plot or args.out.with_suffix(".png")
    try:
        # Checked before the (long) evaluation, which would otherwise fail at the end.
        for flag, path in (("--out", args.out), ("--plot", plot_path)):
            if not path.parent.is_dir():
                raise UsageError(f"{flag} {path}: {path.parent} is not a directory")
        result = run(args)
    except UsageError as e:
        print(f"matryoshka-eval: error: {e}", file=sys.stderr)
        return 2
    write_json(result, args.out)
    plot_report(result, plot_path, title=str(args.checkpoint))
    fvus = ", ".join(f"P={r['prefix_len']}: {r['fvu']:.4f}" for r in result["prefix"])
    print(f"FVU per prefix: {fvus}")
    print(f"wrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
