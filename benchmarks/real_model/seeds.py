"""Mean and spread over seeds of several ``run.py`` outputs (same settings, other ``--seed``).

    .venv/bin/python -m benchmarks.real_model.seeds benchmarks/real_model/results_adaptive \
        benchmarks/real_model/results_adaptive/seed1 benchmarks/real_model/results_adaptive/seed2

Writes ``summary.md`` into the first directory: held-out FVU and loss recovered at each of
the LM prefix lengths, mean ± standard deviation over the runs, and each Matryoshka
coder's final nested sizes (the adaptive schedule moves them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.common import write_markdown

SAME = ("layers", "baselines", "width", "k", "epochs", "batch_size", "lr", "lm_prefix_lens", "train_rows")


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _at(rows: list[dict], p: int) -> dict:
    """The row of a per-prefix list at prefix length ``p``."""
    return next(row for row in rows if row["prefix_len"] == p)


def _table(title: str, names: list[str], lens: list[int], value, runs: list[dict]) -> list[str]:
    """A markdown table, one row per prefix length: ``value(run, name, p)`` over the runs."""
    lines = [f"## {title}", "", "| P | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for p in lens:
        lines.append(f"| {p} | " + " | ".join(_cell([value(r, n, p) for r in runs]) for n in names) + " |")
    return lines


def summarize(runs: list[dict]) -> list[str]:
    s = runs[0]["settings"]
    if bad := [k for k in SAME if any(r["settings"].get(k) != s.get(k) for r in runs)]:
        raise SystemExit(f"seeds.py: error: the runs differ in {', '.join(bad)}; allowed: runs that differ only in --seed")
    seeds = [r["settings"]["seed"] for r in runs]
    names = s["baselines"]
    lines = ["# Real model, mean ± sd over seeds", "",
             f"Seeds {seeds}; runs of {', '.join(r['date'][:16] for r in runs)} on {runs[0]['machine']}.",
             "Commands:", "", *(f"- `{r['command']}`" for r in runs), ""]
    lens = s["lm_prefix_lens"]
    for layer in s["layers"]:
        lines += _table(f"Layer {layer}: held-out FVU", names, lens,
                        lambda r, n, p: _at(r["fvu"][str(layer)][n], p)["fvu"], runs)
        if all(r["lm"] for r in runs):
            lines += ["", *_table(f"Layer {layer}: loss recovered (zero ablation)", names, lens,
                                  lambda r, n, p: _at(r["lm"][str(layer)][n]["prefix"], p)["loss_recovered"], runs)]
        lines += ["", "Final nested sizes per seed:", ""]
        for n in names:
            sizes = [r.get("train", {}).get(f"layer{layer}/{n}", {}).get("nested_sizes") for r in runs]
            if any(sizes):
                lines.append(f"- {n}: " + "; ".join(str(x) for x in sizes))
        lines.append("")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run.py --out directories; summary.md goes into the first")
    a = p.parse_args(argv)
    if missing := [str(d) for d in a.dirs if not (d / "results.json").is_file()]:
        print(f"seeds.py: error: no results.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = [json.loads((d / "results.json").read_text()) for d in a.dirs]
    write_markdown(summarize(runs), a.dirs[0] / "summary.md")
    print((a.dirs[0] / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
