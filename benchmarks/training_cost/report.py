"""Plots and markdown tables from ``results/results.json`` (written by ``run.py``).

    .venv/bin/python -m benchmarks.training_cost.report   # -> results/*.png, results/tables.md
"""

import json
from pathlib import Path

from benchmarks.common import pyplot, save_figure
from matryoshka_plugin.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
MiB = 2**20


def _err(rows):
    return [[r["ratio"] - r["ratio_q1"] for r in rows], [r["ratio_q3"] - r["ratio"] for r in rows]]


def plot_levels(rows, path):
    lv = {r["variant"]: r for r in rows if r["suite"] == "levels"}
    fig, ax = pyplot().subplots(1, 2, figsize=(10, 4))
    xs = [2, 5, 10]
    for prefix, label, marker in (("fixed", "plugin, one decode", "o"), ("naive", "naive re-decode per level", "s")):
        rs = [lv[f"{prefix}{L}"] for L in xs]
        ax[0].errorbar(xs, [r["ratio"] for r in rs], yerr=_err(rs), marker=marker, capsize=3, label=label)
        ax[1].plot(xs, [r["mem_ratio"] for r in rs], marker=marker, label=f"{label} (tracked)")
        if "maxrss_ratio" in rs[0]:
            ax[1].plot(xs, [r["maxrss_ratio"] for r in rs], marker=marker, ls=":", label=f"{label} (maxrss)")
    for name, marker in (("pareto", "^"), ("nested5", "D"), ("stopgrad5", "v")):
        if name in lv:
            r = lv[name]
            x = 10.5 if name == "pareto" else 5.3
            ax[0].errorbar([x], [r["ratio"]], yerr=_err([r]), marker=marker, ls="", capsize=3, label=name)
            ax[1].plot([x], [r["mem_ratio"]], marker=marker, ls="", label=name)
    for a, target, title in ((ax[0], 1.10, "step time / plain TopK"), (ax[1], 1.05, "peak memory / plain TopK")):
        a.axhline(1.0, color="grey", lw=0.8)
        a.axhline(target, color="red", lw=0.8, ls="--", label=f"target {target}")
        a.set_xlabel("number of levels (pareto: sampled, ~10)")
        a.set_title(title)
        a.legend(fontsize=7)
    r0 = next(iter(lv.values()))
    fig.suptitle(f"d={r0['d']} width={r0['width']} k={r0['k']} batch={r0['batch']}, CPU 1 thread; bars: quartiles of per-round ratios")
    fig.tight_layout()
    save_figure(fig, path)


def plot_width(rows, path):
    ws = [r for r in rows if r["suite"] == "width"]
    widths = sorted({r["width"] for r in ws})
    fig, ax = pyplot().subplots(1, 2, figsize=(10, 4))
    for name in ("fixed5", "pareto", "nested5", "naive5"):
        rs = [next(r for r in ws if r["width"] == w and r["variant"] == name) for w in widths]
        ax[0].errorbar(widths, [r["ratio"] for r in rs], yerr=_err(rs), marker="o", capsize=3, label=name)
        ax[1].plot(widths, [r["mem_ratio"] for r in rs], marker="o", label=name)
    for a, target, title in ((ax[0], 1.10, "step time / plain TopK"), (ax[1], 1.05, "peak memory (tracked) / plain TopK")):
        a.set_xscale("log", base=2)
        a.axhline(1.0, color="grey", lw=0.8)
        a.axhline(target, color="red", lw=0.8, ls="--", label=f"target {target}")
        a.set_xlabel("width (latents)")
        a.set_title(title)
        a.legend(fontsize=7)
    fig.suptitle(f"d={ws[0]['d']} k={ws[0]['k']} batch={ws[0]['batch']}, 5 levels; CPU 1 thread")
    fig.tight_layout()
    save_figure(fig, path)


def table(rows, cols):
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(f(r) for _, f in cols) + " |\n" for r in rows)


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=OUT, help="folder holding results.json")
    out = p.parse_args().results
    data = json.loads((out / "results.json").read_text())
    rows, meta = data["rows"], data["meta"]
    ratio = ("time ratio [q1, q3]", lambda r: f"{r['ratio']:.2f} [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}]")
    ms = ("median step ms", lambda r: f"{r['median_s'] * 1e3:.0f}")
    mem = ("peak MiB (tracked)", lambda r: f"{r['tracked_peak_bytes'] / MiB:.1f}")
    memr = ("mem ratio (tracked)", lambda r: f"{r['mem_ratio']:.3f}")
    md = []
    for m in meta.get("runs", [meta]):
        md.append(f"- Suites {', '.join(m.get('suites', []))}: run {m['date_utc']}, {m['machine']}, "
                  f"torch {m['torch']}, {m['threads']} thread, {m['reps']} rounds "
                  f"({2 * m['reps']} for levels), wall {m['wall_s']} s. Command: `{m['command']}`\n")
    suites = {r["suite"] for r in rows}
    if "levels" in suites:
        lv = [r for r in rows if r["suite"] == "levels"]
        r0 = lv[0]
        md.append(f"\n### Levels (d={r0['d']}, width={r0['width']}, k={r0['k']}, batch={r0['batch']})\n")
        md.append(table(lv, [("variant", lambda r: r["variant"]), ("levels", lambda r: str(r["levels"])), ms, ratio, mem, memr,
                             ("maxrss delta MiB", lambda r: f"{r['maxrss_delta_bytes'] / MiB:.0f}"),
                             ("mem ratio (maxrss)", lambda r: f"{r['maxrss_ratio']:.2f}")]))
        plot_levels(rows, out / "ratio_vs_levels.png")
    if "width" in suites:
        ws = sorted((r for r in rows if r["suite"] == "width"), key=lambda r: (r["width"], r["variant"] != "plain"))
        md.append(f"\n### Width (d={ws[0]['d']}, k={ws[0]['k']}, batch={ws[0]['batch']}, 5 levels)\n")
        md.append(table(ws, [("width", lambda r: str(r["width"])), ("variant", lambda r: r["variant"]), ms, ratio, mem, memr]))
        plot_width(rows, out / "ratio_vs_width.png")
    if "batch" in suites:
        bs = [r for r in rows if r["suite"] == "batch"]
        md.append(f"\n### Batch (d={bs[0]['d']}, width={bs[0]['width']}, k={bs[0]['k']}, 5 levels)\n")
        md.append(table(bs, [("batch", lambda r: str(r["batch"])), ("variant", lambda r: r["variant"]), ms, ratio, mem, memr]))
    if "trainer" in suites:
        ts = [r for r in rows if r["suite"] == "trainer"]
        md.append(f"\n### Whole sparsify Trainer (`fit_activations`, d={ts[0]['d']}, width={ts[0]['width']}, "
                  f"k={ts[0]['k']}, batch={ts[0]['batch']}, {ts[0]['steps_per_fit']} steps per fit)\n")
        md.append(table(ts, [("variant", lambda r: r["variant"]), ("median fit s", lambda r: f"{r['median_s']:.2f}"), ratio]))
    if "saelens" in suites:
        ss = [r for r in rows if r["suite"] == "saelens"]
        md.append(f"\n### Against SAELens {ss[0]['sae_lens_version']} (d={ss[0]['d']}, k={ss[0]['k']}, "
                  f"batch={ss[0]['batch']}, 5 levels; ratios to plain sparsify TopK in the same round)\n")
        md.append(table(ss, [("width", lambda r: str(r["width"])), ("variant", lambda r: r["variant"]), ms, ratio, mem, memr]))
        md.append("\nMatryoshka over the same library's own non-Matryoshka step (ratio of median step "
                  "times, and of tracked peaks):\n\n| width | pair | time | memory |\n|---|---|---|---|\n")
        pairs = (("fixed5", "plain"), ("ours_batchtopk_fixed5", "ours_batchtopk"),
                 ("saelens_matryoshka5", "saelens_batchtopk"))
        for w in sorted({r["width"] for r in ss}):
            by = {r["variant"]: r for r in ss if r["width"] == w}
            for a, b in pairs:
                md.append(f"| {w} | {a} / {b} | {by[a]['median_s'] / by[b]['median_s']:.2f} | "
                          f"{by[a]['tracked_peak_bytes'] / by[b]['tracked_peak_bytes']:.2f} |\n")
    elif meta.get("saelens_error"):
        md.append(f"\nSAELens suite skipped: {meta['saelens_error']}\n")
    atomic_write_text(out / "tables.md", "".join(md))
    print((out / "tables.md").read_text())


if __name__ == "__main__":
    main()
