"""One coder's report: every activation-level metric as one JSON-ready dict, and its plot."""

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import atomic_write, atomic_write_text
from ..core.errors import UsageError
from .latent_stats import latent_stats
from .power_law import dictionary_power_law
from .prefix_metrics import prefix_curve


def coder_summary(coder) -> dict:
    """What kind of coder was evaluated: shape, k, and the Matryoshka options."""
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
    """Prefix curve, latent statistics and power-law fits of ``coder`` on ``x`` (targets ``y``)."""
    if x.ndim != 2 or x.shape[1] != coder.d_in:
        raise UsageError(f"inputs have shape {tuple(x.shape)}; the coder needs [rows, {coder.d_in}]")
    if coder.cfg.transcode and y is None:
        raise UsageError("the coder is a transcoder: give targets as well as inputs")
    if y is not None and y.shape[0] != x.shape[0]:
        raise UsageError(f"targets have {y.shape[0]} rows but inputs have {x.shape[0]}")
    stats = latent_stats(coder, x, prefix_lens, dense_threshold=dense_threshold)
    stats.pop("frequency")  # one number per latent: too long for a report
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


def json_ready(value):
    """``value`` with every NaN or infinite float as None: JSON has no NaN (``json`` writes a bare one)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def save_report(result: dict, json_path: str | Path, plot_path: str | Path, title: str = "") -> None:
    """The report as indented JSON (an undefined metric as null) and as a plot, each written atomically."""
    text = json.dumps(json_ready(result), indent=2, allow_nan=False)
    atomic_write_text(json_path, text + "\n")
    plot_report(result, plot_path, title=title)
