"""Matryoshka cross-layer transcoders from cached activations (training path 1, CPU or GPU).

``matryoshka-clt cache|train|export|eval`` (``--help`` on each): the argument parsing
and printing; the work is in ``matryoshka_plugin.clt`` (cache, training, the model)
and ``adapters.circuit_tracer.clt_export`` (export).
"""

import json
import sys
from pathlib import Path

import torch

from ..adapters.circuit_tracer.clt_export import export_clt
from ..clt.cache import ActivationCache, cache_activations, token_source
from ..clt.model import load_clt, read_clt_config
from ..clt.train import METRICS_FILE, CLTTrainConfig, eval_prefix_lens, train_clt
from ..core.errors import CLTError
from ..device import resolve_device
from ..hooks import parse_layers
from .runner import run

PROG = "matryoshka-clt"


def cmd_cache(a) -> None:
    from ..offline import SMOLLM2, load_pretrained

    spec = a.model or SMOLLM2
    model = load_pretrained(spec, device=resolve_device(a.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    batches = token_source(spec, a.dataset, a.ctx_len, a.batch_size, a.seed, model.config.vocab_size)
    out = cache_activations(
        model, batches, parse_layers(a.layers), a.out, n_tokens=a.n_tokens, dtype=dtype,
        model_name=str(spec), overwrite=a.overwrite,
    )
    print(f"cached {a.n_tokens} tokens of layers {parse_layers(a.layers)} to {out}")


def cmd_train(cfg: CLTTrainConfig) -> None:
    if not cfg.cache:
        raise CLTError("--cache is required: an activation cache directory from `matryoshka-clt cache`")
    train_clt(cfg)
    metrics = json.loads((Path(cfg.save_dir) / "clt" / METRICS_FILE).read_text())
    print(f"trained CLT saved to {Path(cfg.save_dir) / 'clt'}")
    for p, fvu in metrics.get("holdout_prefix_fvu", {}).items():
        print(f"  prefix {p:>6}: held-out FVU per target layer " + " ".join(f"{v:.3f}" for v in fvu))


def cmd_export(a) -> None:
    calibration = None
    if a.calibration_cache:
        d = read_clt_config(a.clt)
        calibration, _ = ActivationCache(a.calibration_cache).load(d["layers"])
        calibration = calibration[: a.calibration_tokens]
    out = export_clt(
        a.clt, a.out, n_model_layers=a.n_model_layers, activation=a.activation,
        calibration=calibration, model_name=a.model_name, overwrite=a.overwrite,
    )
    print(f"exported circuit-tracer cross-layer transcoder to {out}")


def cmd_eval(a) -> None:
    clt = load_clt(a.clt)
    cache = ActivationCache(a.cache)
    x, y = cache.load(clt.layers)
    x, y = x[: a.n_tokens], y[: a.n_tokens]
    lens = [int(p) for p in a.prefix_lens.split(",")] if a.prefix_lens else eval_prefix_lens(clt)
    result = clt.prefix_fvu(x, y, lens)
    print(json.dumps({"layers": clt.layers, "prefix_fvu": {str(k): v for k, v in result.items()}}, indent=1))


def build_parser():
    from simple_parsing import ArgumentParser

    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cache", help="cache MLP inputs/outputs of chosen layers from a HF model")
    c.add_argument("--model", default=None, help="HF model folder, .gguf, or 'smollm2' (default)")
    c.add_argument("--layers", default="0-3", help="layers to cache, e.g. 0,1,2 or 0-3")
    c.add_argument("--out", required=True, help="cache directory to create")
    c.add_argument("--n-tokens", type=int, default=50_000, help="tokens to cache")
    c.add_argument("--ctx-len", type=int, default=128, help="tokens per sequence")
    c.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    c.add_argument("--dataset", choices=["austen", "random"], default="austen", help="token source")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace an existing cache")

    t = sub.add_parser("train", help="train a (Matryoshka) CLT from an activation cache")
    t.add_arguments(CLTTrainConfig, dest="cfg")

    e = sub.add_parser("export", help="export a trained CLT to circuit-tracer's format")
    e.add_argument("clt", help="CLT directory (save_dir/clt from train)")
    e.add_argument("out", help="circuit-tracer transcoder directory to create")
    e.add_argument("--n-model-layers", type=int, default=None, help="model layers (default: from the cache manifest)")
    e.add_argument("--activation", choices=["topk", "jumprelu"], default="topk")
    e.add_argument("--calibration-cache", default=None, help="cache with MLP inputs for --activation jumprelu")
    e.add_argument("--calibration-tokens", type=int, default=20_000)
    e.add_argument("--model-name", default=None)
    e.add_argument("--overwrite", action="store_true")

    v = sub.add_parser("eval", help="FVU per prefix per target layer of a CLT on a cache")
    v.add_argument("clt")
    v.add_argument("cache")
    v.add_argument("--prefix-lens", default="", help="comma-separated prefix lengths (default: nested sizes)")
    v.add_argument("--n-tokens", type=int, default=20_000)
    return parser


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        # Parsed inside ``run``: CLTTrainConfig checks its fields while parsing.
        args = build_parser().parse_args(argv)
        if args.command == "cache":
            cmd_cache(args)
        elif args.command == "train":
            cmd_train(args.cfg)
        elif args.command == "export":
            cmd_export(args)
        else:
            cmd_eval(args)

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
