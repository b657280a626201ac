"""``circuit-tracer-matryoshka``: circuit-tracer's own CLI with Matryoshka prefixes.

It runs circuit-tracer's ``__main__.main`` (its argparse, subcommands, flags, help and
defaults) with three names in that one module replaced for the span of the call:

- ``argparse``: its ``ArgumentParser`` adds ``--prefix-len P [P ...]``, ``--no-supernodes``
  and ``--supernode-corpus`` to the ``attribute`` subcommand just before parsing (upstream builds and parses its parser
  inside ``main``, so there is no other place to add a flag);
- ``run_attribution``: the plugin's, which also loads local transcoder directories (TopK
  kind included) and local model directories / GGUF files, and writes one graph per
  prefix length;
- ``run_server`` (``start-server``, ``attribute --server``): the plugin's multi-level
  offline viewer; ``start-server`` also gets ``--host``, and ``--model``,
  ``--transcoder_set`` and ``--prefix-len`` for graphs on demand.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

from ..adapters.circuit_tracer.hierarchy import CORPUS_TOKENS
from ..atomic import check_writable_dir
from ..core.errors import UsageError
from ..core.prefixes import check_prefix_len
from .runner import run

PROG = "circuit-tracer-matryoshka"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_prefix_len_argument(attr_parser: argparse.ArgumentParser) -> None:
    attr_parser.add_argument(
        "--prefix-len",
        type=int,
        nargs="+",
        metavar="P",
        default=None,
        help="Matryoshka prefix lengths: one graph per P with latents >= P zeroed after "
        "the activation (their part goes to the error nodes); slugs and .pt paths get "
        "a -pP suffix. --transcoder_set and --model also accept local paths.",
    )
    attr_parser.add_argument(
        "--no-supernodes",
        action="store_true",
        help="Do not group the nodes of each finer graph into supernodes by their coarse parent "
        "(on by default with several --prefix-len and graph files).",
    )
    attr_parser.add_argument(
        "--supernode-corpus",
        metavar="FILE",
        default=None,
        help="UTF-8 text on which parents are also scored by co-activation "
        f"(|cosine| * overlap, first {CORPUS_TOKENS} tokens); without it, by decoder |cosine| alone.",
    )


def add_start_server_arguments(server_parser: argparse.ArgumentParser) -> None:
    server_parser.add_argument(
        "--host", default="127.0.0.1",
        help="Address to listen on (default 127.0.0.1: this machine only).",
    )
    server_parser.add_argument(
        "--model", default=None,
        help="Model (dir, .gguf or name) for graphs on demand; default: the transcoder set's.",
    )
    server_parser.add_argument(
        "--transcoder_set", default=None,
        help="Transcoder dir or hub name: turns on graphs on demand (a prompt box in the page).",
    )
    server_parser.add_argument(
        "--prefix-len", type=int, nargs="+", metavar="P", default=None,
        help="Prefix lengths the prompt box offers first (default: the nested sizes).",
    )


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return None


def _argparse_with_prefix_len(argv: list[str] | None) -> SimpleNamespace:
    """The ``argparse`` module as upstream's ``__main__`` is to see it: its one
    ``parse_args()`` call parses ``argv`` with ``--prefix-len`` on ``attribute``."""

    class ArgumentParser(argparse.ArgumentParser):
        def parse_args(self, args=None, namespace=None):
            attr = _subparser(self, "attribute")
            if attr is not None:
                add_prefix_len_argument(attr)
                add_start_server_arguments(_subparser(self, "start-server"))
                if args is None:
                    args = argv
            return super().parse_args(args, namespace)

    return SimpleNamespace(**{**vars(argparse), "ArgumentParser": ArgumentParser})


def run_attribution(args, parser) -> None:
    """The plugin's ``run_attribution``: same flags as circuit-tracer's, plus ``--prefix-len``.

    Upstream's own (``circuit_tracer.__main__.run_attribution``) cannot be reused: it
    loads transcoders only through the hub loader (no TopK kind), builds one graph, and
    creates ``--graph_file_dir`` before any input is checked. The checks and warnings
    below keep its wording.
    """
    import torch

    from ..adapters.circuit_tracer.attribution import attribute_prefixes
    from ..adapters.circuit_tracer.graph_files import (
        graph_file_entries,
        save_graphs,
        score_rows,
        write_graph_files,
        write_scores,
    )
    from ..adapters.circuit_tracer.hierarchy import read_corpus, write_hierarchy
    from ..adapters.circuit_tracer.loading import load_transcoders, nested_sizes_of, warn_if_not_matryoshka
    from ..adapters.circuit_tracer.local_model import load_replacement_model
    from ..adapters.circuit_tracer.prefix_transcoders import level_decoder_sizes, transcoder_width
    from ..core.level_decoders import decoder_note

    if bool(args.slug) != bool(args.graph_file_dir):
        which, missing = ("slug", "graph_file_dir") if args.slug else ("graph_file_dir", "slug")
        warnings.warn(f"You provided --{which} but not --{missing}. Both are required for creating graph files.")
    create_files = bool(args.slug) and bool(args.graph_file_dir)
    if args.server and not create_files:
        parser.error("Both --slug and --graph_file_dir are required when using --server")
    if not create_files and not args.graph_output_path:
        parser.error("--graph_output_path is required when not creating graph files (--slug and --graph_file_dir)")
    # Outputs are checked before any loading or attribution: a bad path costs no work.
    if args.graph_output_path:
        check_writable_dir(Path(args.graph_output_path).absolute().parent)
        if Path(args.graph_output_path).is_dir():
            raise UsageError(f"--graph_output_path {args.graph_output_path} is a directory; give a .pt file path")
    if create_files:
        check_writable_dir(args.graph_file_dir)
    supernodes = create_files and len(args.prefix_len or ()) > 1 and not args.no_supernodes
    if args.supernode_corpus and not supernodes:
        raise UsageError(
            "--supernode-corpus is used only for supernodes: give several --prefix-len, "
            "--slug and --graph_file_dir, and no --no-supernodes"
        )
    texts = read_corpus(args.supernode_corpus) if args.supernode_corpus else None
    dtype = getattr(torch, DTYPES.get(args.dtype, args.dtype))

    transcoders, config = load_transcoders(args.transcoder_set, dtype, args.lazy_encoder, args.lazy_decoder)
    width = transcoder_width(transcoders)
    prefix_lens = args.prefix_len
    if prefix_lens is not None:
        for p in prefix_lens:
            check_prefix_len(p, width, what="--prefix-len: prefix length")
        # Not core.prefixes.check_prefix_lens: this flag's message names the flag.
        if len(set(prefix_lens)) != len(prefix_lens):
            raise UsageError(f"--prefix-len {prefix_lens} repeats a value; give each once")
        warn_if_not_matryoshka(config, prefix_lens)
        for p in prefix_lens:
            note = decoder_note(p, level_decoder_sizes(transcoders), width)
            if note:
                warnings.warn(note, UserWarning, stacklevel=1)
    model_spec = args.model or config.get("model_name")
    if not model_spec:
        parser.error("--model must be specified when not provided in transcoder config")

    logging.info(f"Generating attribution graph for model: {model_spec}")
    model = load_replacement_model(model_spec, transcoders, dtype=dtype, backend=args.backend)
    logging.info("Running attribution...")
    results = attribute_prefixes(
        args.prompt,
        model,
        prefix_lens or [None],
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        verbose=args.verbose,
        offload=args.offload,
        max_feature_nodes=args.max_feature_nodes,
    )
    rows = score_rows(results, width, nested_sizes_of(config), level_decoder_sizes(transcoders))
    print(f"{'prefix_len':>10} {'replacement':>12} {'completeness':>13} {'path length':>12} {'seconds':>8}")
    for r in results:
        p = r.prefix_len
        print(f"{'full' if p is None else p:>10} {r.replacement:12.4f} {r.completeness:13.4f} {r.path_length.mean:12.2f} {r.seconds:8.2f}")

    if args.graph_output_path:
        save_graphs(results, rows, args.graph_output_path)
    if create_files:
        entries = graph_file_entries(args.slug, results, rows)
        graphs = [(slug, r.prefix_len) for (slug, _, _), r in zip(entries, results)]
        annotate = (lambda tmp: write_hierarchy(tmp, graphs, model, texts)) if supernodes else None
        write_graph_files(entries, args.graph_file_dir, args.node_threshold, args.edge_threshold, annotate)
        write_scores(Path(args.graph_file_dir) / f"{args.slug}.scores.json", rows)
        logging.info(f"Graph JSON files written to {args.graph_file_dir}")


def run_server(args) -> None:
    """``start-server`` and ``attribute --server``: the plugin's multi-level viewer."""
    from ..viewer.server import run_server as serve_viewer

    serve_viewer(args)


@contextmanager
def _plugin_cli(argv: list[str] | None) -> Iterator:
    import circuit_tracer.__main__ as ct_main

    with (
        patch.object(ct_main, "argparse", _argparse_with_prefix_len(argv)),
        patch.object(ct_main, "run_attribution", run_attribution),
        patch.object(ct_main, "run_server", run_server),
    ):
        yield ct_main


def main(argv: list[str] | None = None) -> None:
    """Returns on success; exits with code 2 (one error line) on bad input."""
    with _plugin_cli(argv) as ct_main:
        code = run(PROG, ct_main.main)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
