"""The GPU check of issue #21 (called by ``benchmarks/gpu/run.sh``).

(1) The nested loss and BatchTopK on the device against a CPU float64 reference.
(2) Step-time and peak-memory ratios to plain sparsify TopK at the production shapes,
    with sparsify's decode (Triton when installed) and its bf16 autocast; timed with
    CUDA events after a warm-up, peak from ``torch.cuda.max_memory_allocated``.
(3) A Matryoshka CLT step (30 layers) against the same CLT without Matryoshka.
(5) The issue-#19 options on the device: adaptive prefix sizes, permute_every, the
    BatchTopK threshold (``benchmarks/gpu/options.py``). (4) is in ``run.sh``.
Without CUDA every part runs at tiny shapes on the CPU (``--smoke`` forces that), so CI
can check that the script works; those numbers mean nothing.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from matryoshka_plugin.clt.model import CLTConfig, MatryoshkaCLT
from matryoshka_plugin.core.batch_topk import batch_topk_encode

from benchmarks.common import provenance, write_json, write_markdown
from benchmarks.gpu import options
from benchmarks.training_cost.run import CoderStep, build_coder, variant_specs

HERE = Path(__file__).resolve().parent
SHAPES = [(576, 16384), (576, 65536), (768, 32768), (768, 131072), (2304, 16384), (2304, 65536)]


class Timer:
    """Median seconds of ``fn()``: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn, reps: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def peak_bytes(fn, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def reference_check(device: str, d: int, width: int, k: int, n: int) -> dict:
    """(1) Nested loss, its gradients and BatchTopK on ``device`` against CPU float64."""
    out = {}
    for spec in ({"kind": "matryoshka", "levels": 5}, {"kind": "matryoshka", "levels": 5, "batch_topk": True}):
        ref = build_coder(spec, d, width, k).double().train()
        dev = build_coder(spec, d, width, k).to(device).train()
        dev.load_state_dict({name: t.float() for name, t in ref.state_dict().items()})
        x = torch.randn(n, d, dtype=torch.float64)
        losses, grads = [], []
        for coder, xi in ((ref, x), (dev, x.float().to(device))):
            coder.zero_grad()
            loss = coder(xi).fvu
            loss.backward()
            losses.append(float(loss))
            grads.append(coder.encoder.weight.grad.double().cpu())
        name = "batchtopk_nested" if spec.get("batch_topk") else "nested"
        out[name] = {
            "loss_ref": losses[0], "loss_dev": losses[1],
            "loss_rel_err": abs(losses[1] - losses[0]) / abs(losses[0]),
            "enc_grad_rel_err": float((grads[1] - grads[0]).norm() / grads[0].norm()),
        }
    # The kept set itself: float32 on the device may swap entries at near-ties only.
    W, b = torch.randn(width, d, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
    x = torch.randn(n, d, dtype=torch.float64)
    sets = []
    for dev, dt in (("cpu", torch.float64), (device, torch.float32)):
        v, i, _, _ = batch_topk_encode(x.to(dev, dt), W.to(dev, dt), b.to(dev, dt), k)
        rows = torch.arange(n, device=dev)[:, None].expand_as(i)
        sets.append(set((rows[v > 0] * width + i[v > 0]).cpu().tolist()))
    out["batchtopk_kept_overlap"] = len(sets[0] & sets[1]) / max(len(sets[0]), 1)
    return out


def ratio_rows(device: str, shapes, k: int, n: int, reps: int) -> list[dict]:
    """(2) Each production variant's step time and peak memory over plain TopK's."""
    timer, rows = Timer(device), []
    for d, width in shapes:
        torch.manual_seed(1)
        x = torch.randn(n, d, device=device)
        base = None
        for spec in variant_specs("production"):
            try:
                step = CoderStep(build_coder(spec, d, width, k).to(device), x)
                t, peak = timer(step, reps), peak_bytes(step, device)
            except torch.OutOfMemoryError:
                rows.append({"d": d, "width": width, "variant": spec["name"], "error": "out of memory"})
                continue
            finally:
                step = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            base = base or (t, peak)
            rows.append({"d": d, "width": width, "variant": spec["name"], "step_s": t, "time_ratio": t / base[0],
                         "peak_bytes": peak, "mem_ratio": peak / base[1] if peak else None})
            print(rows[-1], flush=True)
    return rows


def clt_rows(device: str, n_layers: int, d: int, width: int, k: int, n: int, reps: int) -> list[dict]:
    """(3) One training step of a Matryoshka CLT against the same CLT without it."""
    timer, rows = Timer(device), []
    x, y = torch.randn(n, n_layers, d, device=device), torch.randn(n, n_layers, d, device=device)
    for name, options in (("plain", {}), ("fixed5", {"matryoshka": True})):
        torch.manual_seed(0)
        clt = MatryoshkaCLT(d, list(range(n_layers)), CLTConfig(num_latents=width, k=k, **options), device=device)
        opt = torch.optim.Adam(clt.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            clt(x, y).loss.backward()
            opt.step()

        t = timer(step, reps)
        rows.append({"variant": name, "layers": n_layers, "d": d, "width": width, "step_s": t,
                     "peak_bytes": peak_bytes(step, device)})
        clt = opt = None
    for r in rows:
        r["time_ratio"] = r["step_s"] / rows[0]["step_s"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results", help="where results.json/.md go")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU even when CUDA is present")
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not a.smoke
    device = "cuda" if gpu else "cpu"
    t0 = time.time()
    if gpu:
        ref = reference_check(device, 576, 16384, 32, 4096)
        rows = ratio_rows(device, SHAPES, 32, 4096, reps=10)
        clt = clt_rows(device, 30, 576, 4096, 32, 1024, reps=5)
        opts = options.run_all(device, 576, 16384, 32, 2048, Timer(device), reps=10, batches=300)
    else:
        ref = reference_check(device, 8, 64, 4, 32)
        rows = ratio_rows(device, [(8, 64)], 4, 32, reps=2)
        clt = clt_rows(device, 3, 8, 32, 4, 16, reps=2)
        opts = options.run_all(device, 8, 64, 4, 64, Timer(device), reps=2, batches=300)
    meta = {**provenance(__spec__.name, argv), "device": torch.cuda.get_device_name() if gpu else "cpu (smoke: tiny shapes)",
            "wall_s": round(time.time() - t0, 1)}
    write_json({"meta": meta, "reference": ref, "ratios": rows, "clt": clt, "options": opts}, a.out / "results.json")
    lines = [f"{meta['date']}, {meta['device']}, {meta['machine']}. Command: `{meta['command']}`", "",
             "| d | width | variant | step ms | time ratio | peak MiB | mem ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['d']} | {r['width']} | {r['variant']} | {r['error']} | | | |")
            continue
        mib = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "-"
        mem = f"{r['mem_ratio']:.3f}" if r["mem_ratio"] else "-"
        lines.append(f"| {r['d']} | {r['width']} | {r['variant']} | {r['step_s'] * 1e3:.1f} | {r['time_ratio']:.3f} | {mib} | {mem} |")
    lines += ["", "CLT: " + ", ".join(f"{r['variant']} {r['step_s'] * 1e3:.1f} ms ({r['time_ratio']:.3f}x)" for r in clt),
              "", "Reference (CPU float64): " + repr(ref), "", *options.lines(opts)]
    write_markdown(lines, a.out / "results.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
