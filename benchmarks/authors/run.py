"""The authors' own Matryoshka code next to the plugin's, on the same data and budget (#19 item 5).

Two local checkouts, read-only and outside this repository (never copied into it):

- ``--bussmann DIR``: github.com/bartbussmann/matryoshka_sae. Its ``sae.py`` (torch only) gives
  ``GlobalBatchTopKMatryoshkaSAE`` (``bussmann_matryoshka``) and its baseline ``BatchTopKSAE``
  (``bussmann_batch_topk``). ``training.py`` imports wandb and needs a transformer_lens
  model, so its training step is replayed here line for line (``bussmann_step``); the
  loss, aux loss, threshold and decoder normalisation are their model's own methods.
- ``--nabeshima DIR``: github.com/noanabeshima/matryoshka-saes. Its ``sae.py`` (torch and
  numpy) gives ``MatryoshkaSAE``, whose ``step()`` is the whole training step (its own Adam,
  schedule, gradient clipping and latent permutation): ``nabeshima_matryoshka`` with the
  notebook's 10 prefixes, and its baseline ``nabeshima_vanilla`` (one prefix, no
  permutation), as ``train_saes_on_toy.ipynb`` builds them. His coder is an L1 SAE steered
  towards a target L0 (k here) far too slowly for these budgets, so each also runs with
  the starting sparsity scale that ends at L0 = k (``*_l0k``, ``calibrate_nabeshima``).

Next to them, in the same process and on the same row batches in the same order, the
plugin trains through sparsify's Trainer (``fit_activations``): ``topk`` (plain sparsify),
``batch_topk`` (the plugin's one-level BatchTopK),
``matryoshka_fixed`` and ``matryoshka_pareto`` (the plugin's defaults), and the plugin set
up like each author: ``matryoshka_bussmann_like`` (BatchTopK, the bias-only level counted,
fixed groups) and ``matryoshka_nabeshima_like`` (Pareto prefixes, latents permuted every step).

Suites (``--suite``): ``toy`` runs both planted hierarchies of ``matryoshka_plugin.toy``,
``toy`` as ``benchmarks/toy`` builds it and ``hard_toy`` as ``benchmarks/quality`` does;
``smollm2`` runs autoencoders on one SmolLM2-135M MLP input from the activation cache that
``benchmarks/real_model`` reads (both authors' codes only reconstruct their own input, so
no transcoders here). Every coder gets the same width, k, batch, optimizer steps and
learning rate; what their code fixes differently is listed in ``README.md``.

    python -m benchmarks.authors.run --bussmann DIR --nabeshima DIR --suite toy --seeds 0,1,2

writes results.json (other suites' entries are kept), table.md and prefix_fvu.png here.
"""

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import provenance, pyplot, save_figure, write_json, write_markdown
from benchmarks.real_model.run import split_cache
from benchmarks.saelens_jumprelu import SaeLensJumpReLU
from benchmarks.toy.run import FIT_SEQ_LEN, summarise
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.core.errors import CLTError
from matryoshka_plugin.evaluation import prefix_curve
from matryoshka_plugin.fit import epoch_row_order, fit_activations
from matryoshka_plugin.toy import ToyConfig, ToyModel, absorption, dense_codes, hard_toy_config

HERE = Path(__file__).resolve().parent

# A file and the class names in it that identify each checkout.
CHECKOUTS = {
    "bussmann": ("sae.py", ("class GlobalBatchTopKMatryoshkaSAE", "class BatchTopKSAE")),
    "nabeshima": ("sae.py", ("class MatryoshkaSAE", "def sample_prefixes")),
}

# name -> plugin Matryoshka fields ("width": the full width as the only nested size)
PLUGIN_ROWS: dict[str, dict] = {
    "topk": {"matryoshka": False},
    # One level (the full width): the plugin's BatchTopK, to set against Bussmann's.
    "batch_topk": {"matryoshka": True, "batch_topk": True, "nested_sizes": "width"},
    "matryoshka_fixed": {"matryoshka": True, "prefix_schedule": "fixed"},
    "matryoshka_pareto": {"matryoshka": True, "prefix_schedule": "pareto"},
    "matryoshka_bussmann_like": {"matryoshka": True, "prefix_schedule": "fixed", "batch_topk": True, "bias_level": True},
    "matryoshka_nabeshima_like": {"matryoshka": True, "prefix_schedule": "pareto", "permute_every": 1},
}
# name -> (author, class in their sae.py)
AUTHOR_ROWS: dict[str, tuple[str, str]] = {
    "bussmann_batch_topk": ("bussmann", "BatchTopKSAE"),
    "bussmann_matryoshka": ("bussmann", "GlobalBatchTopKMatryoshkaSAE"),
    "nabeshima_vanilla": ("nabeshima", "MatryoshkaSAE"),
    "nabeshima_matryoshka": ("nabeshima", "MatryoshkaSAE"),
    "nabeshima_vanilla_l0k": ("nabeshima", "MatryoshkaSAE"),
    "nabeshima_matryoshka_l0k": ("nabeshima", "MatryoshkaSAE"),
}
ROWS = [*PLUGIN_ROWS, *AUTHOR_ROWS]

# Bussmann's config.get_default_cfg() values for what the shared budget does not set;
# input_unit_norm and l1_coeff as his main.py sets them for the paper's SAEs.
BUSSMANN_DEFAULTS = dict(
    beta1=0.9, beta2=0.99, max_grad_norm=100000, n_batches_to_dead=20, top_k_aux=512,
    aux_penalty=1 / 32, l1_coeff=0.0, input_unit_norm=False,
)
# Nabeshima's train_saes_on_toy.ipynb values for what the shared budget does not set.
NABESHIMA_DEFAULTS = dict(n_prefixes=10, permute_latents=True, sparsity_type="l1", starting_sparsity_loss_scale=0.2)
# His coder is an L1 ReLU SAE whose penalty scale a controller moves by 0.03% a step
# towards the target L0, after a warm-up of a fifth of the run: sized for his notebook's
# 40k steps, it cannot reach L0 = k in a few hundred. The *_l0k rows start it at the
# scale, found by bisection on seed 0, whose run ends at L0 = k on training rows.
CALIBRATION_BRACKET = (1e-3, 1e3)
CALIBRATION_ROUNDS = 8


@dataclass(frozen=True)
class Suite:
    name: str
    width: int
    k: int
    batch_size: int
    steps: int
    lr: float
    available_rows: int  # training rows on offer; the budget may use fewer


def toy_model(name: str) -> ToyModel:
    """The planted hierarchy of ``benchmarks/toy`` (``toy``) or ``benchmarks/quality`` (``hard_toy``)."""
    return ToyModel(ToyConfig(seed=0) if name == "toy" else hard_toy_config())


def default_suite(name: str, available_rows: int | None = None) -> Suite:
    """Each suite's budget as its source benchmark trains it.

    ``toy``: benchmarks/toy (width = true features, k 4, 65536 rows x 6 epochs of 512,
    Adam 3e-3); ``hard_toy``: benchmarks/quality's w2_k6 (width 2 x 96, k 6, 8 epochs);
    ``smollm2``: benchmarks/real_model (width 1152, k 32, batch 1024, 4 epochs, Adam 7.5e-4)
    on ``available_rows`` cached rows.
    """
    if name == "toy":
        return Suite(name, toy_model(name).cfg.n_features, 4, 512, 65536 // 512 * 6, 3e-3, 65536)
    if name == "hard_toy":
        return Suite(name, 2 * toy_model(name).cfg.n_features, 6, 512, 65536 // 512 * 8, 3e-3, 65536)
    if name == "smollm2":
        if available_rows is None:
            raise ValueError("the smollm2 suite needs the number of cached training rows")
        return Suite(name, 1152, 32, 1024, available_rows // 1024 * 4, 7.5e-4, available_rows)
    raise ValueError(f"unknown suite {name!r}; allowed: toy, hard_toy, smollm2")


@dataclass(frozen=True)
class Budget:
    rows: int  # training rows used, each seen once per epoch
    epochs: int
    steps: int  # optimizer steps of batch_size rows: rows * epochs / batch_size


def plan_budget(available_rows: int, steps: int, batch_size: int, seq_len: int = FIT_SEQ_LEN) -> Budget:
    """The fewest epochs over the first rows that make exactly ``steps`` steps of ``batch_size``.

    ``fit_activations`` groups rows into sequences of ``seq_len`` and steps over whole
    batches, so the batch must be whole sequences; the epochs must divide the steps so
    every epoch is the same rows. Raises ``ValueError`` naming the value when no plan fits.
    """
    if batch_size < 1 or batch_size % seq_len:
        raise ValueError(f"--batch-size {batch_size} must be a positive multiple of {seq_len} rows")
    if steps < 1:
        raise ValueError(f"--steps {steps} must be at least 1")
    if available_rows < batch_size:
        raise ValueError(f"{available_rows} training rows are fewer than one batch of {batch_size}")
    for epochs in range(math.ceil(steps * batch_size / available_rows), steps + 1):
        if steps % epochs == 0:
            return Budget(rows=steps // epochs * batch_size, epochs=epochs, steps=steps)
    raise AssertionError("unreachable: epochs == steps always fits")


def row_batches(budget: Budget, batch_size: int, seed: int) -> Tensor:
    """``[steps, batch_size]`` row indices: the batches sparsify's Trainer gets from
    ``fit_activations`` (its DataLoader does not shuffle), in the same order."""
    order = epoch_row_order(budget.rows, budget.epochs, seed, True)
    return order.view(budget.steps, batch_size)


def check_checkout(path: str | None, author: str) -> str | None:
    """The one-line complaint about ``--AUTHOR PATH``, or None if it looks like that repository."""
    flag = f"--{author}"
    if not path:
        return f"{flag} is required: a local checkout of {_repo(author)}"
    p = Path(path)
    if not p.is_dir():
        return f"{flag} {path}: no such directory"
    file, marks = CHECKOUTS[author]
    f = p / file
    text = f.read_text(errors="replace") if f.is_file() else ""
    missing = [m for m in marks if m not in text]
    if missing:
        return f"{flag} {path} does not look like {_repo(author)}: {file} lacks {missing[0]!r}"
    return None


def _repo(author: str) -> str:
    return {"bussmann": "bartbussmann/matryoshka_sae", "nabeshima": "noanabeshima/matryoshka-saes"}[author]


def load_sae_module(checkout: str | Path, author: str):
    """The checkout's ``sae.py`` as a module of its own name, imported from its path
    (the rest of the repository, with its wandb and transformer_lens imports, is not)."""
    path = Path(checkout) / "sae.py"
    spec = importlib.util.spec_from_file_location(f"{author}_sae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bussmann_cfg(suite: Suite, d_in: int, nested_sizes: list[int], seed: int) -> dict:
    """Bussmann's cfg dict for this budget: his defaults, our width, k, lr, seed and groups."""
    bounds = [0, *nested_sizes]
    return dict(
        BUSSMANN_DEFAULTS, seed=seed, act_size=d_in, dict_size=suite.width, top_k=suite.k, lr=suite.lr,
        batch_size=suite.batch_size, group_sizes=[b - a for a, b in zip(bounds, bounds[1:])],
        device="cpu", dtype=torch.float32,
    )


def bussmann_step(sae, optimizer, batch: Tensor) -> dict:
    """One step of Bussmann's ``training.train_sae`` loop (loss, backward, clip, unit-norm
    decoder and its gradient, Adam), without its wandb logging and checkpoints."""
    out = sae(batch)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), sae.config["max_grad_norm"])
    sae.make_decoder_weights_and_grad_unit_norm()
    optimizer.step()
    optimizer.zero_grad()
    return out


def train_bussmann(module, cls: str, x: Tensor, batches: Tensor, suite: Suite, nested_sizes: list[int], seed: int):
    cfg = bussmann_cfg(suite, x.shape[1], nested_sizes, seed)
    started = time.perf_counter()
    sae = getattr(module, cls)(cfg)  # seeds torch itself, as in his code
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    for idx in batches:
        bussmann_step(sae, optimizer, x[idx])
    return sae.eval(), time.perf_counter() - started


def train_nabeshima(module, name: str, x: Tensor, batches: Tensor, suite: Suite, seed: int, scale: float | None = None):
    """His ``MatryoshkaSAE`` trained by its own ``step()``; ``scale``: the starting
    sparsity scale (default the notebook's)."""
    opts = dict(NABESHIMA_DEFAULTS)
    if name.startswith("nabeshima_vanilla"):  # the notebook's vanilla_config
        opts.update(n_prefixes=1, permute_latents=False)
    if scale is not None:
        opts["starting_sparsity_loss_scale"] = scale
    torch.manual_seed(seed)  # his weights come from torch's global RNG,
    np.random.seed(seed)  # his prefixes from numpy's
    started = time.perf_counter()
    sae = module.MatryoshkaSAE(
        d_model=x.shape[1], n_latents=suite.width, target_l0=suite.k, n_steps=len(batches), lr=suite.lr, **opts
    )
    for idx in batches:
        sae.step(x[idx])
    return sae.eval(), time.perf_counter() - started


def calibrate_nabeshima(module, name: str, x: Tensor, batches: Tensor, suite: Suite, seed: int) -> dict:
    """The starting sparsity scale whose run ends nearest L0 = k (on 4096 training rows):
    bisection in log scale, the L0 falling as the scale grows."""
    lo, hi = (math.log(b) for b in CALIBRATION_BRACKET)
    tried = []
    for _ in range(CALIBRATION_ROUNDS):
        mid = (lo + hi) / 2
        sae, _ = train_nabeshima(module, name, x, batches, suite, seed, math.exp(mid))
        coder, _ = nabeshima_adapter(sae, x[:16])
        l0 = float((coder.dense_acts(x[:4096]) > 0).sum(1).float().mean())
        tried.append({"scale": math.exp(mid), "l0": l0})
        lo, hi = (mid, hi) if l0 > suite.k else (lo, mid)
    best = min(tried, key=lambda t: abs(math.log(max(t["l0"], 1e-3) / suite.k)))
    return {"scale": best["scale"], "l0": best["l0"], "tried": tried}


@torch.no_grad()
def bussmann_adapter(sae, x_check: Tensor) -> tuple[SaeLensJumpReLU, float]:
    """His eval-mode coder (ReLU of ``(x - b_dec) W_enc``, kept above the learnt batch
    threshold; no encoder bias) behind the plugin's metrics, and its largest difference
    from his own ``encode``/``decode`` on ``x_check``."""
    tensors = {"W_enc": sae.W_enc, "b_enc": torch.zeros(sae.W_enc.shape[1]), "W_dec": sae.W_dec,
               "b_dec": sae.b_dec, "threshold": sae.threshold}
    coder = SaeLensJumpReLU(tensors, apply_b_dec_to_input=True, transcode=False, k=sae.config["top_k"])
    theirs_acts = sae.encode(x_check)
    diff = max(float((coder.dense_acts(x_check) - theirs_acts).abs().max()),
               float((coder.decode(*coder.encode(x_check)[:2]) - sae.decode(theirs_acts)).abs().max()))
    return coder, diff


@torch.no_grad()
def nabeshima_adapter(sae, x_check: Tensor) -> tuple[SaeLensJumpReLU, float]:
    """His coder behind the plugin's metrics, and its largest difference from his own code.

    He normalises inputs by ``s = running mean norm / sqrt(d)`` and does not keep decoder
    rows at unit norm; his reconstruction is ``s * (relu(x/s W_enc + b_enc) W_dec + b_dec)``.
    Folding ``s`` and the row norms into the weights gives the same reconstruction from
    activations ``relu(.) * |W_dec row| * s`` on unit decoder rows (what the toy's
    absorption reads: activation x row = the latent's share of the output). His
    ``get_acts`` reports the same up to one constant: its ``unnormalize`` takes the
    square root of the latents' count, not of d, so it is ``sqrt(d / width)`` times ours.
    """
    s = float(sae.normalizer.running_avg) / math.sqrt(sae.d_model)
    norms = sae.W_dec.norm(dim=1)
    tensors = {"W_enc": sae.W_enc * norms, "b_enc": sae.b_enc * norms * s, "W_dec": sae.W_dec / norms[:, None],
               "b_dec": sae.b_dec * s, "threshold": torch.tensor(0.0)}
    coder = SaeLensJumpReLU(tensors, apply_b_dec_to_input=False, transcode=False, k=sae.sparsity_controller.target_l0)
    xn = sae.normalizer.normalize(x_check)
    theirs_recon = sae.normalizer.unnormalize((xn @ sae.W_enc + sae.b_enc).relu() @ sae.W_dec + sae.b_dec)
    his_acts = sae.get_acts(x_check) * math.sqrt(sae.n_latents / sae.d_model)
    diff = max(float((coder.dense_acts(x_check) - his_acts).abs().max()),
               float((coder.decode(*coder.encode(x_check)[:2]) - theirs_recon).abs().max()))
    return coder, diff


def train_plugin(name: str, x: Tensor, budget: Budget, suite: Suite, seed: int, **train_kwargs):
    """The plugin row ``name`` trained on the suite's budget; ``train_kwargs`` replace the
    shared ``TrainConfig`` settings (optimizer, lr, warm-up)."""
    fields = dict(PLUGIN_ROWS[name])
    if fields.get("nested_sizes") == "width":
        fields["nested_sizes"] = [suite.width]
    cfg = MatryoshkaSparseCoderConfig(num_latents=suite.width, k=suite.k, **fields)
    shared = dict(optimizer="adam", lr=suite.lr, lr_warmup_steps=warmup_steps(budget.steps))
    started = time.perf_counter()
    coder = fit_activations(
        x[: budget.rows], cfg, batch_size=suite.batch_size, epochs=budget.epochs, seed=seed,
        **(shared | train_kwargs),
    )
    return coder, time.perf_counter() - started


def warmup_steps(steps: int) -> int:
    """The plugin's Adam warm-up: a tenth of the run, as ``fit_activations`` sets it by default."""
    return max(1, round(0.1 * steps))


@torch.no_grad()
def measure(coder, x_test: Tensor, prefix_lens: list[int], toy: ToyModel | None, f_test: Tensor | None) -> dict:
    """FVU at each prefix, L0 and dead latents on held-out rows, and absorption on a toy."""
    curve = prefix_curve(coder, x_test, None, prefix_lens, rsa_samples=0)
    fired = dense_codes(coder, x_test).gt(0).any(0)
    out = {
        "fvu_full": curve[-1]["fvu"],
        "l0_full": curve[-1]["l0"],
        "dead": int((~fired).sum()),
        "fvu_vs_prefix": {str(r["prefix_len"]): r["fvu"] for r in curve},
    }
    if toy is not None:
        a = absorption(coder, toy, x_test, f_test)
        out["absorption_rate"] = a["absorption_rate"]
        out["parent_miss_rate"] = a["parent_miss_rate"]
    return out


def suite_data(name: str, cache: str | None, layer: int, test_fraction: float, ctx_len: int):
    """Training rows, held-out rows (and the toy and its feature magnitudes on a toy)."""
    if name in ("toy", "hard_toy"):
        toy = toy_model(name)
        # The sample seeds both source benchmarks use (toy seed 0).
        x_train, _ = toy.sample(65536, seed=1000)
        x_test, f_test = toy.sample(8192, seed=2000)
        return x_train, x_test, toy, f_test
    from matryoshka_plugin.clt import ActivationCache

    c = ActivationCache(cache)
    c.check_layers([layer])
    seq_tokens = ctx_len - (1 if c.manifest.get("skip_first_token", True) else 0)
    boundary = split_cache(c.n_tokens, seq_tokens, test_fraction)
    x, _ = c.load([layer])
    x = x[:, 0].float()  # the MLP input: an autoencoder target both authors' codes accept
    return x[:boundary], x[boundary:], None, None


def run_suite(name: str, args, modules: dict) -> dict:
    x_train, x_test, toy, f_test = suite_data(name, args.cache, args.layer, args.test_fraction, args.ctx_len)
    suite = default_suite(name, len(x_train))
    steps = args.steps or suite.steps
    budget = plan_budget(len(x_train), steps, suite.batch_size)
    nested = MatryoshkaSparseCoderConfig(matryoshka=True).resolve_nested_sizes(suite.width, suite.k)
    prefix_lens = sorted({*nested, *(2**i for i in range(1, suite.width.bit_length()) if 2**i < suite.width)})
    x_check = x_test[:1024]
    per_seed: dict[str, list[dict]] = {r: [] for r in args.rows}
    checks: dict[str, float] = {}
    calibration = {
        r: calibrate_nabeshima(modules["nabeshima"], r, x_train, row_batches(budget, suite.batch_size, args.seeds[0]),
                               suite, args.seeds[0])
        for r in args.rows if r.endswith("_l0k")
    }
    for seed in args.seeds:
        batches = row_batches(budget, suite.batch_size, seed)
        for row in args.rows:
            if row in PLUGIN_ROWS:
                coder, seconds = train_plugin(row, x_train, budget, suite, seed)
            else:
                author, cls = AUTHOR_ROWS[row]
                if author == "bussmann":
                    sae, seconds = train_bussmann(modules[author], cls, x_train, batches, suite, nested, seed)
                    coder, diff = bussmann_adapter(sae, x_check)
                else:
                    scale = calibration[row]["scale"] if row in calibration else None
                    sae, seconds = train_nabeshima(modules[author], row, x_train, batches, suite, seed, scale)
                    coder, diff = nabeshima_adapter(sae, x_check)
                if not diff <= 1e-4 * max(1.0, float(x_check.abs().max())):
                    raise SystemExit(f"run.py: error: the {row} adapter differs from the authors' code by {diff:.3g}")
                checks[f"{row}/seed{seed}"] = diff
            m = measure(coder, x_test, prefix_lens, toy, f_test)
            m["seconds"] = seconds
            m["ms_per_step"] = 1000 * seconds / budget.steps
            per_seed[row].append(m)
            print(f"{name} seed {seed} {row}: FVU {m['fvu_full']:.4f} L0 {m['l0_full']:.2f} dead {m['dead']} "
                  f"absorption {m.get('absorption_rate', float('nan')):.3f} {m['ms_per_step']:.1f} ms/step",
                  file=sys.stderr, flush=True)
    summary = {}
    for row, runs in per_seed.items():
        scalars = [k for k in runs[0] if k != "fvu_vs_prefix"]
        summary[row] = {k: summarise([r[k] for r in runs]) for k in scalars}
        summary[row]["fvu_vs_prefix"] = {p: summarise([r["fvu_vs_prefix"][p] for r in runs]) for p in runs[0]["fvu_vs_prefix"]}
    settings = {
        **asdict(suite), "steps": budget.steps, "train_rows": budget.rows, "epochs": budget.epochs,
        "test_rows": len(x_test), "seeds": args.seeds, "nested_sizes": nested, "prefix_lens": prefix_lens,
        "plugin_lr_warmup_steps": warmup_steps(budget.steps), "threads": torch.get_num_threads(),
        "bussmann": dict(BUSSMANN_DEFAULTS), "nabeshima": dict(NABESHIMA_DEFAULTS),
        "nabeshima_l0k_calibration": calibration,
    }
    if toy is not None:
        settings["toy"] = asdict(toy.cfg)
    else:
        settings.update(cache=str(Path(args.cache).resolve()), layer=args.layer, site=f"layers.{args.layer}.mlp input")
    return {**provenance(__spec__.name if __spec__ else "benchmarks.authors.run"), "settings": settings,
            "adapter_max_abs_diff": checks, "summary": summary, "per_seed": per_seed}


# Settings that differ between runs of one suite without changing what was measured.
PER_RUN_SETTINGS = ("nabeshima_l0k_calibration",)


def merge_rows(old: dict, new: dict) -> dict:
    """``old``'s suite entry with ``new``'s rows added (or replaced); both runs recorded.
    Raises ``ValueError`` naming the first setting on which they differ."""
    for key, value in new["settings"].items():
        if key not in PER_RUN_SETTINGS and old["settings"].get(key) != value:
            raise ValueError(f"cannot merge: setting {key!r} is {value!r} here but "
                             f"{old['settings'].get(key)!r} in results.json; rerun without --merge")
    merged = {**old, "summary": {**old["summary"], **new["summary"]}, "per_seed": {**old["per_seed"], **new["per_seed"]},
              "adapter_max_abs_diff": {**old["adapter_max_abs_diff"], **new["adapter_max_abs_diff"]}}
    merged["settings"] = {**old["settings"], "nabeshima_l0k_calibration": {
        **old["settings"]["nabeshima_l0k_calibration"], **new["settings"]["nabeshima_l0k_calibration"]}}
    first = {k: old[k] for k in ("command", "date", "machine")} | {"rows": list(old["summary"])}
    merged["runs"] = old.get("runs", [first]) + [{k: new[k] for k in ("command", "date", "machine")} | {"rows": list(new["summary"])}]
    order = [r for r in ROWS if r in merged["summary"]]
    merged["summary"] = {r: merged["summary"][r] for r in order}
    merged["per_seed"] = {r: merged["per_seed"][r] for r in order}
    return merged


LABELS = {
    "topk": "plugin TopK (sparsify)",
    "batch_topk": "plugin BatchTopK",
    "matryoshka_fixed": "plugin fixed groups",
    "matryoshka_pareto": "plugin Pareto",
    "matryoshka_bussmann_like": "plugin, Bussmann's set-up",
    "matryoshka_nabeshima_like": "plugin, Nabeshima's set-up",
    "bussmann_batch_topk": "Bussmann BatchTopK",
    "bussmann_matryoshka": "Bussmann Matryoshka",
    "nabeshima_vanilla": "Nabeshima vanilla",
    "nabeshima_matryoshka": "Nabeshima Matryoshka",
    "nabeshima_vanilla_l0k": "Nabeshima vanilla, L0 ≈ k",
    "nabeshima_matryoshka_l0k": "Nabeshima Matryoshka, L0 ≈ k",
}


def table(result: dict) -> list[str]:
    fmt = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}" if d["n"] > 1 else f"{d['mean']:.4f}"  # noqa: E731
    lines = ["# The authors' implementations next to the plugin's", ""]
    for name, r in result["suites"].items():
        s = r["settings"]
        P = [str(p) for p in s["nested_sizes"]]
        lines += [
            f"## {name}", "",
            f"{r['date']}, {r['machine']}. Command: `{r['command']}`.",
            *(f"Rows {', '.join(run['rows'])} added {run['date']} by `{run['command']}`." for run in r.get("runs", [])[1:]),
            "",
            f"Width {s['width']}, k {s['k']}, {s['steps']} steps of {s['batch_size']} rows ({s['epochs']} epochs of "
            f"{s['train_rows']} rows), lr {s['lr']:g}, seeds {s['seeds']}, {s['test_rows']} held-out rows; "
            f"FVU at the nested sizes {s['nested_sizes']}.", "",
        ]
        has_abs = "absorption_rate" in next(iter(r["summary"].values()))
        head = ["row", *(["absorption"] if has_abs else []), *(f"FVU P={p}" for p in P), "L0", "dead", "ms/step"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for row, m in r["summary"].items():
            cells = [LABELS.get(row, row), *([fmt(m["absorption_rate"])] if has_abs else []),
                     *(fmt(m["fvu_vs_prefix"][p]) for p in P), f"{m['l0_full']['mean']:.2f}",
                     f"{m['dead']['mean']:.1f}", f"{m['ms_per_step']['mean']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    suites = list(result["suites"])
    fig, axes = plt.subplots(1, len(suites), figsize=(5.5 * len(suites), 4.3), squeeze=False)
    for ax, name in zip(axes[0], suites):
        r = result["suites"][name]
        for i, (row, m) in enumerate(r["summary"].items()):
            P = [int(p) for p in m["fvu_vs_prefix"]]
            style = "o-" if row in PLUGIN_ROWS else "s--"
            ax.errorbar(P, [m["fvu_vs_prefix"][str(p)]["mean"] for p in P],
                        yerr=[m["fvu_vs_prefix"][str(p)]["std"] for p in P], fmt=style, ms=3, capsize=2,
                        color=plt.cm.tab20(i % 20), label=LABELS.get(row, row))
        ax.set(xscale="log", yscale="log", xlabel="prefix length P (latents kept)", ylabel="held-out FVU",
               title=f"{name}: width {r['settings']['width']}, k {r['settings']['k']}")
        ax.set_xticks(r["settings"]["nested_sizes"], [str(p) for p in r["settings"]["nested_sizes"]])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("plugin (solid) and the authors' code (dashed), same data and steps; 2026-12-02, shared 2-core CPU machine",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.authors.run", description=__doc__.splitlines()[0])
    p.add_argument("--bussmann", help="local checkout of bartbussmann/matryoshka_sae")
    p.add_argument("--nabeshima", help="local checkout of noanabeshima/matryoshka-saes")
    p.add_argument("--suite", choices=["toy", "smollm2", "all"], default="toy")
    p.add_argument("--seeds", type=lambda s: [int(t) for t in s.split(",")], default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per coder (default: each suite's own budget)")
    p.add_argument("--rows", type=lambda s: s.split(","), default=ROWS, metavar="NAME[,NAME]",
                   help=f"coders to train (default all: {','.join(ROWS)})")
    p.add_argument("--cache", help="smollm2: activation cache from `matryoshka-clt cache` holding --layer")
    p.add_argument("--layer", type=int, default=6, help="smollm2: the MLP whose input is reconstructed")
    p.add_argument("--test-fraction", type=float, default=0.1, help="smollm2: last fraction of sequences held out")
    p.add_argument("--ctx-len", type=int, default=128, help="smollm2: the cache's context length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--merge", action="store_true",
                   help="add these rows to each suite already in OUT_DIR/results.json (same settings) instead of replacing it")
    p.add_argument("--out-dir", type=Path, default=HERE)
    return p.parse_args(argv)


def refusal(args) -> str | None:
    """The one-line complaint about the arguments, or None."""
    for author in ("bussmann", "nabeshima"):
        if any(AUTHOR_ROWS[r][0] == author for r in args.rows if r in AUTHOR_ROWS):
            if (msg := check_checkout(getattr(args, author), author)) is not None:
                return msg
    if unknown := [r for r in args.rows if r not in ROWS]:
        return f"--rows {unknown[0]!r} is unknown; allowed: {', '.join(ROWS)}"
    if args.steps < 0:
        return f"--steps {args.steps} must be at least 1 (0: each suite's own budget)"
    if args.threads < 1:
        return f"--threads {args.threads} must be at least 1"
    if args.suite in ("smollm2", "all") and not args.cache:
        return "--cache is required for the smollm2 suite (an activation cache from `matryoshka-clt cache`)"
    if args.cache and not Path(args.cache).is_dir():
        return f"--cache {args.cache}: no such directory"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if (msg := refusal(args)) is not None:
        print(f"run.py: error: {msg}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    authors = {AUTHOR_ROWS[r][0] for r in args.rows if r in AUTHOR_ROWS}
    modules = {a: load_sae_module(getattr(args, a), a) for a in sorted(authors)}
    suites = {"toy": ["toy", "hard_toy"], "smollm2": ["smollm2"], "all": ["toy", "hard_toy", "smollm2"]}[args.suite]
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    result = json.loads(path.read_text()) if path.is_file() else {"suites": {}}
    for name in suites:
        try:
            new = run_suite(name, args, modules)
            old = result["suites"].get(name)
            result["suites"][name] = merge_rows(old, new) if args.merge and old else new
        except (ValueError, CLTError) as e:  # a budget that cannot be planned, a cache without the layer
            print(f"run.py: error: {e}", file=sys.stderr)
            return 2
        write_json(result, path)  # after every suite: a later failure keeps the finished ones
    write_markdown(table(result), out / "table.md")
    plot(result, out / "prefix_fvu.png")
    print("\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
