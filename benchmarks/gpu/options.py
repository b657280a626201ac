"""(5) The issue-#19 training options on the device (called by ``benchmarks/gpu/check.py``).

- ``prefix_schedule: adaptive``: the sizes the device run moves to against a CPU float64
  run of the same coder on the same batches, the sizes kept through ``save_to_disk`` and
  ``load_coder`` onto the device, and the step time against the fixed schedule.
- ``permute_every``: the eval output before and after a reorder, and an Adam step after
  a reorder against the permuted step without it, once with the optimizer state moved
  (the plugin) and once with the weights alone (the published implementation's mistake).
- The BatchTopK threshold (``core.batch_topk.update_threshold``): the update rule in
  float32 and bfloat16 on the device against float64 on the CPU, and held-out L0 over k
  of a coder whose threshold the device trained.

Each function returns plain numbers; ``lines`` writes them as the results' section.
"""

import copy
import tempfile

import torch

from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, load_coder
from matryoshka_plugin.core.batch_topk import update_threshold

from benchmarks.training_cost.run import CoderStep, doubling_sizes


def _coder(d: int, width: int, k: int, **fields) -> MatryoshkaSparseCoder:
    torch.manual_seed(0)
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=width, k=k,
                                      nested_sizes=doubling_sizes(width, 5), **fields)
    return MatryoshkaSparseCoder(d, cfg)


def _batches(count: int, n: int, d: int, seed: int):
    """One batch at a time: 300 production batches in float64 would hold 2.8 GB."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(n, d, generator=g, dtype=torch.float64)


@torch.no_grad()
def adaptive_check(device: str, d: int, width: int, k: int, n: int, timer, reps: int) -> dict:
    fields = dict(prefix_schedule="adaptive", adaptive_every=2)
    ref = _coder(d, width, k, **fields).double()
    # Latents firing less the later they come: the levels must move, and shrink.
    ref.encoder.bias.copy_(torch.linspace(1, 0, width, dtype=torch.float64))
    dev = _coder(d, width, k, **fields).to(device)
    dev.load_state_dict({name: t.float() for name, t in ref.state_dict().items()})
    for x in _batches(5, n, d, seed=1):  # moves after batches 2 and 4; batch 5 trains at the last move
        ref.train()(x)
        dev.train()(x.float().to(device))
    with tempfile.TemporaryDirectory() as tmp:
        dev.save_to_disk(f"{tmp}/coder")
        reloaded = load_coder(f"{tmp}/coder", device=device).nested_sizes
    x = torch.randn(n, d, device=device)
    times = {}
    for name, extra in (("fixed", {}), ("adaptive", dict(prefix_schedule="adaptive", adaptive_every=1))):
        with torch.enable_grad():
            times[name] = timer(CoderStep(_coder(d, width, k, **extra).to(device), x), reps)
    return {
        "start": doubling_sizes(width, 5), "sizes_ref": ref.nested_sizes, "sizes_dev": dev.nested_sizes,
        "sizes_reloaded": reloaded,
        "mass_rel_err": float((dev.sampler.mass.mass.cpu() - ref.sampler.mass.mass).norm()
                              / ref.sampler.mass.mass.norm()),
        "step_s_fixed": times["fixed"], "step_s_adaptive_every_1": times["adaptive"],
    }


def _within_levels_perm(sizes: list[int], seed: int) -> torch.Tensor:
    """Keeps every latent in its level, so the nested loss is the same function after it."""
    g = torch.Generator().manual_seed(seed)
    starts = [0, *sizes[:-1]]
    return torch.cat([a + torch.randperm(b - a, generator=g) for a, b in zip(starts, sizes)])


def _step_error(step: CoderStep, perm: torch.Tensor, move_optimizer: bool) -> float:
    """How far a step after reordering by ``perm`` lands from the reordered step, as a
    fraction of the step itself (encoder weights)."""
    moved = CoderStep(copy.deepcopy(step.coder), step.x)
    moved.opt.load_state_dict(copy.deepcopy(step.opt.state_dict()))
    mass = torch.zeros(len(perm), dtype=torch.float64)
    mass[perm] = torch.arange(len(perm), 0, -1, dtype=torch.float64)
    moved.coder.latent_mass.mass = mass.to(step.x.device)
    moved.coder.permute_by_mass([moved.opt] if move_optimizer else [])
    plain = CoderStep(copy.deepcopy(step.coder), step.x)
    plain.opt.load_state_dict(copy.deepcopy(step.opt.state_dict()))
    before = plain.coder.encoder.weight.detach().clone()
    plain()
    moved()
    expected = plain.coder.encoder.weight.detach()[perm.to(before.device)]
    change = (plain.coder.encoder.weight.detach() - before).norm()
    return float((moved.coder.encoder.weight.detach() - expected).norm() / change)


def permute_check(device: str, d: int, width: int, k: int, n: int, timer, reps: int) -> dict:
    coder = _coder(d, width, k, permute_every=1).to(device)
    step = CoderStep(coder, torch.randn(n, d, device=device))
    for _ in range(3):  # Adam moments worth moving
        step()
    probe = torch.randn(n, d, device=device)
    with torch.no_grad():
        before = coder.eval()(probe).sae_out.float()
        coder.latent_mass.mass = torch.rand(width, dtype=torch.float64, device=device)
        perm = coder.permute_by_mass([step.opt])
        after = coder(probe).sae_out.float()
    coder.train()
    within = _within_levels_perm(coder.nested_sizes, seed=3)
    return {
        "moved_latents": int((perm.cpu() != torch.arange(width)).sum()),
        "output_rel_err": float((after - before).abs().max() / before.abs().max()),
        "step_rel_err_optimizer_moved": _step_error(step, within, move_optimizer=True),
        "step_rel_err_weights_only": _step_error(step, within, move_optimizer=False),
        "reorder_s": timer(lambda: coder.permute_by_mass([step.opt]), reps),
    }


@torch.no_grad()
def threshold_check(device: str, d: int, width: int, k: int, n: int, batches: int) -> dict:
    g = torch.Generator().manual_seed(2)
    min_kept = torch.rand(batches, generator=g, dtype=torch.float64) * 2
    rule = {}
    for name, dtype in (("float64_cpu", torch.float64), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        where = "cpu" if dtype == torch.float64 else device
        threshold = torch.tensor(-1.0, dtype=dtype, device=where)
        updates = torch.zeros((), dtype=torch.long, device=where)
        path = []
        for m in min_kept.to(where, dtype):
            update_threshold(threshold, updates, m, 0.99)
            path.append(float(threshold))
        rule[name] = (torch.tensor(path, dtype=torch.float64), int(updates))
    ref = rule["float64_cpu"][0]
    out = {f"rule_rel_err_{name}": float(((p - ref).abs() / ref.abs()).max()) for name, (p, _) in rule.items()
           if name != "float64_cpu"}
    out["rule_updates_equal"] = len({u for _, u in rule.values()}) == 1
    coder = _coder(d, width, k, batch_topk=True).to(device).train()
    for x in _batches(batches, n, d, seed=4):
        coder(x.float().to(device))
    held_out = torch.randn(n, d, device=device)
    acts = coder.eval().encode(held_out).top_acts
    out.update(batches=batches, threshold=float(coder.batch_topk_threshold),
               updates=int(coder.batch_topk_updates), held_out_l0_over_k=float((acts > 0).sum(1).float().mean() / k))
    return out


def run_all(device: str, d: int, width: int, k: int, n: int, timer, reps: int, batches: int) -> dict:
    return {
        "shape": {"d": d, "width": width, "k": k, "tokens": n},
        "adaptive": adaptive_check(device, d, width, k, n, timer, reps),
        "permute": permute_check(device, d, width, k, n, timer, reps),
        "threshold": threshold_check(device, d, width, k, n, batches),
    }


def lines(r: dict) -> list[str]:
    a, p, t, s = r["adaptive"], r["permute"], r["threshold"], r["shape"]
    return [
        f"Options of issue #19 (d {s['d']}, width {s['width']}, k {s['k']}, {s['tokens']} tokens a batch):",
        f"- adaptive: sizes {a['start']} moved to {a['sizes_dev']} on the device, {a['sizes_ref']} in CPU "
        f"float64 (equal: {a['sizes_dev'] == a['sizes_ref']}; activation mass rel. err {a['mass_rel_err']:.2e}); "
        f"reloaded from disk: {a['sizes_reloaded']} (equal: {a['sizes_reloaded'] == a['sizes_dev']}); step "
        f"{a['step_s_fixed'] * 1e3:.1f} ms fixed, {a['step_s_adaptive_every_1'] * 1e3:.1f} ms adaptive moving every step "
        f"({a['step_s_adaptive_every_1'] / a['step_s_fixed']:.3f}x)",
        f"- permute_every: {p['moved_latents']} latents moved; eval output rel. err {p['output_rel_err']:.2e}; "
        f"Adam step after a reorder vs the reordered step (error / step size): {p['step_rel_err_optimizer_moved']:.2e} "
        f"with the optimizer state moved, {p['step_rel_err_weights_only']:.2e} with the weights alone; "
        f"one reorder with Adam state {p['reorder_s'] * 1e3:.2f} ms",
        f"- BatchTopK threshold: update rule max rel. err vs CPU float64 over {t['batches']} batches: "
        f"float32 {t['rule_rel_err_float32']:.2e}, bfloat16 {t['rule_rel_err_bfloat16']:.2e} (same count: "
        f"{t['rule_updates_equal']}); a coder trained {t['updates']} batches: threshold {t['threshold']:.4f}, "
        f"held-out L0 / k {t['held_out_l0_over_k']:.3f}",
    ]
