"""``python -m matryoshka_plugin.viewer {vendor,build,serve}``.

- ``vendor``: fetch the viewer's JavaScript libraries from the npm registry into the cache.
- ``build GRAPH_DIR --transcoder_set TC --model M``: write feature pages (top-activating
  corpus contexts) and decompositions next to the graphs.
- ``serve GRAPH_DIR``: serve the multi-level viewer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROG = "python -m matryoshka_plugin.viewer"


def _texts(corpus: str) -> list[str]:
    if corpus == "austen":
        from ..corpus import austen_texts

        return list(austen_texts().values())
    path = Path(corpus)
    if not path.is_file():
        raise ValueError(f"--corpus {corpus} is neither 'austen' nor a text file")
    return [path.read_text()]


def load_model(transcoder_set: str, model: str | None):
    """The ReplacementModel for ``build``: local dirs, GGUF or the offline SmolLM2 name."""
    from .compute import load_model_and_config

    return load_model_and_config(transcoder_set, model)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vendor", help="fetch d3, d3-jetpack, npyjs, dagre, pako with npm pack into the cache")
    v.add_argument("--force", action="store_true", help="fetch again even if present")
    b = sub.add_parser("build", help="write feature pages and decompositions for a graph dir")
    b.add_argument("graph_file_dir")
    b.add_argument("--transcoder_set", required=True, help="transcoder dir (config.yaml) or hub name")
    b.add_argument("--model", help="model dir, .gguf, or name (default: the transcoder set's)")
    b.add_argument("--corpus", default="austen", help="'austen' (offline Jane Austen) or a text file")
    b.add_argument("--n-tokens", type=int, default=16384, help="corpus tokens to scan")
    b.add_argument("--seq-len", type=int, default=64, help="tokens per forward pass")
    s = sub.add_parser("serve", help="serve the multi-level viewer for a graph dir")
    s.add_argument("graph_file_dir")
    s.add_argument("--port", type=int, default=8032)
    args = parser.parse_args(argv)

    from .assets import AssetError, vendor

    try:
        if args.command == "vendor":
            print(f"vendored into {vendor(force=args.force)}")
        elif args.command == "build":
            if args.n_tokens < 1 or args.seq_len < 2:
                raise ValueError(f"--n-tokens {args.n_tokens} / --seq-len {args.seq_len}: need n-tokens >= 1, seq-len >= 2")
            from .data import build_viewer_data

            model = load_model(args.transcoder_set, args.model)
            for out in build_viewer_data(args.graph_file_dir, model, _texts(args.corpus),
                                         n_tokens=args.n_tokens, seq_len=args.seq_len):
                print(f"wrote {out}")
        else:
            from .server import serve_graphs

            server = serve_graphs(args.graph_file_dir, args.port)
            print(f"serving {args.graph_file_dir} at {server.url} (Ctrl+C to stop)")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                server.stop()
    except (AssetError, ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
