"""The demo's job, offline: Matryoshka transcoders on SmolLM2's MLPs, trained on Austen,
compared with plain TopK, and taken on to attribution graphs at three prefix lengths.

``run`` (the work of ``matryoshka-demo``, whose options are in ``cli.demo``):

1. trains one Matryoshka transcoder per MLP (input -> output of ``layers.N.mlp``) and a
   plain TopK baseline (same width, k, data, steps, seed) with sparsify's own ``Trainer``
   (through ``MatryoshkaTrainer``), saved in sparsify's checkpoint layout;
2. measures the FVU of every prefix of both dictionaries on held-out text (the last 10%
   of each novel): a JSON table and one plot with both curves per hookpoint;
3. exports the Matryoshka transcoders for circuit-tracer, layers it did not train as zero
   transcoders (their MLP output is an error node, so the graph stays exact);
4. builds attribution graphs of an Austen prompt at three prefix lengths, with the
   viewer's feature pages and decompositions.

Outputs under ``--out``:
  checkpoints/austen/layers.N.mlp/{cfg.json,sae.safetensors}       Matryoshka (sparsify layout)
  checkpoints/austen-topk/layers.N.mlp/{cfg.json,sae.safetensors}  the TopK baseline
  prefix_fvu.json   {"settings", "matryoshka": {hookpoint: {P: fvu}}, "topk": {...}}
  prefix_fvu.png    FVU against prefix length, both coders, one panel per hookpoint
  transcoders/      the circuit-tracer transcoder set (every model layer)
  graphs/           graph files with supernodes (+ .hierarchy.json), scores and viewer data
                    (serve with ``viewer serve``)
  progress.json     the stages done so far (``--recipe full`` resumes from it)
"""

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters.sparsify import (
    MatryoshkaSparseCoderConfig,
    MatryoshkaTrainConfig,
    MatryoshkaTrainer,
    load_coder,
    prefix_fvu,
)
from .atomic import atomic_write, atomic_write_text
from .core.errors import UsageError
from .core.prefixes import default_prefix_ladder
from .device import resolve_device
from .corpus import AUSTEN_NOVELS, austen_dataset, austen_texts, split_text
from .hooks import capture_mlps, format_layers
from .offline import load_pretrained, load_tokenizer

RUN_NAME = "austen"
TOPK_RUN_NAME = "austen-topk"
RESULTS_JSON = "prefix_fvu.json"
RESULTS_PNG = "prefix_fvu.png"
TRANSCODERS_DIR = "transcoders"
GRAPHS_DIR = "graphs"
PROGRESS_FILE = "progress.json"
GRAPH_SLUG = "austen"
CODERS = {"matryoshka": RUN_NAME, "topk": TOPK_RUN_NAME}
"""The two dictionaries compared: results key -> checkpoint run name."""

#: The opening of Pride and Prejudice; the next token is " wife".
PROMPT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a"
)

#: Each recipe's values for the options left unset (``layers=None``: every model layer).
RECIPES = {
    "demo": dict(layers=[0, 1, 2], num_latents=2048, k=32, ctx_len=64, batch_size=16,
                 steps=80, eval_tokens=8192, save_every=None),
    # Both dictionaries on all 30 SmolLM2 layers. Sized from an estimate of two hours of
    # 2-core CPU; measured end to end it took 40 min 25 s wall (2026-12-02, README).
    "full": dict(layers=None, num_latents=2048, k=32, ctx_len=64, batch_size=16,
                 steps=250, eval_tokens=8192, save_every=25),
}


def hookpoint(layer: int) -> str:
    return f"layers.{layer}.mlp"


def truncate_layers(base_model, n_layers: int) -> None:
    """Keep the first ``n_layers`` decoder layers.

    sparsify's fvu loss runs the whole model although it only needs activations up to
    the last hooked layer; SmolLM2 has 30, so this makes each step several times faster.
    """
    total = len(base_model.layers)
    if not 1 <= n_layers <= total:
        raise UsageError(f"the model has layers 0..{total - 1}; asked for {n_layers} layers")
    base_model.layers = base_model.layers[:n_layers]
    base_model.config.num_hidden_layers = n_layers


def prefix_grid(width: int, nested_sizes: list[int]) -> list[int]:
    """Powers of two below the width, the width and the nested sizes: a readable FVU curve."""
    return sorted(set(default_prefix_ladder(width)) | set(nested_sizes))


def graph_prefix_lens(nested_sizes: list[int]) -> list[int]:
    """Three prefix lengths for the graphs: the smallest, a middle and the full nested size."""
    return sorted({nested_sizes[0], nested_sizes[len(nested_sizes) // 2], nested_sizes[-1]})


@torch.no_grad()
def collect_mlp_activations(
    base_model, dataset, layers: list[int], n_tokens: int, batch_size: int, exclude: Tensor
) -> dict[int, tuple[Tensor, Tensor]]:
    """MLP (input, output) rows of each layer on the first ``n_tokens`` kept tokens."""
    captured: dict[int, tuple[list, list]] = {layer: ([], []) for layer in layers}
    device = next(base_model.parameters()).device
    seen = 0
    n_batches = math.ceil(len(dataset) / batch_size)
    with capture_mlps(base_model, layers) as run, tqdm(
        total=n_tokens, desc="Held-out activations", unit="tok"
    ) as pbar:
        for start in range(0, n_batches * batch_size, batch_size):
            ids = dataset[start : start + batch_size]["input_ids"].to(device)
            keep_mask = torch.isin(ids, exclude.to(device), invert=True).flatten()
            for layer, acts in run(ids).items():
                captured[layer][0].append(acts.input.flatten(0, 1)[keep_mask].float().cpu())
                captured[layer][1].append(acts.output.flatten(0, 1)[keep_mask].float().cpu())
            kept = int(keep_mask.sum())
            pbar.update(min(kept, n_tokens - seen))
            seen += kept
            if seen >= n_tokens:
                break
    return {
        layer: (torch.cat(xs)[:n_tokens], torch.cat(ys)[:n_tokens])
        for layer, (xs, ys) in captured.items()
    }


# -- results: plot, table, summary ---------------------------------------------------------


def plot_prefix_fvu(results: dict, path: Path) -> None:
    """One panel per hookpoint: held-out FVU against prefix length, Matryoshka and TopK."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["matryoshka"])
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.6), squeeze=False)
    s = results["settings"]
    nested = s["nested_sizes"]
    for ax, name in zip(axes.flat, names):
        for coder, style in (("matryoshka", "o-"), ("topk", "s--")):
            fvu = results[coder][name]
            ax.plot([int(p) for p in fvu], list(fvu.values()), style, ms=3, label=coder)
        m = results["matryoshka"][name]
        ax.scatter(nested, [m[str(p)] for p in nested], s=36, facecolors="none",
                   edgecolors="k", zorder=3, label="nested sizes")
        ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("prefix length (latents kept)", fontsize=8)
        ax.set_ylabel("held-out FVU", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"Matryoshka vs TopK transcoders, {Path(s['model']).name}: width {s['num_latents']}, "
        f"k {s['k']}, {s['train_tokens']:,} training tokens each",
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def format_table(results: dict) -> str:
    """Two rows per hookpoint (Matryoshka, TopK), one column per prefix length (* nested)."""
    nested = set(results["settings"]["nested_sizes"])
    names = list(results["matryoshka"])
    lens = list(results["matryoshka"][names[0]])
    name_w = max(len(n) for n in names)
    heads = [f"{p}{'*' if int(p) in nested else ''}" for p in lens]
    rows = [f"{'hookpoint':<{name_w}} {'coder':<10} " + " ".join(f"{h:>7}" for h in heads)]
    rows.append("-" * len(rows[0]))
    for name in names:
        for coder in CODERS:
            fvu = results[coder][name]
            rows.append(f"{name:<{name_w}} {coder:<10} " + " ".join(f"{fvu[p]:>7.4f}" for p in lens))
    rows.append("(* = a nested size trained with its own loss)")
    return "\n".join(rows)


def fvu_ratios(results: dict) -> dict[int, dict[str, float]]:
    """``{nested size: {hookpoint: Matryoshka FVU / TopK FVU}}`` (below 1: Matryoshka better)."""
    return {
        p: {
            name: results["matryoshka"][name][str(p)] / max(results["topk"][name][str(p)], 1e-12)
            for name in results["matryoshka"]
        }
        for p in results["settings"]["nested_sizes"]
    }


def format_summary(results: dict, graphs: dict, out: Path) -> str:
    """The closing summary: FVU ratios per nested size, graph scores, where things are."""
    lines = ["Matryoshka / TopK held-out FVU at each nested size (below 1: Matryoshka better):"]
    for p, by_hp in fvu_ratios(results).items():
        vals = list(by_hp.values())
        detail = ", ".join(f"{n} {r:.2f}" for n, r in by_hp.items()) if len(vals) <= 4 else (
            f"range {min(vals):.2f}..{max(vals):.2f} over {len(vals)} hookpoints"
        )
        lines.append(f"  P={p:>6}: mean {sum(vals) / len(vals):.2f}x  ({detail})")
    lines.append(f"Attribution graphs of {graphs['prompt']!r}:")
    lines.append(f"  {'P':>6} {'replacement':>12} {'completeness':>13} {'path length':>12} {'features':>9} {'seconds':>8}")
    for row in graphs["scores"]:
        lines.append(
            f"  {row['prefix_len']:>6} {row['replacement_score']:12.4f} "
            f"{row['completeness_score']:13.4f} {row['path_length']:12.2f} {row['n_active_features']:>9} "
            f"{row['attribution_seconds']:8.1f}"
        )
    if graphs["empty_layers"]:
        lines.append(f"  (no transcoder at layers {format_layers(graphs['empty_layers'])}: their MLP output is an error node)")
    s = results["settings"]
    lines += [
        "Written:",
        f"  checkpoints  {out / 'checkpoints'} ({RUN_NAME}, {TOPK_RUN_NAME})",
        f"  FVU table    {out / RESULTS_JSON}",
        f"  FVU plot     {out / RESULTS_PNG}",
        f"  transcoders  {out / TRANSCODERS_DIR}",
        f"  graphs       {out / GRAPHS_DIR}",
        f"Total {s['total_seconds']:.0f} s wall, {s['total_cpu_seconds']:.0f} s CPU. View the graphs with:",
        f"  python -m matryoshka_plugin.viewer serve {out / GRAPHS_DIR}",
    ]
    return "\n".join(lines)


# -- options, recipes and resumable stages ---------------------------------------------------


def resolve_options(args) -> dict:
    """The job's settings: ``args`` with the options left unset taken from ``--recipe``."""
    if args.recipe not in RECIPES:
        raise UsageError(f"--recipe={args.recipe} is unknown; allowed: {', '.join(RECIPES)}")
    opts = {name: getattr(args, name) for name in vars(args)}
    for name, value in RECIPES[args.recipe].items():
        if opts.get(name) is None:
            opts[name] = value
    opts["novels"] = opts["novels"] or list(AUSTEN_NOVELS)
    _check_options(opts)
    opts["device"] = str(resolve_device(opts["device"]))
    return opts


def _check_options(o: dict) -> None:
    for name in ("num_latents", "k", "ctx_len", "batch_size", "steps", "eval_tokens",
                 "viewer_tokens", "max_feature_nodes", "attribution_batch_size"):
        if o[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')}={o[name]} must be at least 1")
    if o["k"] > o["num_latents"]:
        raise UsageError(f"--k={o['k']} must not exceed --num-latents={o['num_latents']}")
    if o["lr_warmup_steps"] < 0:
        raise UsageError(f"--lr-warmup-steps={o['lr_warmup_steps']} must be >= 0")
    if o["save_every"] is not None and o["save_every"] < 1:
        raise UsageError(f"--save-every={o['save_every']} must be at least 1")
    layers = o["layers"]
    if layers is not None and (any(l < 0 for l in layers) or len(set(layers)) != len(layers)):
        raise UsageError(f"--layers={layers} must be distinct non-negative layer indices")
    if not o["prompt"].strip():
        raise UsageError("--prompt is empty; give the text to attribute")


#: Options that do not change what the job computes, so a resumed run may change them.
UNFINGERPRINTED = ("out", "device")


class Progress:
    """The job's stages done so far, in ``progress.json``; ``resume`` skips them on a rerun.

    A stage's result is recorded only once its outputs are written, so an interrupted
    stage runs again (training resumes from its last sparsify checkpoint).
    """

    def __init__(self, out: Path, settings: dict, resume: bool):
        self.path = out / PROGRESS_FILE
        self.settings = settings
        self.done: dict = {}
        if resume and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
                earlier, done = saved["settings"], saved["done"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UsageError(f"{self.path} is not a progress record ({e}); delete it to start over") from None
            if earlier != settings:
                diff = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
                raise UsageError(
                    f"--out {out} holds a run with other settings ({', '.join(diff)}); "
                    "rerun with the same options to resume, or give a new --out"
                )
            self.done = done

    def stage(self, name: str, work):
        if name in self.done:
            print(f"[{name}] done in an earlier run; skipped")
            return self.done[name]
        self.done[name] = work()
        atomic_write_text(self.path, json.dumps({"settings": self.settings, "done": self.done}, indent=2))
        return self.done[name]


# -- the stages ----------------------------------------------------------------------------


def train_coders(o: dict, base, train, run_dir: Path, matryoshka: bool, exclude: list[int], resume: bool) -> dict:
    """Train one transcoder per hookpoint with sparsify's ``Trainer``; resumes a checkpoint."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    sae_cfg = MatryoshkaSparseCoderConfig(
        matryoshka=matryoshka, transcode=True, num_latents=o["num_latents"], k=o["k"]
    )
    cfg = MatryoshkaTrainConfig(
        sae=sae_cfg,
        batch_size=o["batch_size"],
        hookpoints=[hookpoint(layer) for layer in o["layers"]],
        optimizer=o["optimizer"],
        lr=o["lr"],
        lr_warmup_steps=o["lr_warmup_steps"],
        exclude_tokens=exclude,
        init_seeds=[o["seed"]],
        save_dir=str(run_dir.parent),
        run_name=run_dir.name,
        save_every=o["save_every"] or 10**9,  # without --save-every: one checkpoint, at the end
        log_to_wandb=False,
    )
    trainer = MatryoshkaTrainer(cfg, train, base)
    if resume and (run_dir / "state.pt").is_file():
        trainer.load_state(str(run_dir))
    trainer.fit()
    return {
        "checkpoints": str(run_dir),
        # Wall time depends on what else runs; CPU time (all threads) less so.
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
    }


def evaluate(o: dict, base, tokenizer, out: Path, exclude: list[int]) -> dict:
    """Held-out prefix FVU of both dictionaries; writes the JSON table and the plot."""
    test = austen_dataset(tokenizer, o["ctx_len"], "test", novels=o["novels"])
    acts = collect_mlp_activations(
        base, test, o["layers"], o["eval_tokens"], o["batch_size"], torch.tensor(exclude)
    )
    results: dict = {"settings": {}, **{coder: {} for coder in CODERS}}
    nested_sizes = None
    for coder_key, run_name in CODERS.items():
        for layer in tqdm(o["layers"], desc=f"Prefix FVU ({coder_key})"):
            coder = load_coder(out / "checkpoints" / run_name / hookpoint(layer), device=o["device"])
            if coder_key == "matryoshka":
                nested_sizes = coder.nested_sizes
            x, y = (t.to(o["device"]) for t in acts[layer])
            lens = prefix_grid(coder.num_latents, nested_sizes)
            fvu = prefix_fvu(coder, x, y, lens)
            results[coder_key][hookpoint(layer)] = {str(p): fvu[p] for p in lens}
    results["settings"] = {
        "model": str(o["model"]),
        "recipe": o["recipe"],
        "hookpoints": [hookpoint(layer) for layer in o["layers"]],
        "num_latents": o["num_latents"],
        "k": o["k"],
        "nested_sizes": nested_sizes,
        "ctx_len": o["ctx_len"],
        "batch_size": o["batch_size"],
        "steps": o["steps"],
        "optimizer": o["optimizer"],
        "lr": o["lr"],
        "train_tokens": o["steps"] * o["batch_size"] * o["ctx_len"],
        "eval_tokens": int(next(iter(acts.values()))[0].shape[0]),
        "novels": o["novels"],
        "test_split": "last 10% of each novel",
        "seed": o["seed"],
        "checkpoints": {coder: str(out / "checkpoints" / name) for coder, name in CODERS.items()},
    }
    return results


def write_results(results: dict, out: Path) -> None:
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=2))
    plot_prefix_fvu(results, out / RESULTS_PNG)


def export(o: dict, out: Path, n_model_layers: int) -> dict:
    """The Matryoshka run as a circuit-tracer transcoder set covering every model layer."""
    from .adapters.circuit_tracer.sparsify_export import empty_layers, export_transcoder_set, find_coder_dirs

    run_dir = out / "checkpoints" / RUN_NAME
    empty = empty_layers(find_coder_dirs(run_dir), n_model_layers)
    export_transcoder_set(run_dir, out / TRANSCODERS_DIR, model_name=str(o["model"]),
                          overwrite=True, n_layers=n_model_layers)
    return {"transcoders": str(out / TRANSCODERS_DIR), "empty_layers": empty}


class LazyReplacementModel:
    """circuit-tracer's replacement model of the exported set, loaded once when first needed."""

    def __init__(self, o: dict, transcoder_dir: Path):
        self.o, self.transcoder_dir, self.model = o, transcoder_dir, None

    def get(self):
        if self.model is None:
            from .adapters.circuit_tracer.loading import load_transcoders_dir
            from .adapters.circuit_tracer.local_model import (
                is_local_model,
                load_local_replacement_model,
                load_replacement_model,
            )

            device = self.o["device"]
            transcoders, _ = load_transcoders_dir(self.transcoder_dir, device=device, lazy_decoder=False)
            spec = str(self.o["model"])
            if is_local_model(spec):
                self.model = load_local_replacement_model(spec, transcoders, device=device)
            else:  # a hub name, for users who are online
                self.model = load_replacement_model(spec, transcoders).to(device)
        return self.model


def build_graphs(o: dict, model: LazyReplacementModel, out: Path, nested_sizes: list[int], empty: list[int]) -> dict:
    """Attribution graphs of ``--prompt`` at three prefix lengths, as viewer graph files."""
    from .adapters.circuit_tracer.attribution import attribute_prefixes
    from .adapters.circuit_tracer.graph_files import graph_file_entries, score_rows, write_graph_files, write_scores
    from .adapters.circuit_tracer.hierarchy import write_hierarchy

    graphs_dir = out / GRAPHS_DIR
    lens = graph_prefix_lens(nested_sizes)
    print(f"Attribution graphs at prefix lengths {lens} ...")
    results = attribute_prefixes(
        o["prompt"], model.get(), lens, max_feature_nodes=o["max_feature_nodes"],
        batch_size=o["attribution_batch_size"], verbose=True,
    )
    rows = score_rows(results, nested_sizes[-1], nested_sizes)
    entries = graph_file_entries(GRAPH_SLUG, results, rows)
    graphs = [(slug, r.prefix_len) for (slug, _, _), r in zip(entries, results)]
    # Supernodes from the nesting, as circuit-tracer-matryoshka writes by default, scored
    # with co-activation on the held-out novels the viewer's feature pages come from.
    annotate = lambda tmp: write_hierarchy(tmp, graphs, model.get(), held_out_texts(o))  # noqa: E731
    # circuit-tracer's CLI defaults for pruning the graph files.
    write_graph_files(entries, graphs_dir, 0.8, 0.98, annotate)
    write_scores(graphs_dir / f"{GRAPH_SLUG}.scores.json", rows)
    return {"graphs": str(graphs_dir), "prompt": o["prompt"], "scores": rows, "empty_layers": empty}


def held_out_texts(o: dict) -> list[str]:
    """The held-out end of each novel: the supernodes' co-activation and the feature pages."""
    return [split_text(austen_texts()[n], "test") for n in o["novels"]]


def build_viewer(o: dict, model: LazyReplacementModel, out: Path) -> dict:
    """Feature pages and decompositions of the graphs' features, from held-out Austen."""
    from .viewer.data import build_viewer_data

    written = build_viewer_data(out / GRAPHS_DIR, model.get(), held_out_texts(o), n_tokens=o["viewer_tokens"])
    return {"viewer_data": [str(p) for p in written]}


def run(args) -> dict:
    """The whole job; returns ``{"results", "graphs", "viewer"}`` (results also as JSON).

    ``args`` holds the options of ``cli.demo.build_parser``. Every option is checked
    before ``--out`` is created.
    """
    o = resolve_options(args)
    out = Path(o["out"])
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a directory")
    resume = o["recipe"] == "full"
    settings = {k: v for k, v in o.items() if k not in UNFINGERPRINTED}
    progress = Progress(out, settings, resume)
    t0, cpu0 = time.perf_counter(), time.process_time()

    tokenizer = load_tokenizer(o["model"])
    train = austen_dataset(tokenizer, o["ctx_len"], "train", novels=o["novels"])
    need = o["steps"] * o["batch_size"]
    if need > len(train):
        raise UsageError(
            f"--steps={o['steps']} x --batch-size={o['batch_size']} needs {need} sequences "
            f"but the training split has {len(train)} at --ctx-len={o['ctx_len']}"
        )
    train = train.shuffle(seed=o["seed"]).select(range(need))
    base = load_pretrained(o["model"], causal_lm=False, device=o["device"])
    n_model_layers = len(base.layers)
    o["layers"] = sorted(o["layers"] if o["layers"] is not None else range(n_model_layers))
    truncate_layers(base, o["layers"][-1] + 1)
    # Created only once every option has been checked, so a mistake leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    # Separator/BOS positions carry outlier activations and no text; leave them out.
    exclude = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None})

    training = {
        coder: progress.stage(
            f"train-{coder}",
            lambda coder=coder, name=name: train_coders(
                o, base, train, out / "checkpoints" / name, coder == "matryoshka", exclude, resume
            ),
        )
        for coder, name in CODERS.items()
    }
    results = progress.stage("evaluate", lambda: evaluate(o, base, tokenizer, out, exclude))
    write_results(results, out)  # the table and plot before the (longer) graphs
    del base  # the graphs run circuit-tracer's own copy of the model
    exported = progress.stage("export", lambda: export(o, out, n_model_layers))
    model = LazyReplacementModel(o, out / TRANSCODERS_DIR)
    nested = results["settings"]["nested_sizes"]
    graphs = progress.stage("graphs", lambda: build_graphs(o, model, out, nested, exported["empty_layers"]))
    viewer = progress.stage("viewer", lambda: build_viewer(o, model, out))

    results["settings"]["training"] = training
    results["settings"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["settings"]["total_cpu_seconds"] = round(time.process_time() - cpu0, 1)
    write_results(results, out)
    return {"results": results, "graphs": graphs, "viewer": viewer}
