"""Automated interpretability of saved coders, offline: Sort Eval, Contrastive Eval and
Detection Eval (explain, then detect) per nested level with SmolLM2-135M-Instruct as judge
and explainer (issue #19, item 3).

SmolLM2 is a weak stand-in for the large judges these evaluations were designed for: its
scores measure the pipeline end to end more than the dictionaries. The uniform judge's row
(always 0.5) is the chance line. Contexts and prompt pairs come from the held-out Austen
split (last 10% of each novel), as ``matryoshka-eval --autointerp`` takes them.

    python -m benchmarks.interp.autointerp --coder matryoshka=/tmp/interp-demo/checkpoints/austen/layers.1.mlp
"""

import argparse
import time
from pathlib import Path

from benchmarks.common import provenance, write_json, write_markdown
from matryoshka_plugin.adapters.sparsify import load_coder
from matryoshka_plugin.corpus import austen_texts, split_text
from matryoshka_plugin.evaluation import LocalJudge, autointerp
from matryoshka_plugin.hooks import hookpoint_layer
from matryoshka_plugin.offline import SMOLLM2, load_pretrained, load_tokenizer

HERE = Path(__file__).resolve().parent


def run(args) -> dict:
    texts = [split_text(t, "test") for t in austen_texts().values()]
    model, tokenizer = load_pretrained(SMOLLM2), load_tokenizer(SMOLLM2)
    judge = LocalJudge(SMOLLM2)
    results = {}
    levels = args.levels
    for name, path in args.coder:
        coder = load_coder(Path(path))
        # Every coder is cut at the first one's levels (its nested sizes unless --levels):
        # a plain TopK coder would otherwise get powers of two, not comparable groups.
        levels = levels or list(coder.nested_sizes)
        started = time.time()
        section = autointerp(model, tokenizer, coder, hookpoint_layer(Path(path).name), texts, judge, levels,
                             n_tokens=args.tokens, latents_per_level=args.latents, examples=args.examples,
                             n_pairs=args.pairs, seed=args.seed)
        section["seconds"] = round(time.time() - started, 1)
        section["checkpoint"] = str(path)
        results[name] = section
    return {**provenance(__spec__.name), "judge": "SmolLM2-135M-Instruct (offline, weak stand-in)", "coders": results}


def markdown(result: dict) -> list[str]:
    lines = [
        "# Automated interpretability, offline (issue #19, item 3)",
        "",
        f"`{result['command']}`, {result['date']}, {result['machine']} (2-core CPU machine, shared).",
        "",
        f"Judge: {result['judge']}. Accuracy (ties split) and mean probability on the right answer, "
        "per level (latents between consecutive nested sizes); chance is 0.5. n = questions asked.",
        "",
        "| coder | eval | level | n | accuracy | p_correct |",
        "|---|---|---|---|---|---|",
    ]
    for name, section in result["coders"].items():
        for kind in ("sort_eval", "contrastive_eval", "detection_eval"):
            for row in section[kind]:
                acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
                p = "-" if row["p_correct"] is None else f"{row['p_correct']:.2f}"
                lines.append(f"| {name} | {kind} | {row['start']}-{row['end']} | {row['n_questions']} | {acc} | {p} |")
    lines.append("")
    for name, section in result["coders"].items():
        s = section["settings"]
        lines.append(f"- {name}: `{section['checkpoint']}`, {s['n_tokens']} corpus tokens, {s['latents_per_level']} "
                     f"latents per level, {s['examples']} examples shown, {s['contrast_pairs']} prompt pairs, "
                     f"{section['seconds']} s.")
    lines += ["", "Explanations the Detection Eval scored:", "", "| coder | level | latent | explanation |",
              "|---|---|---|---|"]
    for name, section in result["coders"].items():
        for e in section["explanations"]:
            text = e["explanation"].replace("|", "\\|")
            lines.append(f"| {name} | {e['level']} | {e['latent']} | {text} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coder", action="append", required=True, type=lambda s: tuple(s.split("=", 1)),
                   help="NAME=DIR of a coder on an MLP hookpoint (layers.N.mlp); repeat for several")
    p.add_argument("--levels", type=lambda s: [int(t) for t in s.split(",")], default=None,
                   help="level ends (default: the first coder's nested sizes, for every coder)")
    p.add_argument("--tokens", type=int, default=4096, help="corpus tokens scanned for top contexts")
    p.add_argument("--latents", type=int, default=2, help="Sort Eval and Detection Eval latents per level")
    p.add_argument("--examples", type=int, default=3, help="contexts shown (and held out) per latent")
    p.add_argument("--pairs", type=int, default=8, help="Contrastive Eval prompt pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents drawn and the option order")
    p.add_argument("--out-dir", type=Path, default=HERE, help="where autointerp.json / .md go")
    args = p.parse_args(argv)
    result = run(args)
    write_json(result, args.out_dir / "autointerp.json")
    write_markdown(markdown(result), args.out_dir / "autointerp.md")
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
