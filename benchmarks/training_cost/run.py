"""Training cost of Matryoshka coders against plain sparsify TopK, side by side.

One training step of the coder alone (forward + backward + decoder renorm + Adam step)
on fixed random activations, for every variant of a configuration, interleaved in
rotating order (A B C ..., B C ... A, ...) and repeated, so that load from other
processes on a shared machine hits every variant alike. Reported: the median step time
of each variant and the median of its per-round ratio to plain TopK timed in the same
round; and the peak memory of one step.

Peak memory, two ways:
- ``tracked``: torch's own ``MemTracker`` counts every tensor storage alive during one
  steady-state step (parameters, gradients, optimizer state, activations, temporaries)
  and keeps the peak. Deterministic; what a GPU caching allocator would have to hold,
  less fragmentation.
- ``maxrss``: each variant in a fresh subprocess; peak resident set size (``VmHWM``,
  reset just before the steps) over three steps (the first allocates Adam's state)
  minus the resident size just before them. Includes malloc's own behaviour; noisier.

Suites (``--suites``):
- ``levels``: number of levels 2/5/10/sampled at one width; plugin shared decoder,
  nested decoders, stop-gradient, and a naive per-prefix re-decode;
- ``width``: the same at several widths (5 levels);
- ``batch``: several batch sizes;
- ``trainer``: whole sparsify ``Trainer`` runs through ``fit_activations``;
- ``production``: the issue-#21 shapes (``PRODUCTION_SHAPES``: d 576/768/2304, widths
  16k-32k, k=32): plain TopK, 5 fixed levels, Pareto prefixes, nested decoders,
  BatchTopK and Matryoshka BatchTopK side by side, and a whole ``Trainer`` fit at d=576,
  width 16k (not in the default ``--suites``: about 15 minutes at 1024 tokens a step);
- ``saelens``: ours against SAELens' ``MatryoshkaBatchTopKTrainingSAE`` (needs
  ``sae_lens``; run with a Python that has it, see ``--saelens-python``).

Reproduce from the repository root (about 15 minutes on 2 CPU cores shared with other
jobs)::

    .venv/bin/python -m benchmarks.training_cost.run
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# One thread, set before torch is imported: timings on a shared machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

torch.set_num_threads(1)

from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.sparse_coder import ForwardOutput  # noqa: E402

from matryoshka_plugin.adapters.sparsify import (  # noqa: E402
    MatryoshkaSparseCoder,
    MatryoshkaSparseCoderConfig,
)
from matryoshka_plugin.atomic import atomic_write  # noqa: E402
from matryoshka_plugin.core import truncate_sparse  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO,
    SAELENS_PYTHON,
    command_line,
    machine_description,
    utc_timestamp,
    write_json,
)

HERE = Path(__file__).resolve().parent


def doubling_sizes(width: int, levels: int) -> list[int]:
    """Prefix lengths width/2^(L-1), ..., width/2, width; L=5 gives Bussmann's groups."""
    sizes = [width >> (levels - 1 - i) for i in range(levels)]
    if sizes[0] < 1:
        raise ValueError(f"width {width} is too small for {levels} doubling levels")
    return sizes


class NaiveMatryoshkaCoder(SparseCoder):
    """The baseline the single decode replaces: every prefix decoded on its own.

    Each level zeroes the latents beyond its prefix and runs a full sparse decode, so
    decode work (and the autograd graph) grows with the number of levels.
    """

    def __init__(self, d_in: int, cfg: SparseCoderConfig, sizes: list[int]):
        super().__init__(d_in, cfg)
        self.sizes = sizes

    def forward(self, x, y=None, *, dead_mask=None, total_variance=None):
        top_acts, top_indices, _ = self.encode(x)
        y = x if y is None else y
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()
        loss = 0.0
        for size in self.sizes:
            acts, idx = truncate_sparse(top_acts, top_indices, size)
            recon = self.decode(acts, idx)
            loss = loss + (y - recon).pow(2).sum() / total_variance
        zero = recon.new_tensor(0.0)
        return ForwardOutput(recon, top_acts, top_indices, loss / len(self.sizes), zero, zero)


# -- variants ----------------------------------------------------------------------
# name -> how to build it; "levels" is the number of prefix levels (full width included).
def variant_specs(suite: str) -> list[dict]:
    plain = {"name": "plain", "kind": "plain"}
    if suite == "levels":
        specs = [plain]
        for L in (2, 5, 10):
            specs.append({"name": f"fixed{L}", "kind": "matryoshka", "levels": L})
        specs.append({"name": "pareto", "kind": "matryoshka", "schedule": "pareto"})
        specs.append({"name": "nested5", "kind": "matryoshka", "levels": 5, "nested_decoders": True})
        specs.append({"name": "stopgrad5", "kind": "matryoshka", "levels": 5, "stop_gradient": True})
        for L in (2, 5, 10):
            specs.append({"name": f"naive{L}", "kind": "naive", "levels": L})
        return specs
    if suite == "width":
        return [
            plain,
            {"name": "fixed5", "kind": "matryoshka", "levels": 5},
            {"name": "pareto", "kind": "matryoshka", "schedule": "pareto"},
            {"name": "nested5", "kind": "matryoshka", "levels": 5, "nested_decoders": True},
            {"name": "naive5", "kind": "naive", "levels": 5},
        ]
    if suite == "production":  # the width suite without the naive baseline, plus BatchTopK
        return [s for s in variant_specs("width") if s["kind"] != "naive"] + [
            {"name": "batchtopk", "kind": "plain", "batch_topk": True},
            {"name": "batchtopk_fixed5", "kind": "matryoshka", "levels": 5, "batch_topk": True},
        ]
    if suite == "batch":
        return [
            plain,
            {"name": "fixed5", "kind": "matryoshka", "levels": 5},
            {"name": "naive5", "kind": "naive", "levels": 5},
        ]
    raise ValueError(f"unknown suite {suite!r}")


def build_coder(spec: dict, d: int, width: int, k: int, seed: int = 0) -> SparseCoder:
    torch.manual_seed(seed)
    kind = spec["kind"]
    batch_topk = spec.get("batch_topk", False)
    if kind == "plain" and not batch_topk:
        return SparseCoder(d, SparseCoderConfig(num_latents=width, k=k))
    if kind == "naive":
        return NaiveMatryoshkaCoder(
            d, SparseCoderConfig(num_latents=width, k=k), doubling_sizes(width, spec["levels"])
        )
    matryoshka = kind == "matryoshka"
    schedule = spec.get("schedule", "fixed")
    sizes = doubling_sizes(width, spec["levels"]) if matryoshka and schedule == "fixed" else []
    cfg = MatryoshkaSparseCoderConfig(
        num_latents=width,
        k=k,
        matryoshka=matryoshka,
        nested_sizes=sizes,
        prefix_schedule=schedule,
        nested_decoders=spec.get("nested_decoders", False),
        stop_gradient=spec.get("stop_gradient", False),
        batch_topk=batch_topk,
    )
    return MatryoshkaSparseCoder(d, cfg)


class CoderStep:
    """One sparsify-style training step of a coder on a fixed batch."""

    def __init__(self, coder: SparseCoder, x: torch.Tensor):
        self.coder, self.x = coder.train(), x
        self.opt = torch.optim.Adam(coder.parameters(), lr=1e-4)

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        out = self.coder(self.x)
        # sparsify's trainer loss; auxk and multi-TopK are zero here for every variant.
        loss = out.fvu + out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        self.coder.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.coder.set_decoder_norm_to_unit_norm()
        return float(loss.detach())


# -- timing ------------------------------------------------------------------------
def interleaved_times(steps: dict, reps: int, warmup: int, desc: str) -> dict[str, list[float]]:
    """Per-variant step times; each round runs every variant once, in rotated order."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times = {n: [] for n in names}
    for r in tqdm(range(reps), desc=desc, leave=False):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], base: str = "plain") -> dict:
    """Median time per variant, and the median/quartiles of per-round ratios to ``base``."""
    out = {}
    for name, ts in times.items():
        ratios = sorted(t / b for t, b in zip(ts, times[base]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = {
            "median_s": statistics.median(ts),
            "ratio": statistics.median(ratios),
            "ratio_q1": q[0],
            "ratio_q3": q[2],
            "n": len(ts),
        }
    return out


# -- memory ------------------------------------------------------------------------
def tracked_peak_bytes(step: CoderStep) -> int:
    """Peak bytes of live tensor storages during one steady-state step (MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    step()  # optimizer state exists from here on, as in a long run
    tracker = MemTracker()
    tracker.track_external(step.coder, step.opt, step.x)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def maxrss_worker(args_json: str) -> None:
    """Subprocess body: resident-set peak over three steps of one variant, above the
    resident size just before them.

    ``getrusage`` maxrss is useless here: a child started by fork+exec inherits the
    parent's high-water mark. ``VmHWM`` is reset by writing 5 to /proc/self/clear_refs.
    """
    a = json.loads(args_json)
    torch.manual_seed(1)
    x = torch.randn(a["batch"], a["d"])
    step = CoderStep(build_coder(a["spec"], a["d"], a["width"], a["k"]), x)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    for _ in range(3):
        step()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"delta_bytes": peak - before, "hwm_bytes": peak}))


def maxrss_delta(spec: dict, d: int, width: int, k: int, batch: int) -> int:
    payload = json.dumps({"spec": spec, "d": d, "width": width, "k": k, "batch": batch})
    res = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--_maxrss-worker", payload],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])["delta_bytes"]


# -- suites ------------------------------------------------------------------------
def run_config(suite, specs, d, width, k, batch, reps, warmup, rss):
    torch.manual_seed(1)
    x = torch.randn(batch, d)
    steps = {s["name"]: CoderStep(build_coder(s, d, width, k), x) for s in specs}
    desc = f"{suite} d={d} W={width} k={k} B={batch}"
    summary = summarize(interleaved_times(steps, reps, warmup, desc))
    rows = []
    for spec in specs:
        name = spec["name"]
        row = {"suite": suite, "variant": name, "d": d, "width": width, "k": k, "batch": batch,
               "levels": spec.get("levels", "sampled" if spec.get("schedule") else 1),
               **summary[name], "tracked_peak_bytes": tracked_peak_bytes(steps[name])}
        if rss:
            deltas = [maxrss_delta(spec, d, width, k, batch) for _ in range(rss)]
            row["maxrss_delta_bytes"] = statistics.median(deltas)
        rows.append(row)
    base = next(r for r in rows if r["variant"] == "plain")
    for r in rows:
        r["mem_ratio"] = r["tracked_peak_bytes"] / base["tracked_peak_bytes"]
        if rss:
            r["maxrss_ratio"] = r["maxrss_delta_bytes"] / base["maxrss_delta_bytes"]
    return rows


def trainer_suite(reps: int, d: int = 256, width: int = 2048, batch: int = 1024,
                  n_steps: int = 16, suite: str = "trainer") -> list[dict]:
    """Whole sparsify Trainer runs (fit_activations): plain against Matryoshka fixed-5."""
    from matryoshka_plugin.fit import fit_activations

    torch.manual_seed(2)
    x = torch.randn(batch * n_steps, d)
    cfgs = {
        "plain": MatryoshkaSparseCoderConfig(num_latents=width, k=32),
        "fixed5": MatryoshkaSparseCoderConfig(num_latents=width, k=32, matryoshka=True),
    }

    def run(cfg):
        return lambda: fit_activations(x, cfg, batch_size=batch, seq_len=64, optimizer="adam",
                                       lr=1e-4, lr_warmup_steps=0)

    steps = {n: run(c) for n, c in cfgs.items()}
    summary = summarize(interleaved_times(steps, reps, 1, f"{suite} fit"))
    return [{"suite": suite, "variant": n, "d": d, "width": width, "k": 32, "batch": batch,
             "levels": 5 if n == "fixed5" else 1, "steps_per_fit": n_steps, **s}
            for n, s in summary.items()]


PRODUCTION_SHAPES = [(576, 16384), (576, 32768), (768, 32768), (2304, 16384)]
"""(d, width) of the production suite: every d the issue names, widths that fit side by
side (six coders with Adam state) in 24 GiB."""


def run_saelens_suite(reps: int, warmup: int) -> list[dict]:
    """Ours against SAELens' BatchTopK and Matryoshka BatchTopK trainers, one process."""
    import sae_lens

    from benchmarks.training_cost.saelens_variants import saelens_steps

    rows = []
    for d, width, k, batch in [(256, 1024, 32, 1024), (256, 4096, 32, 1024)]:
        torch.manual_seed(1)
        x = torch.randn(batch, d)
        sizes = doubling_sizes(width, 5)
        steps = {
            "plain": CoderStep(build_coder({"kind": "plain"}, d, width, k), x),
            "fixed5": CoderStep(build_coder({"kind": "matryoshka", "levels": 5}, d, width, k), x),
            "ours_batchtopk": CoderStep(build_coder({"kind": "plain", "batch_topk": True}, d, width, k), x),
            "ours_batchtopk_fixed5": CoderStep(
                build_coder({"kind": "matryoshka", "levels": 5, "batch_topk": True}, d, width, k), x),
            **saelens_steps(d, width, k, sizes, x),
        }
        desc = f"saelens d={d} W={width}"
        summary = summarize(interleaved_times(steps, reps, warmup, desc))
        for name, s in summary.items():
            rows.append({"suite": "saelens", "variant": name, "d": d, "width": width, "k": k,
                         "batch": batch, "levels": 5 if "5" in name else 1,
                         "sae_lens_version": sae_lens.__version__, **s,
                         "tracked_peak_bytes": tracked_peak_bytes(steps[name])})
        base = rows[-len(summary)]
        for r in rows[-len(summary):]:
            r["mem_ratio"] = r["tracked_peak_bytes"] / base["tracked_peak_bytes"]
    return rows


# -- output ------------------------------------------------------------------------
def write_outputs(rows: list[dict], meta: dict, out: Path) -> None:
    import csv

    write_json({"meta": meta, "rows": rows}, out / "results.json")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    atomic_write(out / "results.csv", write_csv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suites", default="levels,width,batch,trainer,saelens")
    p.add_argument("--reps", type=int, default=10,
                   help="interleaved rounds per configuration (the levels suite runs twice as many)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--production-batch", type=int, default=4096,
                   help="tokens per step in the production suite (d 576-2304, widths 16k-32k)")
    p.add_argument("--production-reps", type=int, default=3,
                   help="interleaved rounds per shape in the production suite")
    p.add_argument("--rss-reps", type=int, default=2,
                   help="fresh subprocesses per variant for the maxrss measurement (levels suite)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of suites not run now from an existing results.json")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--saelens-python", default=str(SAELENS_PYTHON),
                   help="Python with sae_lens and this plugin installed, for the saelens suite")
    p.add_argument("--_maxrss-worker", dest="maxrss_worker", help=argparse.SUPPRESS)
    p.add_argument("--_saelens-only", dest="saelens_only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.maxrss_worker:
        return maxrss_worker(a.maxrss_worker)
    if a.saelens_only:
        print(json.dumps(run_saelens_suite(a.reps, a.warmup)))
        return
    suites = a.suites.split(",")
    allowed = ["levels", "width", "batch", "trainer", "saelens", "production"]
    if unknown := set(suites) - set(allowed):
        p.error(f"unknown suites {sorted(unknown)}; allowed: {','.join(allowed)}")

    d, k = 256, 32
    rows = []
    t0 = time.time()
    if "levels" in suites:
        rows += run_config("levels", variant_specs("levels"), d, 4096, k, 1024, 2 * a.reps, a.warmup, rss=a.rss_reps)
    if "width" in suites:
        for width in (1024, 4096, 8192):
            rows += run_config("width", variant_specs("width"), d, width, k, 1024, a.reps, a.warmup, rss=False)
    if "batch" in suites:
        for batch in (256, 4096):
            rows += run_config("batch", variant_specs("batch"), d, 4096, k, batch, a.reps, a.warmup, rss=False)
    if "trainer" in suites:
        rows += trainer_suite(max(a.reps // 3, 3))
    if "production" in suites:
        for pd, width in PRODUCTION_SHAPES:
            rows += run_config("production", variant_specs("production"), pd, width, k,
                               a.production_batch, a.production_reps, 1, rss=False)
        rows += trainer_suite(a.production_reps, 576, 16384, a.production_batch, 4, "production_trainer")
    saelens_error = None
    if "saelens" in suites:
        py = Path(a.saelens_python)
        if not py.exists():
            saelens_error = f"{py} not found"
        else:
            res = subprocess.run([str(py), "-m", __spec__.name, "--_saelens-only", "--reps", str(a.reps),
                                  "--warmup", str(a.warmup)], cwd=REPO, capture_output=True, text=True)
            if res.returncode:
                saelens_error = res.stderr.strip().splitlines()[-1]
            else:
                rows += json.loads(res.stdout.strip().splitlines()[-1])
        if saelens_error:
            print(f"saelens suite skipped: {saelens_error}", file=sys.stderr)
    meta = {
        "date_utc": utc_timestamp(),
        "machine": machine_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reps": a.reps,
        "warmup": a.warmup,
        "wall_s": round(time.time() - t0, 1),
        "saelens_error": saelens_error,
        "command": command_line(__spec__.name, argv),
    }
    old = a.out / "results.json"
    if a.merge and old.exists():
        prev = json.loads(old.read_text())
        kept = [r for r in prev["rows"] if r["suite"] not in suites]
        runs = [{**m, "suites": [s for s in m.get("suites", []) if s not in suites]}
                for m in prev["meta"].get("runs", [prev["meta"]])]
        runs = [m for m in runs if m["suites"]]
        rows = kept + rows
        meta = {**meta, "runs": runs + [{**meta, "suites": suites}]}
    else:
        meta["runs"] = [{**meta, "suites": suites}]
    write_outputs(rows, meta, a.out)
    print(f"wrote {a.out}/results.json and results.csv ({len(rows)} rows, {meta['wall_s']} s)")


if __name__ == "__main__":
    main()
