"""The demo's job, offline: Matryoshka transcoders on SmolLM2's early MLPs, trained on Austen.

``run`` (the work of ``matryoshka-demo``, whose options are in ``cli.demo``) trains one Matryoshka transcoder per MLP (input -> output of
``layers.N.mlp``) with sparsify's own ``Trainer`` (through ``MatryoshkaTrainer``),
saves them in sparsify's checkpoint layout, then measures the FVU of every prefix of
each dictionary on held-out text (the last 10% of each novel) and writes a JSON table
and a PNG plot. A Matryoshka dictionary should reconstruct better the more of its
prefix is kept, and its first few hundred latents should already be a usable coder.

Outputs under ``--out``:
  checkpoints/<run_name>/layers.N.mlp/{cfg.json,sae.safetensors}  (sparsify layout)
  prefix_fvu.json   per layer: prefix length -> FVU on held-out tokens
  prefix_fvu.png    FVU against prefix length, one line per layer
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
)
from .atomic import atomic_write, atomic_write_text
from .core.errors import UsageError
from .core.prefixes import default_prefix_ladder
from .corpus import AUSTEN_NOVELS, austen_dataset
from .hooks import capture_mlps
from .offline import load_pretrained, load_tokenizer

RUN_NAME = "austen"
RESULTS_JSON = "prefix_fvu.json"
RESULTS_PNG = "prefix_fvu.png"



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


def plot_prefix_fvu(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, layer in results["layers"].items():
        lens = [int(p) for p in layer["prefix_fvu"]]
        ax.plot(lens, list(layer["prefix_fvu"].values()), marker="o", ms=3, label=name)
        nested = layer["nested_sizes"]
        ax.scatter(nested, [layer["prefix_fvu"][str(p)] for p in nested], s=25,
                   facecolors="none", edgecolors="k", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefix length (latents kept)")
    ax.set_ylabel("FVU on held-out Austen tokens")
    s = results["settings"]
    ax.set_title(
        f"Matryoshka transcoders, {Path(s['model']).name}\n"
        f"width {s['num_latents']}, k {s['k']}, {s['train_tokens']:,} training tokens",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="hookpoint (circles: nested sizes)", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def format_table(results: dict) -> str:
    names = list(results["layers"])
    lens = list(results["layers"][names[0]]["prefix_fvu"])
    header = f"{'prefix':>7} " + " ".join(f"{n:>14}" for n in names)
    rows = [header, "-" * len(header)]
    for p in lens:
        marks = ["*" if int(p) in results["layers"][n]["nested_sizes"] else " " for n in names]
        vals = " ".join(
            f"{results['layers'][n]['prefix_fvu'][p]:>13.4f}{m}" for n, m in zip(names, marks)
        )
        rows.append(f"{p:>7} {vals}")
    rows.append("(* = a nested size trained with its own loss)")
    return "\n".join(rows)


def _check_args(args) -> None:
    for name in ("num_latents", "k", "ctx_len", "batch_size", "steps", "eval_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.k > args.num_latents:
        raise UsageError(f"--k={args.k} must not exceed --num-latents={args.num_latents}")
    if args.lr_warmup_steps < 0:
        raise UsageError(f"--lr-warmup-steps={args.lr_warmup_steps} must be >= 0")
    if any(layer < 0 for layer in args.layers) or len(set(args.layers)) != len(args.layers):
        raise UsageError(f"--layers={args.layers} must be distinct non-negative layer indices")


def run(args) -> dict:
    """Train, evaluate, write outputs; the results dict (also written as JSON).

    ``args`` holds the options of ``cli.demo.build_parser``.
    """
    _check_args(args)
    out = Path(args.out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a directory")
    layers = sorted(args.layers)
    t0, cpu0 = time.perf_counter(), time.process_time()

    tokenizer = load_tokenizer(args.model)
    base = load_pretrained(args.model, causal_lm=False, device=args.device)
    # Created only once the model has loaded, so a bad --model leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    truncate_layers(base, layers[-1] + 1)
    # Separator/BOS positions carry outlier activations and no text; leave them out.
    exclude = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None})

    train = austen_dataset(tokenizer, args.ctx_len, "train", novels=args.novels)
    need = args.steps * args.batch_size
    if need > len(train):
        raise UsageError(
            f"--steps={args.steps} x --batch-size={args.batch_size} needs {need} sequences "
            f"but the training split has {len(train)} at --ctx-len={args.ctx_len}"
        )
    train = train.shuffle(seed=args.seed).select(range(need))

    sae_cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, transcode=True, num_latents=args.num_latents, k=args.k
    )
    cfg = MatryoshkaTrainConfig(
        sae=sae_cfg,
        batch_size=args.batch_size,
        hookpoints=[hookpoint(layer) for layer in layers],
        optimizer=args.optimizer,
        lr=args.lr,
        lr_warmup_steps=args.lr_warmup_steps,
        exclude_tokens=exclude,
        init_seeds=[args.seed],
        save_dir=str(out / "checkpoints"),
        run_name=RUN_NAME,
        save_every=10**9,  # one checkpoint, at the end
        log_to_wandb=False,
    )
    trainer = MatryoshkaTrainer(cfg, train, base)
    trainer.fit()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    run_dir = out / "checkpoints" / RUN_NAME

    test = austen_dataset(tokenizer, args.ctx_len, "test", novels=args.novels)
    acts = collect_mlp_activations(
        base, test, layers, args.eval_tokens, args.batch_size, torch.tensor(exclude)
    )
    results = {
        "settings": {
            "model": str(args.model),
            "hookpoints": cfg.hookpoints,
            "num_latents": args.num_latents,
            "k": args.k,
            "ctx_len": args.ctx_len,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "optimizer": args.optimizer,
            "lr": args.lr,
            "train_tokens": need * args.ctx_len,
            "eval_tokens": int(next(iter(acts.values()))[0].shape[0]),
            "novels": args.novels or list(AUSTEN_NOVELS),
            "test_split": "last 10% of each novel",
            "seed": args.seed,
            "checkpoints": str(run_dir),
            # Wall time depends on what else runs; CPU time (all threads) less so.
            "load_and_train_seconds": round(train_s, 1),
            "load_and_train_cpu_seconds": round(train_cpu_s, 1),
        },
        "layers": {},
    }
    for layer in tqdm(layers, desc="Prefix FVU"):
        coder = load_coder(run_dir / hookpoint(layer), device=args.device)
        x, y = (t.to(args.device) for t in acts[layer])
        lens = prefix_grid(coder.num_latents, coder.nested_sizes)
        fvu = coder.prefix_fvu(x, y, lens)
        results["layers"][hookpoint(layer)] = {
            "nested_sizes": coder.nested_sizes,
            "prefix_fvu": {str(p): fvu[p] for p in lens},
        }
    results["settings"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["settings"]["total_cpu_seconds"] = round(time.process_time() - cpu0, 1)

    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=2))
    plot_prefix_fvu(results, out / RESULTS_PNG)
    return results
