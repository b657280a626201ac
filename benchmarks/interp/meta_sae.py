"""Meta-SAE composition on the toy: Matryoshka against TopK at equal budget (issue #19, item 2).

Each coder is trained by ``fit_activations`` on the same hierarchical toy rows (same width,
k, rows, epochs, optimizer, seed); a meta-SAE (``evaluation.meta_sae``) is then fitted to
its unit decoder rows and its FVU reported overall and per Matryoshka group (the TopK
coders are cut at the same group boundaries: ``topk`` in its own arbitrary latent order,
``topk_reordered`` sorted by mean squared activation, as ``benchmarks.toy``). Higher
meta-SAE FVU = less composition = more disentangled latents.

Two planted references bound the scale: ``true_features`` (the toy's own directions, the
perfectly disentangled dictionary) and ``absorbed_features`` (each child row replaced by
its normalised parent + child sum, the fully absorbing dictionary).

    python -m benchmarks.interp.meta_sae        # writes meta_sae.json / meta_sae.md here
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import provenance, write_json, write_markdown
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.evaluation import coder_meta_sae, meta_sae_composition, reorder_by_mean_squared_activation
from matryoshka_plugin.fit import fit_activations
from matryoshka_plugin.toy import ToyConfig, ToyModel, absorption

HERE = Path(__file__).resolve().parent
CODERS = {"matryoshka_fixed": {"matryoshka": True, "prefix_schedule": "fixed"}, "topk": {"matryoshka": False}}


def absorbed_dictionary(toy: ToyModel) -> torch.Tensor:
    """The toy's directions with every child row replaced by parent + child (normalised)."""
    rows = toy.directions.clone()
    kids = toy.children
    rows[kids.flatten()] = (toy.directions[kids] + toy.directions[toy.parents][:, None]).flatten(0, 1)
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    toy = ToyModel(ToyConfig(seed=args.toy_seed))
    width = toy.cfg.n_features
    x_train, _ = toy.sample(args.train_rows, seed=1000 + args.toy_seed)
    x_test, f_test = toy.sample(args.test_rows, seed=2000 + args.toy_seed)
    levels = MatryoshkaSparseCoderConfig(matryoshka=True).resolve_nested_sizes(width, args.k)
    meta = dict(meta_width=args.meta_width, meta_k=args.meta_k, steps=args.meta_steps)
    started = time.time()
    rows: dict[str, list[dict]] = {n: [] for n in [*CODERS, "topk_reordered"]}
    for seed in args.seeds:
        for name, fields in CODERS.items():
            cfg = MatryoshkaSparseCoderConfig(num_latents=width, k=args.k, **fields)
            coder = fit_activations(x_train, cfg, batch_size=args.batch_size, epochs=args.epochs, seed=seed,
                                    optimizer="adam", lr=args.lr, lr_warmup_steps=10)
            variants = [(name, coder)]
            if name == "topk":
                variants.append(("topk_reordered", reorder_by_mean_squared_activation(coder, x_train[:8192])[0]))
            for vname, c in variants:
                result = coder_meta_sae(c, levels, seed=seed, **meta)
                result["absorption_rate"] = absorption(c, toy, x_test, f_test)["absorption_rate"]
                rows[vname].append(result)
    # The true directions come in the toy's own order (parents, children, independent),
    # not by importance, so only their overall number is a reference.
    references = {
        "true_features": meta_sae_composition(toy.directions, [width], seed=0, **meta),
        "absorbed_features": meta_sae_composition(absorbed_dictionary(toy), [width], seed=0, **meta),
    }
    summary = {}
    for name, runs in rows.items():
        summary[name] = {
            key: _mean_std([r[key] for r in runs]) for key in ("fvu", "mean_cosine", "absorption_rate")
        }
        summary[name]["levels"] = [
            {"start": lv["start"], "end": lv["end"], "fvu": _mean_std([r["levels"][i]["fvu"] for r in runs])}
            for i, lv in enumerate(runs[0]["levels"])
        ]
    return {
        **provenance(__spec__.name),
        "seconds": round(time.time() - started, 1),
        "settings": {"toy": "ToyConfig() default", "width": width, "k": args.k, "train_rows": args.train_rows,
                     "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
                     "levels": levels, "meta_sae": rows["topk"][0]["settings"]},
        "summary": summary,
        "references": {n: {"fvu": r["fvu"], "mean_cosine": r["mean_cosine"]} for n, r in references.items()},
        "per_seed": rows,
    }


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def markdown(result: dict) -> list[str]:
    s = result["settings"]
    levels = [f"{lv['start']}-{lv['end']}" for lv in result["summary"]["topk"]["levels"]]
    lines = [
        "# Meta-SAE composition on the toy (issue #19, item 2)",
        "",
        f"`{result['command']}`, {result['date']}, {result['machine']} (2-core CPU machine, shared); "
        f"{result['seconds']} s.",
        "",
        f"Toy: default `ToyConfig` ({s['width']} features), width {s['width']}, k {s['k']}, "
        f"{s['train_rows']} rows x {s['epochs']} epochs, Adam lr {s['lr']}, seeds {s['seeds']}. "
        f"Meta-SAE: width {s['meta_sae']['meta_width']}, k {s['meta_sae']['meta_k']}, "
        f"{s['meta_sae']['steps']} full-batch Adam steps. Levels: the Matryoshka groups {s['levels']}.",
        "",
        "Meta-SAE FVU (unexplained share of the unit decoder rows' squared norm): **higher = less "
        "composition = more disentangled latents**. Mean ± std over seeds.",
        "",
        "| coder | absorption | meta FVU | mean cosine | " + " | ".join(f"FVU {l}" for l in levels) + " |",
        "|---|---|---|---|" + "---|" * len(levels),
    ]
    fmt = lambda m: f"{m['mean']:.3f} ± {m['std']:.3f}"  # noqa: E731
    for name, row in result["summary"].items():
        lines.append(f"| {name} | {fmt(row['absorption_rate'])} | {fmt(row['fvu'])} | {fmt(row['mean_cosine'])} | "
                     + " | ".join(fmt(lv["fvu"]) for lv in row["levels"]) + " |")
    for name, ref in result["references"].items():
        lines.append(f"| {name} (reference) | | {ref['fvu']:.3f} | {ref['mean_cosine']:.3f} |" + " |" * len(levels))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=lambda s: [int(t) for t in s.split(",")], default=[0, 1, 2],
                   help="training seeds, comma-separated")
    p.add_argument("--k", type=int, default=4, help="active latents per row")
    p.add_argument("--train-rows", type=int, default=65536, help="toy training rows")
    p.add_argument("--test-rows", type=int, default=8192, help="held-out rows for absorption")
    p.add_argument("--epochs", type=int, default=6, help="training epochs")
    p.add_argument("--batch-size", type=int, default=512, help="rows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--toy-seed", type=int, default=0, help="seed of the toy's directions and samples")
    p.add_argument("--meta-width", type=int, default=None, help="meta-SAE width (default width / 8)")
    p.add_argument("--meta-k", type=int, default=4, help="meta-SAE active latents")
    p.add_argument("--meta-steps", type=int, default=1500, help="meta-SAE Adam steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids contention on shared CPUs)")
    p.add_argument("--out-dir", type=Path, default=HERE, help="where meta_sae.json / .md go")
    args = p.parse_args(argv)
    result = run(args)
    write_json(result, args.out_dir / "meta_sae.json")
    write_markdown(markdown(result), args.out_dir / "meta_sae.md")
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
