"""``matryoshka-global``: a global feature graph per prefix length (``matryoshka_plugin.global_graph``)."""

import argparse
import sys
from pathlib import Path

from ..global_graph.edges import RANK_BY
from ..global_graph.pipeline import make_global_graphs
from .runner import run

PROG = "matryoshka-global"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Global (input-independent) feature graph of sparsify transcoders or a cross-layer "
        "transcoder: virtual weights W_dec,i . W_enc,j between layers, weighted by corpus co-activation "
        "(ERA, TWERA), per Matryoshka prefix.",
    )
    parser.add_argument(
        "checkpoint",
        help="sparsify run directory with one <hookpoint>/ transcoder per MLP layer, or a CLT directory "
        "(matryoshka-clt train's save_dir/clt, or save_dir itself)",
    )
    parser.add_argument("--corpus", required=True, help="a text file, a folder of .txt files, or 'austen'")
    parser.add_argument("--model", default="smollm2", help="HF model folder, .gguf file, or 'smollm2' (default)")
    parser.add_argument("--prefix-len", type=int, nargs="+", required=True, metavar="P", help="prefix lengths")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--layers", help="transcoder/CLT layers to use, e.g. 0-2 (default: all in the checkpoint)")
    parser.add_argument("--n-tokens", type=int, default=20000, help="corpus tokens for the statistics")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16, help="edges kept per source feature")
    parser.add_argument("--threshold", type=float, default=0.0, help="drop edges with |score| <= this")
    parser.add_argument("--rank-by", choices=RANK_BY, default="twera")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        out = make_global_graphs(
            args.checkpoint,
            corpus=args.corpus,
            model=args.model,
            prefix_lens=args.prefix_len,
            out=args.out,
            layers=args.layers,
            n_tokens=args.n_tokens,
            ctx_len=args.ctx_len,
            batch_size=args.batch_size,
            top_k=args.top_k,
            threshold=args.threshold,
            rank_by=args.rank_by,
            overwrite=args.overwrite,
        )
        print(f"wrote {Path(out).absolute()}")

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
