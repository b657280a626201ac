"""Supernode parents on the planted-hierarchy toy (issue #15): how often a child latent's
assigned parent is the latent of its true parent.

Coders are trained through sparsify's Trainer (``fit_activations``) on
``matryoshka_plugin.toy`` activations (parents, children that fire only with their
parent, independent features):

- ``matryoshka``: fixed nested groups;
- ``topk``: plain TopK with latents sorted by mean squared activation, so that its
  prefixes are meaningful (unsorted, a true parent's latent often lies beyond P').

Each true feature is matched to its closest latent (decoder cosine). A child whose latent
lies at or beyond P' (the smallest nested size holding all parents), and whose true
parent's latent lies below it, is assigned a parent
below P' by the supernode rule (``hierarchy.assign_parents``): ``score`` is
``|cosine| * coactivation`` on held-out rows, ``cosine`` is ``|cosine|`` alone. It is
correct when that parent is the latent of the child's true parent.

    .venv/bin/python -m benchmarks.hierarchy.run
"""

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks.common import provenance, write_json, write_markdown
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin.adapters.circuit_tracer.hierarchy import assign_parents
from matryoshka_plugin.evaluation import reorder_by_mean_squared_activation
from matryoshka_plugin.fit import fit_activations
from matryoshka_plugin.toy import ToyConfig, ToyModel, dense_codes, feature_cosines
from matryoshka_plugin.core.decomposition import coactivation_counts

HERE = Path(__file__).resolve().parent
CODERS = {"matryoshka": {"matryoshka": True, "prefix_schedule": "fixed"}, "topk": {"matryoshka": False}}


def parent_accuracy(coder, toy: ToyModel, x: torch.Tensor, parent_prefix_len: int, use_corpus: bool) -> dict:
    cos = feature_cosines(coder, toy)
    latent_of = cos.argmax(dim=1)
    kids = [(int(c), int(p)) for p in toy.parents.tolist() for c in toy.children[p].tolist()]
    # A child is scored when its latent lies at or beyond P' and its true parent's below.
    eligible = [(int(latent_of[c]), int(latent_of[p])) for c, p in kids
                if latent_of[c] >= parent_prefix_len > latent_of[p]]
    if not eligible:
        return {"accuracy": float("nan"), "eligible": 0, "children": len(kids)}
    feats = sorted({c for c, _ in eligible})
    both = count = None
    if use_corpus:
        both, count = coactivation_counts([dense_codes(coder, x) > 0], torch.tensor(feats), coder.num_latents)
    links = assign_parents(coder.W_dec.detach().float(), feats, parent_prefix_len, both=both, count=count)
    correct = sum(links[c].feature == p for c, p in eligible)
    if use_corpus:
        overlap = both / torch.minimum(count[feats][:, None], count[None, :]).clamp_min(1)
        best = overlap[:, :parent_prefix_len].argmax(dim=1)
        row = {c: i for i, c in enumerate(feats)}
        coact = sum(int(best[row[c]]) == p for c, p in eligible) / len(eligible)
        return {"accuracy": correct / len(eligible), "coactivation_only": coact, "eligible": len(eligible), "children": len(kids)}
    return {"accuracy": correct / len(eligible), "eligible": len(eligible), "children": len(kids)}


def run(args) -> dict:
    toy = ToyModel(ToyConfig(seed=args.toy_seed))
    width = toy.cfg.n_features
    x_train, _ = toy.sample(args.train_rows, seed=1000 + args.toy_seed)
    x_test, _ = toy.sample(args.test_rows, seed=2000 + args.toy_seed)
    sizes = MatryoshkaSparseCoderConfig(matryoshka=True).resolve_nested_sizes(width, args.k)
    coarse = min(s for s in sizes if s >= toy.cfg.n_parents)
    rows = {f"{c}/{m}": [] for c in CODERS for m in ("score", "cosine")}
    for seed in args.seeds:
        for name, fields in CODERS.items():
            cfg = MatryoshkaSparseCoderConfig(num_latents=width, k=args.k, **fields)
            coder = fit_activations(x_train, cfg, batch_size=512, epochs=args.epochs, seed=seed,
                                    optimizer="adam", lr=3e-3, lr_warmup_steps=10)
            if name == "topk":
                coder, _ = reorder_by_mean_squared_activation(coder, x_train[:8192])
            for method in ("score", "cosine"):
                rows[f"{name}/{method}"].append(parent_accuracy(coder, toy, x_test, coarse, method == "score"))
    summary = {}
    for key, rs in rows.items():
        acc = [r["accuracy"] for r in rs if r["accuracy"] == r["accuracy"]]
        summary[key] = {
            "accuracy_mean": statistics.fmean(acc) if acc else float("nan"),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "eligible_children": [r["eligible"] for r in rs],
            "coactivation_only_mean": statistics.fmean(r["coactivation_only"] for r in rs) if "coactivation_only" in rs[0] else None,
            "per_seed": rs,
        }
    return {"settings": {"width": width, "k": args.k, "nested_sizes": sizes, "parent_prefix_len": coarse,
                         "seeds": args.seeds, "train_rows": args.train_rows, "epochs": args.epochs,
                         "test_rows": args.test_rows, "toy_seed": args.toy_seed},
            "results": summary, "provenance": provenance("benchmarks.hierarchy.run")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=lambda s: [int(t) for t in s.split(",")], default=[0, 1, 2], help="training seeds")
    p.add_argument("--k", type=int, default=4, help="TopK k")
    p.add_argument("--train-rows", type=int, default=32768, help="toy training rows")
    p.add_argument("--test-rows", type=int, default=8192, help="held-out rows for co-activation")
    p.add_argument("--epochs", type=int, default=4, help="training epochs")
    p.add_argument("--toy-seed", type=int, default=0, help="seed of the toy's feature directions")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = run(args)
    write_json(out, HERE / "results.json")
    s = out["settings"]
    lines = [
        f"Toy: width {s['width']}, k {s['k']}, nested sizes {s['nested_sizes']}, P' = {s['parent_prefix_len']}, "
        f"seeds {s['seeds']}. Accuracy: share of child latents (at or beyond P') whose assigned parent is "
        "the latent of their true parent.",
        "",
        "| coder / parent rule | accuracy (mean ± std) | co-activation alone | eligible children per seed |",
        "|---|---|---|---|",
    ]
    for key, r in out["results"].items():
        co = "" if r["coactivation_only_mean"] is None else f"{r['coactivation_only_mean']:.3f}"
        lines.append(f"| {key} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {co} | {r['eligible_children']} |")
    write_markdown(lines, HERE / "results.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
