"""Where the Matryoshka step spends its extra time, and what a candidate fix buys.

1. torch.profiler: self CPU time per op for one plain and one Matryoshka (5 fixed
   levels) training step, summed over a few steps, written to ``results/profile.txt``.
2. An interleaved A/B of whole training steps: plain TopK, the plugin as shipped, and
   the plugin with ``cumulative_reconstructions`` computed as a lower-triangular
   matmul over the level axis instead of ``cumsum(dim=1)`` (whose CPU kernel along a
   strided middle axis, and its flip-cumsum-flip backward, are slow). The candidate is
   patched in for its own steps only; the plugin files are not changed.

    .venv/bin/python -m benchmarks.training_cost.profile_matryoshka
"""

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# The coder module looks the function up at call time, so patching its name swaps it in.
import matryoshka_plugin.adapters.sparsify.coder as adapter
from benchmarks.common import write_json
from benchmarks.training_cost.run import CoderStep, build_coder, interleaved_times, summarize
from matryoshka_plugin.atomic import atomic_write_text

HERE = Path(__file__).resolve().parent

shipped_cumulative = adapter.cumulative_reconstructions


def tril_cumulative(level_out: torch.Tensor, *, stop_gradient: bool) -> torch.Tensor:
    """Same values and gradients as the shipped version, via a [L, L] matmul."""
    L = level_out.shape[1]
    ones = torch.ones(L, L, dtype=level_out.dtype, device=level_out.device)
    if not stop_gradient:
        return torch.matmul(ones.tril(), level_out)
    return level_out + torch.matmul(ones.tril(-1), level_out).detach()


@contextmanager
def cumulative_impl(fn):
    adapter.cumulative_reconstructions = fn
    try:
        yield
    finally:
        adapter.cumulative_reconstructions = shipped_cumulative


class Patched:
    """A training step run with the candidate cumulative sum patched in."""

    def __init__(self, step):
        self.step, self.coder, self.opt, self.x = step, step.coder, step.opt, step.x

    def __call__(self):
        with cumulative_impl(tril_cumulative):
            return self.step()


def op_table(step, n=4) -> str:
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help, no options
    d, width, k, batch = 256, 4096, 32, 1024
    torch.manual_seed(1)
    x = torch.randn(batch, d)
    # Same values and gradients before timing anything.
    lv = torch.randn(64, 5, d, requires_grad=True)
    for sg in (False, True):
        a, b = shipped_cumulative(lv, stop_gradient=sg), tril_cumulative(lv, stop_gradient=sg)
        ga = torch.autograd.grad(a.square().sum(), lv)[0]
        gb = torch.autograd.grad(b.square().sum(), lv)[0]
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-4)

    steps = {
        "plain": CoderStep(build_coder({"kind": "plain"}, d, width, k), x),
        "fixed5": CoderStep(build_coder({"kind": "matryoshka", "levels": 5}, d, width, k), x),
        "fixed5_tril": Patched(CoderStep(build_coder({"kind": "matryoshka", "levels": 5}, d, width, k), x)),
        "fixed10": CoderStep(build_coder({"kind": "matryoshka", "levels": 10}, d, width, k), x),
        "fixed10_tril": Patched(CoderStep(build_coder({"kind": "matryoshka", "levels": 10}, d, width, k), x)),
    }
    out = HERE / "results"
    text = [f"d={d} width={width} k={k} batch={batch}, 4 steps each, 1 thread\n"]
    for name in ("plain", "fixed5", "fixed5_tril"):
        text.append(f"== {name}\n{op_table(steps[name])}\n")
    atomic_write_text(out / "profile.txt", "\n".join(text))
    summary = summarize(interleaved_times(steps, 20, 2, "profile A/B"))
    write_json({"shape": {"d": d, "width": width, "k": k, "batch": batch}, "summary": summary},
               out / "profile_ab.json")
    for name, s in summary.items():
        print(f"{name:14s} median {s['median_s'] * 1e3:7.1f} ms  ratio to plain {s['ratio']:.3f} "
              f"[{s['ratio_q1']:.3f}, {s['ratio_q3']:.3f}]")


if __name__ == "__main__":
    main()
