"""The production suite's rows of results.json as results/production.md.

    .venv/bin/python -m benchmarks.training_cost.production_table
"""

import json
from pathlib import Path

from benchmarks.common import write_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    data = json.loads((RESULTS / "results.json").read_text())
    run = next(m for m in data["meta"]["runs"] if "production" in m["suites"])
    rows = [r for r in data["rows"] if r["suite"] == "production"]
    lines = [
        f"Run {run['date_utc']}, {run['machine']}, {run['threads']} thread, wall {run['wall_s']} s. "
        f"Command: `{run['command']}`", "",
        "| d | width | variant | median step ms | time ratio [q1, q3] | peak MiB (tracked) | mem ratio (tracked) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['d']} | {r['width']} | {r['variant']} | {r['median_s'] * 1e3:.0f} | "
                     f"{r['ratio']:.2f} [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}] | "
                     f"{r['tracked_peak_bytes'] / 2**20:.1f} | {r['mem_ratio']:.3f} |")
    trainer = [r for r in data["rows"] if r["suite"] == "production_trainer"]
    lines += ["", "Whole sparsify Trainer (`fit_activations`, d=576, width 16384, k=32, "
              f"{trainer[0]['batch']} tokens a step, {trainer[0]['steps_per_fit']} steps a fit):", "",
              "| variant | median fit s | time ratio [q1, q3] |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['median_s']:.2f} | {r['ratio']:.2f} [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}] |"
              for r in trainer]
    write_markdown(lines, RESULTS / "production.md")


if __name__ == "__main__":
    main()
