"""``matryoshka-eval``: evaluate a saved coder as a progressive coder.

Argument parsing only; the work is ``evaluation.checkpoint.evaluate_checkpoint`` and
``evaluation.report.save_report``, plus ``evaluation.meta_sae`` (``--meta-sae``) and
``evaluation.autointerp`` with an ``evaluation.explainers`` judge (``--autointerp``), each
adding its own section to the JSON report.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import UsageError
from ..device import resolve_device
from ..offline import SMOLLM2
from ..evaluation.checkpoint import evaluate_checkpoint, resolve_coder_dir
from ..evaluation.explainers import DEFAULT_API_KEY_ENV, ChatJudge, LocalJudge
from ..evaluation.meta_sae import META_K, META_STEPS, coder_meta_sae
from ..evaluation.report import save_report
from .runner import run

PROG = "matryoshka-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a sparsify or Matryoshka coder as a progressive coder: "
        "FVU/MSE/RSA per prefix, L0, dead/dense latents, frequency per level, "
        "dictionary power law; optionally loss recovered/KL in a language model, meta-SAE "
        "composition (--meta-sae) and LLM-judged Sort/Contrastive/Detection Eval (--autointerp).",
    )
    p.add_argument("checkpoint", type=Path, help="coder directory (cfg.json + sae.safetensors) or a run directory")
    p.add_argument("--data", type=Path, required=True, help="held-out activations: safetensors with 'inputs' (and 'targets' for transcoders)")
    p.add_argument("--hookpoint", help="which coder of a run directory to evaluate")
    p.add_argument("--prefix-lens", help="comma-separated prefix lengths (default: nested sizes, or powers of two)")
    p.add_argument("--max-rows", type=int, help="evaluate only the first N rows")
    p.add_argument("--rsa-samples", type=int, default=1000, help="rows used for RSA (0 skips it)")
    p.add_argument("--dense-threshold", type=float, default=0.1, help="frequency above which a latent counts as dense")
    p.add_argument("--power-law-trim", type=float, default=0.0, help="fraction of ranks dropped at each end before the power-law fit")
    p.add_argument("--model", type=Path, help="local Hugging Face causal LM directory, for loss recovered / KL")
    p.add_argument("--tokens", type=Path, help="safetensors with 'input_ids' [sequences, length], needed with --model")
    p.add_argument("--splice-hookpoint", help="module to splice the coder into (default: the coder directory's name)")
    p.add_argument("--splice-from-position", type=int, default=0,
                   help="splice (and ablate) positions >= this; earlier ones keep the model's output "
                   "(1 for coders trained without position 0)")
    p.add_argument("--lm-batch-size", type=int, default=8, help="sequences per language-model batch")
    p.add_argument("--meta-sae", action="store_true",
                   help="train a small TopK meta-SAE on the unit decoder rows and report its FVU per "
                   "level (JSON 'meta_sae'; higher = more disentangled latents)")
    p.add_argument("--meta-width", type=int, help="meta-SAE latents (default: dictionary width / 8)")
    p.add_argument("--meta-k", type=int, default=META_K, help="active meta-latents per decoder row (default %(default)s)")
    p.add_argument("--meta-steps", type=int, default=META_STEPS, help="meta-SAE full-batch Adam steps (default %(default)s)")
    p.add_argument("--meta-seed", type=int, default=0, help="meta-SAE initialisation seed")
    p.add_argument("--autointerp", action="store_true",
                   help="score latents per level with Sort Eval, Contrastive Eval and Detection Eval "
                   "(explain, then detect), judged and explained by an LLM (JSON 'autointerp')")
    p.add_argument("--autointerp-model", default=SMOLLM2,
                   help="language model whose MLP input the coder reads (default %(default)s)")
    p.add_argument("--autointerp-corpus", type=Path,
                   help="folder of .txt files for contexts and prompt pairs (default: held-out Austen)")
    p.add_argument("--autointerp-latents", type=int, default=4,
                   help="Sort Eval latents per level, paired two by two, and Detection Eval latents per level "
                   "(default %(default)s)")
    p.add_argument("--autointerp-tokens", type=int, default=8192, help="corpus tokens scanned for top contexts (default %(default)s)")
    p.add_argument("--autointerp-pairs", type=int, default=24, help="Contrastive Eval prompt pairs (default %(default)s)")
    p.add_argument("--autointerp-seed", type=int, default=0, help="seed of the latents drawn and the option order")
    p.add_argument("--explainer-url",
                   help="OpenAI-compatible API base URL of the judge and explainer, e.g. https://api.openai.com/v1 "
                   "(default: the local --explainer-model)")
    p.add_argument("--explainer-model", default=SMOLLM2,
                   help="judge and explainer model: the endpoint's model name with --explainer-url, else a local model "
                   "(default %(default)s, a weak stand-in)")
    p.add_argument("--explainer-api-key-env", default=DEFAULT_API_KEY_ENV,
                   help="environment variable holding the endpoint's API key (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON output path")
    p.add_argument("--plot", type=Path, help="PNG plot path (default: the JSON path with .png)")
    p.add_argument("--device", default="cpu")
    return p


def _parse_prefix_lens(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        lens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--prefix-lens {text!r} must be comma-separated integers") from None
    if not lens:
        raise UsageError("--prefix-lens is empty")
    return lens


def _check_flags(args: argparse.Namespace, plot_path: Path) -> None:
    """Refuse bad flag values before the (long) evaluation, which would otherwise fail late."""
    for flag, path in (("--out", args.out), ("--plot", plot_path)):
        if not path.parent.is_dir():
            raise UsageError(f"{flag} {path}: {path.parent} is not a directory")
    for name in ("max_rows", "lm_batch_size", "meta_width", "meta_k", "meta_steps", "autointerp_tokens",
                 "autointerp_pairs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v} must be at least 1")
    if args.meta_width is not None and args.meta_k > args.meta_width:
        raise UsageError(f"--meta-k {args.meta_k} exceeds --meta-width {args.meta_width}; allowed: 1..{args.meta_width}")
    if args.autointerp_latents < 2:
        raise UsageError(f"--autointerp-latents {args.autointerp_latents} must be at least 2 (latents are paired)")
    if args.autointerp_corpus is not None and not sorted(args.autointerp_corpus.glob("*.txt")):
        raise UsageError(f"--autointerp-corpus {args.autointerp_corpus} holds no .txt files")
    if args.rsa_samples < 0:
        raise UsageError(f"--rsa-samples {args.rsa_samples} must be >= 0")
    args.device = str(resolve_device(args.device))
    if not 0 <= args.dense_threshold <= 1:
        raise UsageError(f"--dense-threshold {args.dense_threshold} must be in [0, 1]")
    if args.splice_from_position < 0:
        raise UsageError(f"--splice-from-position {args.splice_from_position} is negative; allowed: 0 or more")
    if (args.model is None) != (args.tokens is None):
        raise UsageError("--model and --tokens go together")


def _meta_sae(args: argparse.Namespace, prefix_lens: list[int] | None) -> dict:
    """The meta-SAE section: levels from --prefix-lens, else the coder's nested sizes."""
    from ..adapters.sparsify import load_coder

    coder = load_coder(resolve_coder_dir(args.checkpoint, args.hookpoint), device=args.device)
    levels = None if prefix_lens is None else sorted(set(prefix_lens))
    section = coder_meta_sae(coder, levels, meta_width=args.meta_width, meta_k=args.meta_k,
                             steps=args.meta_steps, seed=args.meta_seed)
    fvus = ", ".join(f"{lv['start']}-{lv['end']}: {lv['fvu']:.3f}" for lv in section["levels"])
    print(f"meta-SAE FVU per level (higher = more disentangled): {fvus}")
    return section


def _autointerp(args: argparse.Namespace, prefix_lens: list[int] | None, judge) -> dict:
    """The autointerp section, on the coder's hookpoint of --autointerp-model."""
    from ..adapters.sparsify import load_coder
    from ..corpus import austen_texts, split_text
    from ..evaluation.autointerp import autointerp
    from ..hooks import hookpoint_layer
    from ..offline import load_pretrained, load_tokenizer

    coder_dir = resolve_coder_dir(args.checkpoint, args.hookpoint)
    layer = hookpoint_layer(args.splice_hookpoint or coder_dir.name)
    if args.autointerp_corpus is None:
        texts = [split_text(t, "test") for t in austen_texts().values()]
    else:
        texts = [p.read_text(encoding="utf-8") for p in sorted(args.autointerp_corpus.glob("*.txt"))]
    model = load_pretrained(args.autointerp_model, device=args.device)
    judge = judge or LocalJudge(args.explainer_model, device=args.device)
    section = autointerp(
        model, load_tokenizer(args.autointerp_model), load_coder(coder_dir), layer, texts, judge,
        None if prefix_lens is None else sorted(set(prefix_lens)),
        n_tokens=args.autointerp_tokens, latents_per_level=args.autointerp_latents,
        n_pairs=args.autointerp_pairs, seed=args.autointerp_seed,
    )
    section["judge"] = args.explainer_url or args.explainer_model
    for kind in ("sort_eval", "contrastive_eval", "detection_eval"):
        cells = ", ".join(f"{r['start']}-{r['end']}: " + ("-" if r["accuracy"] is None else f"{r['accuracy']:.2f}")
                          for r in section[kind])
        print(f"{kind} accuracy per level (chance 0.5): {cells}")
    return section


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plot_path = args.plot or args.out.with_suffix(".png")

    def body() -> None:
        _check_flags(args, plot_path)
        prefix_lens = _parse_prefix_lens(args.prefix_lens)
        # An endpoint is checked now; a local judge is loaded only when its turn comes.
        judge = ChatJudge(args.explainer_url, args.explainer_model, api_key_env=args.explainer_api_key_env) \
            if args.autointerp and args.explainer_url else None
        result = evaluate_checkpoint(
            args.checkpoint, args.data,
            hookpoint=args.hookpoint,
            prefix_lens=prefix_lens,
            max_rows=args.max_rows,
            rsa_samples=args.rsa_samples,
            dense_threshold=args.dense_threshold,
            power_law_trim=args.power_law_trim,
            model=args.model,
            tokens=args.tokens,
            splice_hookpoint=args.splice_hookpoint,
            splice_from_position=args.splice_from_position,
            lm_batch_size=args.lm_batch_size,
            device=args.device,
        )
        if args.meta_sae:
            result["meta_sae"] = _meta_sae(args, prefix_lens)
        if args.autointerp:
            result["autointerp"] = _autointerp(args, prefix_lens, judge)
        save_report(result, args.out, plot_path, title=str(args.checkpoint))
        fvus = ", ".join(f"P={r['prefix_len']}: {r['fvu']:.4f}" for r in result["prefix"])
        print(f"FVU per prefix: {fvus}")
        print(f"wrote {args.out} and {plot_path}")

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
