"""Console scripts: ``matryoshka-export`` and ``circuit-tracer-matryoshka``.

``circuit-tracer-matryoshka`` runs circuit-tracer's own ``__main__.main`` (its argparse,
subcommands and flags) with two seams: ``--prefix-len P [P ...]`` is added to the
``attribute`` subparser just before parsing, and ``run_attribution`` is replaced by the
plugin's, which also loads local transcoder directories (TopK kind included) and local
model directories / GGUF files, and writes one graph per prefix length.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

from ...atomic import atomic_write, atomic_write_text
from ...core.config import MatryoshkaConfigError
from ...core.prefixes import check_prefix_len
from ...core.errors import CheckpointError
from .export import ACTIVATIONS, ExportError, export_transcoder_set, hookpoint_layer
from .local_model import check_transcoders_fit, is_local_model
from ...core.errors import UsageError

PROG_EXPORT = "matryoshka-export"
PROG_ATTRIBUTE = "circuit-tracer-matryoshka"



USER_ERRORS = (UsageError, CheckpointError, ExportError, MatryoshkaConfigError)


def _fail(prog: str, error: BaseException) -> None:
    message = str(error).replace("\n", " ")
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


# -- matryoshka-export ---------------------------------------------------------------


def _read_calibration(path: str) -> dict[int, "object"]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UsageError(f"calibration file {path} not found")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"calibration file {path} is not a readable safetensors file ({e})") from None
    by_layer = {}
    for key, value in tensors.items():
        layer = int(key) if key.isdigit() else hookpoint_layer(key)
        if value.ndim != 2:
            raise UsageError(f"calibration tensor {key!r} has shape {tuple(value.shape)}; expected [n, d_model]")
        by_layer[layer] = value
    return by_layer


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG_EXPORT,
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
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(argv)
    try:
        calibration = _read_calibration(args.calibration) if args.calibration else None
        out = export_transcoder_set(
            args.checkpoint_dir,
            args.out_dir,
            activation=args.activation,
            calibration=calibration,
            model_name=args.model_name,
            overwrite=args.overwrite,
        )
    except USER_ERRORS as e:
        _fail(PROG_EXPORT, e)
    print(f"wrote {out.absolute()}")


# -- circuit-tracer-matryoshka ---------------------------------------------------------


def _attribute_subparser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "attribute" in action.choices:
            return action.choices["attribute"]
    return None


def _add_plugin_arguments(attr: argparse.ArgumentParser) -> None:
    if "--prefix-len" in attr._option_string_actions:
        return
    attr.add_argument(
        "--prefix-len",
        type=int,
        nargs="+",
        metavar="P",
        default=None,
        help="Matryoshka prefix lengths: one graph per P with latents >= P zeroed after "
        "the activation (their part goes to the error nodes); slugs and .pt paths get "
        "a -pP suffix. --transcoder_set and --model also accept local paths.",
    )


def _load_transcoders(spec: str, dtype, lazy_encoder: bool, lazy_decoder: bool):
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    from .truncation import PrefixCrossLayerTranscoder, load_transcoders_dir

    if Path(spec).is_dir():
        return load_transcoders_dir(spec, dtype=dtype, lazy_encoder=lazy_encoder, lazy_decoder=lazy_decoder)
    if Path(spec).exists() or spec.startswith(("/", "./", "../")):
        raise UsageError(f"--transcoder_set {spec} is not a directory holding config.yaml")
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    transcoders, config = load_transcoder_from_hub(
        spec, dtype=dtype, lazy_encoder=lazy_encoder, lazy_decoder=lazy_decoder
    )
    if isinstance(transcoders, CrossLayerTranscoder):
        transcoders.__class__ = PrefixCrossLayerTranscoder
    config.setdefault("matryoshka", None)
    return transcoders, config


def _with_suffix(path: str, prefix_len: int | None) -> Path:
    p = Path(path)
    return p if prefix_len is None else p.with_name(f"{p.stem}-p{prefix_len}{p.suffix}")


def write_graph_files(entries, graph_file_dir, node_threshold: float, edge_threshold: float) -> None:
    """``create_graph_files`` for each ``(slug, graph, extra_metadata)``, all or nothing.

    Files are built in a temporary sibling; an existing data directory keeps its other
    graphs, and its ``graph-metadata.json`` is replaced last.
    """
    from circuit_tracer.utils.create_graph_files import create_graph_files

    out = Path(graph_file_dir).absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--graph_file_dir {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for slug, graph, _ in entries:
            create_graph_files(
                graph_or_path=graph,
                slug=slug,
                scan=None,
                output_path=str(tmp),
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
            )
        meta_path = tmp / "graph-metadata.json"
        new = json.loads(meta_path.read_text())["graphs"]
        extra = {slug: e for slug, _, e in entries}
        for g in new:
            g.update(extra.get(g["slug"], {}))
        old_path = out / "graph-metadata.json"
        old = json.loads(old_path.read_text())["graphs"] if old_path.is_file() else []
        slugs = {g["slug"] for g in new}
        meta_path.write_text(json.dumps({"graphs": [g for g in old if g["slug"] not in slugs] + new}, indent=2))
        if not out.exists():
            os.replace(tmp, out)
            return
        for slug, _, _ in entries:
            os.replace(tmp / f"{slug}.json", out / f"{slug}.json")
        os.replace(meta_path, old_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_attribution(args, parser) -> None:
    """The plugin's ``run_attribution``: same flags as circuit-tracer's, plus ``--prefix-len``."""
    import torch
    from circuit_tracer import ReplacementModel

    from .truncation import attribute_prefixes, nested_sizes_of, warn_if_not_matryoshka

    if bool(args.slug) != bool(args.graph_file_dir):
        which, missing = ("slug", "graph_file_dir") if args.slug else ("graph_file_dir", "slug")
        warnings.warn(f"You provided --{which} but not --{missing}. Both are required for creating graph files.")
    create_files = bool(args.slug) and bool(args.graph_file_dir)
    if args.server and not create_files:
        parser.error("Both --slug and --graph_file_dir are required when using --server")
    if not create_files and not args.graph_output_path:
        parser.error("--graph_output_path is required when not creating graph files (--slug and --graph_file_dir)")
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype, args.dtype))

    transcoders, config = _load_transcoders(args.transcoder_set, dtype, args.lazy_encoder, args.lazy_decoder)
    width = int(transcoders.d_transcoder)
    prefix_lens = args.prefix_len
    if prefix_lens is not None:
        for p in prefix_lens:
            try:
                check_prefix_len(p, width)
            except ValueError as e:
                raise UsageError(f"--prefix-len: {e}") from None
        if len(set(prefix_lens)) != len(prefix_lens):
            raise UsageError(f"--prefix-len {prefix_lens} repeats a value; give each once")
        warn_if_not_matryoshka(config, prefix_lens)
    model_spec = args.model or config.get("model_name")
    if not model_spec:
        parser.error("--model must be specified when not provided in transcoder config")

    logging.info(f"Generating attribution graph for model: {model_spec}")
    if is_local_model(model_spec):
        if args.backend != "transformerlens":
            raise UsageError("local models (--model PATH) run on --backend transformerlens only")
        from .local_model import load_local_replacement_model

        model = load_local_replacement_model(model_spec, transcoders, dtype=dtype)
    else:
        model = ReplacementModel.from_pretrained_and_transcoders(
            model_spec, transcoders, dtype=dtype, backend=args.backend
        )
        if args.backend == "transformerlens":
            check_transcoders_fit(model.cfg, transcoders)

    kwargs = dict(
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        verbose=args.verbose,
        offload=args.offload,
        max_feature_nodes=args.max_feature_nodes,
    )
    logging.info("Running attribution...")
    results = attribute_prefixes(args.prompt, model, prefix_lens or [None], **kwargs)

    nested = nested_sizes_of(config)
    rows = []
    print(f"{'prefix_len':>10} {'replacement':>12} {'completeness':>13} {'seconds':>8}")
    for r in results:
        p = r.prefix_len
        print(f"{'full' if p is None else p:>10} {r.replacement:12.4f} {r.completeness:13.4f} {r.seconds:8.2f}")
        rows.append(
            {
                "prefix_len": p,
                "width": width,
                "nested_sizes": nested,
                "replacement_score": r.replacement,
                "completeness_score": r.completeness,
                "attribution_seconds": r.seconds,
                "n_active_features": int(r.graph.active_features.shape[0]),
            }
        )

    if args.graph_output_path:
        for r in results:
            path = _with_suffix(args.graph_output_path, r.prefix_len)
            atomic_write(path, r.graph.to_pt)
            logging.info(f"Saved graph to {path}")
        scores_path = Path(args.graph_output_path).with_suffix(".scores.json")
        atomic_write_text(scores_path, json.dumps(rows, indent=2))
    if create_files:
        entries = []
        for r, row in zip(results, rows):
            if r.prefix_len is None:
                entries.append((args.slug, r.graph, {}))
            else:
                extra = {**row, "title_prefix": f"[P={r.prefix_len}] "}
                entries.append((f"{args.slug}-p{r.prefix_len}", r.graph, extra))
        write_graph_files(entries, args.graph_file_dir, args.node_threshold, args.edge_threshold)
        scores_path = Path(args.graph_file_dir) / f"{args.slug}.scores.json"
        atomic_write_text(scores_path, json.dumps(rows, indent=2))
        logging.info(f"Graph JSON files written to {args.graph_file_dir}")


def _viewer_run_server(args) -> None:
    from ...viewer.server import run_server

    run_server(args)


@contextmanager
def _plugin_cli(argv: list[str] | None):
    import circuit_tracer.__main__ as ct_main

    original_parse = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        attr = _attribute_subparser(self)
        if attr is not None:
            _add_plugin_arguments(attr)
            if args is None:
                args = argv
        return original_parse(self, args, namespace)

    with (
        patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        patch.object(ct_main, "run_attribution", run_attribution),
        # start-server and attribute --server: the plugin's multi-level offline viewer.
        patch.object(ct_main, "run_server", _viewer_run_server),
    ):
        yield ct_main


def main(argv: list[str] | None = None) -> None:
    with _plugin_cli(argv) as ct_main:
        try:
            ct_main.main()
        except USER_ERRORS as e:
            _fail(PROG_ATTRIBUTE, e)


if __name__ == "__main__":
    main()
