"""``matryoshka-eval``: evaluate a saved coder as a progressive coder.

Argument parsing only; the work is ``evaluation.checkpoint.evaluate_checkpoint`` and
``evaluation.report.save_report``.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import UsageError
from ..evaluation.checkpoint import evaluate_checkpoint, resolve_coder_dir
from ..evaluation.meta_sae import META_K, META_STEPS, coder_meta_sae
from ..evaluation.report import save_report
from .runner import run

PROG = "matryoshka-eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a sparsify or Matryoshka coder as a progressive coder: "
        "FVU/MSE/RSA per prefix, L0, dead/dense latents, frequency per level, "
        "dictionary power law; optionally loss recovered/KL in a language model.",
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
    for name in ("max_rows", "lm_batch_size", "meta_width", "meta_k", "meta_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v} must be at least 1")
    if args.meta_width is not None and args.meta_k > args.meta_width:
        raise UsageError(f"--meta-k {args.meta_k} exceeds --meta-width {args.meta_width}; allowed: 1..{args.meta_width}")
    if args.rsa_samples < 0:
        raise UsageError(f"--rsa-samples {args.rsa_samples} must be >= 0")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plot_path = args.plot or args.out.with_suffix(".png")

    def body() -> None:
        _check_flags(args, plot_path)
        prefix_lens = _parse_prefix_lens(args.prefix_lens)
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
        save_report(result, args.out, plot_path, title=str(args.checkpoint))
        fvus = ", ".join(f"P={r['prefix_len']}: {r['fvu']:.4f}" for r in result["prefix"])
        print(f"FVU per prefix: {fvus}")
        print(f"wrote {args.out} and {plot_path}")

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
