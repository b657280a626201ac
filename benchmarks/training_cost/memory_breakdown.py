"""What sets the peak memory of a training step, per variant (torch ``MemTracker``).

For each variant: the peak of a whole steady-state step and the peak up to the end
of the forward pass (loss computed, backward not yet run), each split into
parameters, gradients, optimizer state, activations and temporaries. Writes
``results/memory_breakdown.json`` and prints a markdown table.

    .venv/bin/python -m benchmarks.training_cost.memory_breakdown
"""

import argparse
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from benchmarks.common import write_json
from benchmarks.training_cost.run import CoderStep, build_coder, variant_specs

HERE = Path(__file__).resolve().parent
MiB = 2**20


def peaks(step: CoderStep) -> dict:
    step()  # optimizer state exists from here on
    step.opt.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(step.coder, step.opt, step.x)
    with tracker:
        out = step.coder(step.x)
        loss = out.fvu + out.auxk_loss + out.multi_topk_fvu / 8
    fwd = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    loss.backward()
    del out, loss
    tracker = MemTracker()
    tracker.track_external(step.coder, step.opt, step.x)
    with tracker:
        step()
    full = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    name = lambda k: getattr(k, "value", k)  # noqa: E731
    return {"forward": {name(k): int(v) for k, v in fwd.items()},
            "step": {name(k): int(v) for k, v in full.items()}}


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help, no options
    d, width, k, batch = 256, 4096, 32, 1024
    torch.manual_seed(1)
    x = torch.randn(batch, d)
    res = {}
    for spec in variant_specs("levels"):
        res[spec["name"]] = peaks(CoderStep(build_coder(spec, d, width, k), x))
    write_json({"shape": {"d": d, "width": width, "k": k, "batch": batch}, "peaks": res},
               HERE / "results" / "memory_breakdown.json")
    base = res["plain"]
    print(f"d={d} width={width} k={k} batch={batch}\n")
    print("| variant | step peak MiB | ratio | forward peak MiB | ratio | forward activations+temps MiB | ratio |")
    print("|---|---|---|---|---|---|---|")
    act = lambda r: r["forward"]["Activation"] + r["forward"]["Temp"]  # noqa: E731
    for n, r in res.items():
        print(f"| {n} | {r['step']['Total'] / MiB:.1f} | {r['step']['Total'] / base['step']['Total']:.3f} | "
              f"{r['forward']['Total'] / MiB:.1f} | {r['forward']['Total'] / base['forward']['Total']:.3f} | "
              f"{act(r) / MiB:.1f} | {act(r) / act(base):.2f} |")


if __name__ == "__main__":
    main()
