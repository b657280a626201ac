"""``matryoshka-export``: a sparsify transcoder run -> a circuit-tracer transcoder directory.

The work is ``adapters.circuit_tracer.sparsify_export.export_transcoder_set``.
"""

from __future__ import annotations

import argparse
import sys

from .runner import run

PROG = "matryoshka-export"


def build_parser() -> argparse.ArgumentParser:
    from ..adapters.circuit_tracer.transcoder_dir import ACTIVATIONS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Convert a sparsify transcoder / skip-transcoder run directory "
            "(<hookpoint>/cfg.json + sae.safetensors per MLP layer) into a circuit-tracer "
            "transcoder-set directory (config.yaml + layer_{i}.safetensors + matryoshka.json)."
        ),
    )
    parser.add_argument("checkpoint_dir", help="sparsify run directory with one subdirectory per MLP hookpoint")
    parser.add_argument("out_dir", help="new directory to write (written atomically)")
    parser.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="topk",
        help="topk: sparsify's exact TopK (load with circuit-tracer-matryoshka); "
        "jumprelu: calibrated per-latent thresholds (stock circuit-tracer loads it)",
    )
    parser.add_argument(
        "--calibration",
        help="safetensors file of MLP inputs [n, d_model] per layer (keys: hookpoint names "
        "like layers.3.mlp, or layer numbers); needed for --activation jumprelu",
    )
    parser.add_argument(
        "--calibration-outputs",
        help="safetensors file of the MLP outputs matching --calibration row for row (same keys); "
        "adds the true FVU of TopK and of JumpReLU to the calibration report",
    )
    parser.add_argument("--model-name", help="model name to record in config.yaml")
    parser.add_argument(
        "--n-layers",
        type=int,
        help="the model's number of layers; layers without a coder are written as zero "
        "transcoders (their MLP output goes to the error nodes). Default: up to the last coder",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    return parser


def calibration_lines(report: dict) -> list[str]:
    """The JumpReLU calibration report as lines: one header, then one line per layer."""

    def fvu(stats: dict, key: str) -> str:
        return "n/a" if stats.get(key) is None else f"{stats[key]:.4f}"

    lines = [
        "JumpReLU vs TopK on the calibration tokens: same active set, mean Jaccard, "
        "L0 mean/std [min, max] vs k, FVU TopK -> JumpReLU (vs the MLP outputs, if given), "
        "FVU of JumpReLU against the TopK output"
    ]
    for layer, s in report["layers"].items():
        true_fvu = f"{fvu(s, 'fvu_topk')} -> {fvu(s, 'fvu_jumprelu')}" if "fvu_topk" in s else "n/a (no outputs)"
        lines.append(
            f"  layer {layer} ({s['tokens']} tokens): {s['same_active_set']:.1%}, {s['mean_jaccard']:.3f}, "
            f"L0 {s['l0_mean']:.2f}/{s['l0_std']:.2f} [{s['l0_min']}, {s['l0_max']}] vs k={s['k']}, "
            f"FVU {true_fvu}, vs TopK {fvu(s, 'fvu_jumprelu_vs_topk')}"
        )
    if report["exact_layers"]:
        lines.append(f"  layers {report['exact_layers']}: BatchTopK, exported with their exact threshold")
    return lines


def _export(args) -> None:
    from ..adapters.circuit_tracer.sparsify_export import (
        empty_layers,
        export_transcoder_set,
        find_coder_dirs,
        read_calibration,
    )
    from ..adapters.circuit_tracer.transcoder_dir import CALIBRATION_FILE, read_calibration_report
    from ..hooks import format_layers

    empty = empty_layers(find_coder_dirs(args.checkpoint_dir), args.n_layers)
    out = export_transcoder_set(
        args.checkpoint_dir,
        args.out_dir,
        activation=args.activation,
        calibration=read_calibration(args.calibration) if args.calibration else None,
        calibration_outputs=read_calibration(args.calibration_outputs) if args.calibration_outputs else None,
        model_name=args.model_name,
        overwrite=args.overwrite,
        n_layers=args.n_layers,
    )
    if empty:
        print(f"no coder for layers {format_layers(empty)}: written as zero transcoders (their MLP output is an error node)")
    print(f"wrote {out.absolute()}")
    report = read_calibration_report(out)
    if report is not None:
        print("\n".join(calibration_lines(report)))
        print(f"(also in {out.absolute() / CALIBRATION_FILE})")


def main(argv: list[str] | None = None) -> None:
    """Returns on success; exits with code 2 (one error line) on bad input."""
    args = build_parser().parse_args(argv)
    code = run(PROG, lambda: _export(args))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
