"""Induction at every prefix: SmolLM2 copying a repeated random sequence, graph vs ablation.

For each of ``--prompts`` prompts (r_1..r_n random tokens, then r_1..r_m; SmolLM2 should
predict r_{m+1}), attribute the graph of the r_{m+1} logit at every nested size of an
exported Matryoshka transcoder set (``matryoshka_plugin.evaluation.induction``), and:

- graph: the share of that logit's influence from the embeddings at the earlier
  occurrence (positions of r_m and r_{m+1}: ``tokens``) and with the error nodes there
  (``position``); the same embedding share per other prompt position, and their ratio
  (``lift``: how much more a source position carries than an average other one;
  ``position_lift`` with the error nodes counted);
  replacement, completeness and path length of the graph;
- model: the logit drop of r_{m+1} when the last position's attention to those two
  positions is switched off in every layer and head (SmolLM2 itself, no transcoders).

The circuit counts as visible at P where the lift is above 1 in every prompt.

Usage (about 10 minutes on 2 busy CPU cores with the demo's 3-layer export):
    python -m matryoshka_plugin.cli.demo --out /tmp/paths-demo    # for its transcoders
    python -m benchmarks.induction.run --transcoders /tmp/paths-demo/transcoders
Outputs: benchmarks/induction/{results.json,results.md}
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import provenance, write_json, write_markdown
from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute_prefixes
from matryoshka_plugin.adapters.circuit_tracer.transcoder_dir import read_nested_sizes
from matryoshka_plugin.demo_job import LazyReplacementModel
from matryoshka_plugin.evaluation.induction import ablation_drop, graph_share, induction_prompt

HERE = Path(__file__).resolve().parent
# Ordinary word-piece ids of SmolLM2's vocabulary, well clear of its special tokens.
VOCAB = range(1000, 20000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transcoders", required=True, help="an exported Matryoshka transcoder set for SmolLM2")
    p.add_argument("--model", default="smollm2", help="the model the transcoders belong to (default: offline SmolLM2)")
    p.add_argument("--prompts", type=int, default=6, help="random repeated sequences to measure")
    p.add_argument("--n", type=int, default=8, help="random tokens in the first half")
    p.add_argument("--m", type=int, default=4, help="of them repeated in the second half")
    p.add_argument("--batch-size", type=int, default=64, help="backward passes batched in attribution")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--out", default=str(HERE), help="folder for results.json and results.md")
    return p.parse_args(argv)


def measure(model, prompt, prefix_lens, batch_size) -> dict:
    last = len(prompt.tokens) - 1
    others = [q for q in range(1, last) if q not in prompt.sources]
    drop = ablation_drop(model, prompt.tokens, prompt.target, prompt.sources)
    # No feature-node cap: then the smaller prefixes are derived exactly from the finest graph.
    graphs = attribute_prefixes(
        prompt.tokens, model, prefix_lens, attribution_targets=torch.tensor([prompt.target]), batch_size=batch_size
    )
    rows = []
    for r in graphs:
        at = graph_share(r.graph, prompt.target, prompt.sources)
        other = graph_share(r.graph, prompt.target, others)
        per_source, per_other = len(prompt.sources), len(others)
        rows.append({
            "prefix_len": r.prefix_len, "tokens_share": at.tokens, "position_share": at.position,
            "other_position_tokens_share": other.tokens / per_other,
            "lift": (at.tokens / per_source) / (other.tokens / per_other),
            "position_lift": (at.position / per_source) / (other.position / per_other),
            "replacement": r.replacement, "completeness": r.completeness, "path_length": r.path_length.mean,
            "unweighted_path_length": r.path_length.unweighted_mean, "seconds": r.seconds,
        })
    return {
        "tokens": prompt.tokens.tolist(), "target": prompt.target, "sources": list(prompt.sources),
        "clean_logit": drop.clean, "ablated_logit": drop.ablated, "relative_drop": drop.relative,
        "clean_prob": drop.clean_prob, "ablated_prob": drop.ablated_prob, "graphs": rows,
    }


def summarise(prompts: list[dict], prefix_lens: list[int]) -> list[dict]:
    rows = []
    for i, p in enumerate(prefix_lens):
        per = [q["graphs"][i] for q in prompts]
        mean = {k: statistics.fmean(g[k] for g in per) for k in (
            "tokens_share", "position_share", "other_position_tokens_share", "lift", "position_lift", "replacement",
            "completeness", "path_length", "unweighted_path_length")}
        rows.append({"prefix_len": p, **mean, "visible": all(g["lift"] > 1 for g in per)})
    return rows


def markdown(record: dict) -> list[str]:
    s, prompts = record["settings"], record["prompts"]
    drops = [q["relative_drop"] for q in prompts]
    lines = [
        "# Induction at every prefix (SmolLM2)", "",
        f"- command: `{record['command']}`", f"- date: {record['date']}", f"- machine: {record['machine']}",
        f"- wall time: {record['wall_seconds']:.0f} s", f"- transcoders: {s['transcoders']} (nested sizes {s['prefix_lens']})",
        f"- prompts: {s['prompts']} random sequences of n={s['n']} tokens, then the first m={s['m']} again", "",
        "Model (no transcoders): the target r_{m+1} at the last position, clean and with the last position's "
        "attention to the earlier r_m and r_{m+1} switched off in every layer and head.", "",
        "| prompt | p(target) clean | p(target) ablated | logit drop / clean logit |", "|---|---|---|---|",
    ]
    lines += [f"| {i} | {q['clean_prob']:.3f} | {q['ablated_prob']:.3f} | {q['relative_drop']:.3f} |" for i, q in enumerate(prompts)]
    lines += [
        "", f"Mean logit drop / clean logit: {statistics.fmean(drops):.3f} (the same model at every P).", "",
        "Graph of the target logit per prefix length, means over prompts. tokens: share of its influence from the "
        "embeddings at the earlier occurrence; position: with the error nodes there; other: embedding share per "
        "other prompt position; lift: tokens per source position / other; visible: lift > 1 in every prompt; "
        "position lift: the same ratio with the error nodes counted.", "",
        "| P | tokens | position | other | lift | visible | position lift | replacement | completeness | path length "
        "| path length (unweighted) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['prefix_len']} | {r['tokens_share']:.4f} | {r['position_share']:.4f} | {r['other_position_tokens_share']:.4f} | "
        f"{r['lift']:.2f} | {'yes' if r['visible'] else 'no'} | {r['position_lift']:.2f} | {r['replacement']:.4f} | {r['completeness']:.4f} | "
        f"{r['path_length']:.2f} | {r['unweighted_path_length']:.2f} |"
        for r in record["per_prefix"]
    ]
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    record = provenance(__spec__.name, argv)
    start = time.perf_counter()
    nested = (read_nested_sizes(args.transcoders) or {}).get("nested_sizes")
    if not nested:
        raise SystemExit(f"{args.transcoders} has no Matryoshka nested sizes (matryoshka.json); export a Matryoshka set")
    model = LazyReplacementModel({"model": args.model, "device": "cpu"}, Path(args.transcoders)).get()
    gen = torch.Generator().manual_seed(args.seed)
    prompts = []
    for i in range(args.prompts):
        prompts.append(measure(model, induction_prompt(model, VOCAB, args.n, args.m, gen), nested, args.batch_size))
        print(f"prompt {i}: drop {prompts[-1]['relative_drop']:.3f}, shares "
              + ", ".join(f"P={g['prefix_len']} {g['tokens_share']:.3f}" for g in prompts[-1]["graphs"]), flush=True)
    record.update(
        settings={"transcoders": str(args.transcoders), "model": args.model, "prompts": args.prompts, "n": args.n,
                  "m": args.m, "seed": args.seed, "prefix_lens": nested, "ablation": "last position's attention to "
                  "the earlier r_m and r_{m+1}, every layer and head, zeroed and renormalised"},
        wall_seconds=time.perf_counter() - start, prompts=prompts, per_prefix=summarise(prompts, nested),
    )
    out = Path(args.out)
    write_json(record, out / "results.json")
    write_markdown(markdown(record), out / "results.md")
    print("\n".join(markdown(record)))
    return record


if __name__ == "__main__":
    main()
