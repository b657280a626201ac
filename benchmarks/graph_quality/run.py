"""Graph quality per prefix, Matryoshka against TopK of the same budget (issue #16, item 4).

Reads the two dictionaries of one ``matryoshka-demo`` run (``--recipe full``: transcoders
for all 30 SmolLM2 MLPs, trained side by side with the same data, width, k, steps and
seed), exports the TopK one too if the run has not, and builds attribution graphs of
held-out Austen prompts (the last 10% of each novel, never trained on) at each nested
size of the Matryoshka dictionary. Per prefix and coder it reports circuit-tracer's
replacement and completeness scores, path length (``evaluation.graph_paths``) and
mechanistic fidelity (``causal``: the strongest
features inside the prefix ablated in the original and in the local replacement model,
cosine of the last layer's residual change).

Anchors (seed 001, Anthropic's per-layer transcoders and CLTs on their models):
replacement 0.37 / completeness 0.78 (PLT), 0.61 / 0.80 (CLT).

Usage:
    .venv/bin/python -m benchmarks.graph_quality.run --run /work/runs/recipe-full
Writes results.json and results.md next to this file (or --out).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import provenance, write_json, write_markdown

HERE = Path(__file__).parent
ANCHORS = "Anchors (seed 001): per-layer transcoders 0.37 replacement / 0.78 completeness; CLTs 0.61 / 0.80."


def held_out_prompts(tokenizer, n: int, min_tokens: int, max_tokens: int) -> list[str]:
    """``n`` sentences from the held-out end of the novels, round-robin over novels.

    A sentence is kept if it tokenizes to ``min_tokens..max_tokens`` tokens: long enough
    to hold a computation, short enough for a CPU attribution.
    """
    from matryoshka_plugin.corpus import austen_texts, split_text

    per_novel = []
    for text in austen_texts().values():
        test = " ".join(split_text(text, "test").split())
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", test) if '"' not in s]
        per_novel.append([s for s in sentences if min_tokens <= len(tokenizer(s).input_ids) <= max_tokens])
    prompts, i = [], 0
    while len(prompts) < n and any(per_novel):
        novel = per_novel[i % len(per_novel)]
        if novel:
            # Spread over the held-out text rather than taking its first sentences.
            prompts.append(novel.pop(len(novel) // 2))
        i += 1
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} held-out sentences of {min_tokens}-{max_tokens} tokens; lower --prompts")
    return prompts


def export_topk(run: Path, n_layers: int) -> Path:
    """The run's TopK baseline as a circuit-tracer set of ``n_layers`` layers (untrained
    ones as zero transcoders, as the demo exports the Matryoshka set); written once."""
    from matryoshka_plugin.adapters.circuit_tracer.sparsify_export import export_transcoder_set
    from matryoshka_plugin.demo_job import TOPK_RUN_NAME

    out = run / "transcoders-topk"
    if not (out / "config.yaml").is_file():
        settings = json.loads((run / "prefix_fvu.json").read_text())["settings"]
        export_transcoder_set(run / "checkpoints" / TOPK_RUN_NAME, out, model_name=settings["model"], overwrite=True,
                              n_layers=n_layers)
    return out


def replacement_model(transcoder_dir: Path, model_spec: str):
    from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model

    transcoders, _ = load_transcoders_dir(transcoder_dir, device="cpu", lazy_decoder=False)
    return load_local_replacement_model(model_spec, transcoders, device="cpu")


def score_coder(model, prompts, prefix_lens, a) -> dict:
    """Per prefix: every prompt's scores, and the medians of mechanistic fidelity."""
    from tqdm.auto import tqdm

    from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute_prefixes
    from matryoshka_plugin.causal import prefix_causal_report, summarise_fidelity

    per_prompt = []
    for prompt in tqdm(prompts, desc="graphs (prompt)"):
        graphs = attribute_prefixes(
            prompt, model, prefix_lens, max_feature_nodes=a.max_feature_nodes, batch_size=a.attribution_batch_size
        )
        per_prompt.append({str(g.prefix_len): dict(replacement=g.replacement, completeness=g.completeness,
                                                   path_length=g.path_length.mean, seconds=round(g.seconds, 1),
                                                   derived=g.derived) for g in graphs})
    rows = prefix_causal_report(model, prompts[: a.fidelity_prompts], prefix_lens, factors=(0.0,),
                                n_features=a.fidelity_features)
    _, fidelity = summarise_fidelity(rows, prefix_lens, factors=(0.0,))
    out = {}
    for p in prefix_lens:
        got = [r[str(p)] for r in per_prompt]
        cosine, nmse = fidelity.get((p, 0.0), (float("nan"), float("nan")))
        out[str(p)] = dict(
            replacement=statistics.mean(g["replacement"] for g in got),
            completeness=statistics.mean(g["completeness"] for g in got),
            path_length=statistics.mean(g["path_length"] for g in got),
            replacement_per_prompt=[g["replacement"] for g in got],
            completeness_per_prompt=[g["completeness"] for g in got],
            fidelity_cosine=cosine,
            fidelity_nmse=nmse,
            seconds=sum(g["seconds"] for g in got),
        )
    return out


def markdown(result: dict) -> list[str]:
    s = result["settings"]
    lines = [
        "# Graph quality per prefix: Matryoshka vs TopK (SmolLM2-135M, held-out Austen)",
        "",
        f"{result['provenance']['date']}, {result['provenance']['machine']}; wall time {result['seconds']:.0f} s.",
        f"Command: `{result['provenance']['command']}`",
        "",
        f"Dictionaries: `{s['run']}` ({s['recipe']} recipe: {s['layers']} layers, width {s['num_latents']}, "
        f"k {s['k']}, {s['train_tokens']} training tokens each, optimizer {s['optimizer']}). "
        f"{len(result['prompts'])} held-out prompts, mean over prompts; fidelity: median over the "
        f"{s['fidelity_features']} strongest features of the first {s['fidelity_prompts']} prompts, ablated.",
        "",
        "| P | coder | replacement | completeness | path length | fidelity cosine | fidelity NMSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in s["prefix_lens"]:
        for coder in ("matryoshka", "topk"):
            r = result[coder][str(p)]
            lines.append(f"| {p} | {coder} | {r['replacement']:.3f} | {r['completeness']:.3f} "
                         f"| {r['path_length']:.2f} | {r['fidelity_cosine']:.3f} | {r['fidelity_nmse']:.3f} |")
    lines += ["", ANCHORS, "", "Prompts:", ""] + [f"{i + 1}. {p}" for i, p in enumerate(result["prompts"])]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished matryoshka-demo --out folder")
    p.add_argument("--prompts", type=int, default=10, help="held-out prompts")
    p.add_argument("--prefix-lens", type=lambda v: [int(t) for t in v.split(",")], default=None,
                   help="comma-separated prefix lengths (default: the Matryoshka nested sizes)")
    p.add_argument("--min-tokens", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-feature-nodes", type=int, default=1024)
    p.add_argument("--attribution-batch-size", type=int, default=64)
    p.add_argument("--fidelity-prompts", type=int, default=3)
    p.add_argument("--fidelity-features", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE)
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if not (a.run / "progress.json").is_file():
        raise SystemExit(f"run.py: error: --run {a.run} has no progress.json; give a matryoshka-demo --out folder")
    progress = json.loads((a.run / "progress.json").read_text())
    if "export" not in progress["done"]:
        raise SystemExit(f"{a.run} has not finished its export stage yet (progress.json)")
    results = json.loads((a.run / "prefix_fvu.json").read_text())
    settings = results["settings"]
    from matryoshka_plugin.offline import load_tokenizer

    model_spec = settings["model"]
    prefix_lens = a.prefix_lens or settings["nested_sizes"]
    matryoshka_dir = Path(progress["done"]["export"]["transcoders"])
    n_layers = len(list(matryoshka_dir.glob("layer_*.safetensors")))
    dirs = {"matryoshka": matryoshka_dir, "topk": export_topk(a.run, n_layers)}
    prompts = held_out_prompts(load_tokenizer(model_spec), a.prompts, a.min_tokens, a.max_tokens)
    result = {
        "settings": dict(run=str(a.run), recipe=settings["recipe"], layers=len(settings["hookpoints"]),
                         num_latents=settings["num_latents"], k=settings["k"], train_tokens=settings["train_tokens"],
                         optimizer=settings["optimizer"], prefix_lens=prefix_lens, **{k: v for k, v in vars(a).items()
                                                                                     if k not in ("run", "out", "prefix_lens")}),
        "prompts": prompts,
    }
    for coder, d in dirs.items():
        model = replacement_model(d, model_spec)
        result[coder] = score_coder(model, prompts, prefix_lens, a)
        del model
    result["seconds"] = time.perf_counter() - t0
    result["provenance"] = provenance("benchmarks.graph_quality.run", argv)
    write_json(result, a.out / "results.json")
    write_markdown(markdown(result), a.out / "results.md")
    print("\n".join(markdown(result)[:20]))


if __name__ == "__main__":
    main()
