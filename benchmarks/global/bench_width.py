"""Time and peak memory of the global graph against dictionary width.

Side by side in one run, each configuration in its own subprocess (so that peak RSS is
its own): ``sparse`` = ``CoactivationStats`` (one pass over the codes) + ``era_edges``
(the plugin); ``dense`` = the dense reference (codes densified, V = W_dec W_enc^T and
the ERA/TWERA matrices, width x width). Synthetic TopK codes with Zipf-distributed feature
frequencies (as in trained dictionaries), 2 layers, fixed k and token count, so the number
of co-active pairs stays roughly constant while the width grows.

Usage: python -m benchmarks.global.bench_width [--widths 1024 ...] [--dense-max 8192]
Writes results/width.json, results/width.md and results/width.png next to this file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, provenance, pyplot, save_figure, write_json, write_markdown

HERE = Path(__file__).parent
D_MODEL, N_TOKENS, K, CHUNK = 64, 4096, 16, 1024


def _codes(width: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    freq = 1.0 / torch.arange(1, width + 1, dtype=torch.float32) ** 0.8
    # In small row blocks: a [N_TOKENS, width] probability matrix would dominate peak memory.
    idx = torch.cat([torch.multinomial(freq.expand(32, width), K, replacement=False, generator=g) for _ in range(N_TOKENS // 32)])
    acts = torch.rand(N_TOKENS, K, generator=g) + 0.1
    return acts, idx


def child(method: str, width: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from matryoshka_plugin.core.edge_scores import CoactivationStats, era_edges

    g = torch.Generator().manual_seed(0)
    dec = torch.randn(width, D_MODEL, generator=g)
    enc = torch.randn(width, D_MODEL, generator=g)
    codes = {0: _codes(width, 1), 1: _codes(width, 2)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "sparse":
        stats = CoactivationStats({0: width, 1: width})
        for part in torch.arange(N_TOKENS).split(CHUNK):
            stats.update({l: (a[part], i[part]) for l, (a, i) in codes.items()})
        edges = era_edges(stats, 0, 1, dec, enc, k=16)
        n_pairs, n_edges = stats.n_pairs(), int(edges.source.numel())
    else:
        dense = {
            l: torch.zeros(N_TOKENS, width).scatter(1, i, a) for l, (a, i) in codes.items()
        }
        # float32 (dense_era_reference works in float64; same formulas).
        a, b = dense[0], dense[1]
        v = dec @ enc.T
        co = (a.T > 0).float() @ (b > 0).float()
        era = v * (a.T @ (b > 0).float()) / N_TOKENS
        twera = v * (a.T @ b) / b.sum(0).clamp_min(1e-30)
        top = twera.abs().topk(16, dim=1)
        n_pairs, n_edges = int(co.count_nonzero()), int(top.values.numel())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(method=method, width=width, seconds=seconds, peak_rss_delta_mb=(peak - base) / 1024, n_pairs=n_pairs, n_edges=n_edges)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--dense-max", type=int, default=8192, help="largest width for the dense reference")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    from tqdm import tqdm

    jobs = [(m, w) for w in args.widths for m in ("sparse", "dense") if m == "sparse" or w <= args.dense_max]
    rows = []
    for m, w in tqdm(jobs, desc="width sweep"):
        out = subprocess.run([sys.executable, "-m", __spec__.name, "--child", m, str(w)],
                             cwd=REPO, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    meta = dict(
        **provenance(__spec__.name),
        d_model=D_MODEL, n_tokens=N_TOKENS, k=K,
    )
    write_json(dict(meta=meta, rows=rows), res / "width.json")
    by = {(r["method"], r["width"]): r for r in rows}
    lines = [
        f"Measured {meta['date']} by `{meta['command']}` ({meta['machine']}); {N_TOKENS} tokens, k={K}, d_model={D_MODEL}.",
        "",
        "| width | co-active pairs | sparse s | dense s | dense/sparse time | sparse MB | dense MB | dense/sparse memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in args.widths:
        s, d = by[("sparse", w)], by.get(("dense", w))
        if d:
            lines.append(
                f"| {w} | {s['n_pairs']} | {s['seconds']:.3f} | {d['seconds']:.3f} | {d['seconds'] / s['seconds']:.1f}x "
                f"| {s['peak_rss_delta_mb']:.0f} | {d['peak_rss_delta_mb']:.0f} | {d['peak_rss_delta_mb'] / max(s['peak_rss_delta_mb'], 1):.1f}x |"
            )
        else:
            lines.append(f"| {w} | {s['n_pairs']} | {s['seconds']:.3f} | - | - | {s['peak_rss_delta_mb']:.0f} | - | - |")
    write_markdown(lines, res / "width.md")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, style in (("sparse", "o-"), ("dense", "s--")):
        ws = [w for w in args.widths if (m, w) in by]
        axes[0].loglog(ws, [by[(m, w)]["seconds"] for w in ws], style, label=m, base=2)
        axes[1].loglog(ws, [max(by[(m, w)]["peak_rss_delta_mb"], 0.1) for w in ws], style, label=m, base=2)
    axes[0].set(xlabel="width", ylabel="seconds", title="time: stats + ERA/TWERA")
    axes[1].set(xlabel="width", ylabel="peak RSS increase (MB)", title="memory")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"global graph vs width ({N_TOKENS} tokens, k={K}); measured {meta['date'][:10]}")
    fig.tight_layout()
    save_figure(fig, res / "width.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
