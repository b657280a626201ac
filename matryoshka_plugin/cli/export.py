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
    parser.add_argument("--model-name", help="model name to record in config.yaml")
    parser.add_argument(
        "--n-layers",
        type=int,
        help="the model's number of layers; layers without a coder are written as zero "
        "transcoders (their MLP output goes to the error nodes). Default: up to the last coder",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    return parser


def _export(args) -> None:
    from ..demo_job import format_layers
    from ..adapters.circuit_tracer.sparsify_export import (
        empty_layers,
        export_transcoder_set,
        find_coder_dirs,
        read_calibration,
    )

    empty = empty_layers(find_coder_dirs(args.checkpoint_dir), args.n_layers)
    out = export_transcoder_set(
        args.checkpoint_dir,
        args.out_dir,
        activation=args.activation,
        calibration=read_calibration(args.calibration) if args.calibration else None,
        model_name=args.model_name,
        overwrite=args.overwrite,
        n_layers=args.n_layers,
    )
    if empty:
        print(f"no coder for layers {format_layers(empty)}: written as zero transcoders (their MLP output is an error node)")
    print(f"wrote {out.absolute()}")


def main(argv: list[str] | None = None) -> None:
    """Returns on success; exits with code 2 (one error line) on bad input."""
    args = build_parser().parse_args(argv)
    code = run(PROG, lambda: _export(args))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
