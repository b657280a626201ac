"""Attribution graphs at 4 prefix lengths of one prompt against one full-width graph.

Side by side in one process, on SmolLM2-135M-Instruct (offline, all 30 layers) with
per-layer TopK transcoders and, optionally, a JumpReLU cross-layer transcoder:

1. one full-width graph (``attribute``);
2. the prefix ladder with ``attribute_prefixes`` (default ``derive=True``: the largest
   prefix attributed, the smaller ones derived from it exactly);
3. the same ladder attributed directly at each prefix (``derive=False``, what
   ``attribute_prefixes`` did before), and the largest difference between the derived and
   the direct graphs' edges.

The transcoders are random (seeded), not trained: attribution time depends on the number
of active features (TopK fixes it at k per token and layer) and the model, not on what
the features mean, so this measures cost only. The CLT's per-latent thresholds are set
from the prompt's own pre-activations so that about k latents fire per token and layer.

Usage: ``python -m benchmarks.attribution.prefix_ladder`` (about 20 minutes on 2 busy
CPU cores). Outputs: ``benchmarks/attribution/results/prefix_ladder.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, machine_description, utc_timestamp, write_json, write_markdown

HERE = Path(__file__).resolve().parent
PROMPT = "The capital of France is"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results"), help="directory for prefix_ladder.{json,md}")
    p.add_argument("--kinds", nargs="+", choices=["plt", "clt"], default=["plt", "clt"], help="transcoder kinds to run")
    p.add_argument("--width", type=int, default=1152, help="per-layer transcoder width")
    p.add_argument("--clt-width", type=int, default=288, help="cross-layer transcoder width (its decoders grow with layers^2)")
    p.add_argument("--k", type=int, default=8, help="active latents per token and layer")
    p.add_argument("--fractions", type=float, nargs=4, default=[1 / 16, 1 / 4, 1 / 2, 1.0],
                   help="the 4 prefix lengths, as fractions of the width (1.0: full width)")
    p.add_argument("--batch-size", type=int, default=256, help="circuit-tracer's attribution batch size")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the full graph and the derived ladder")
    p.add_argument("--no-direct", action="store_true", help="skip the direct (derive=False) ladder")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args(argv)


def per_layer_transcoders(cfg, width: int, k: int):
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    from matryoshka_plugin.adapters.circuit_tracer.activations import TopKReLU

    torch.manual_seed(0)
    layers = {}
    for layer in range(cfg.n_layers):
        tc = SingleLayerTranscoder(cfg.d_model, width, TopKReLU(k), layer, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            tc.W_enc.normal_(0, cfg.d_model**-0.5)
            tc.W_dec.normal_(0, width**-0.5)
            tc.b_enc.zero_()
            tc.b_dec.zero_()
        layers[layer] = tc
    return TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="bench-plt")


def cross_layer_transcoder(cfg, width: int, k: int, mlp_in: torch.Tensor):
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(
        cfg.n_layers, width, cfg.d_model, activation_function="jump_relu", lazy_decoder=False,
        feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="bench-clt",
        device=torch.device("cpu"), dtype=torch.float32,
    )
    with torch.no_grad():
        clt.W_enc.normal_(0, cfg.d_model**-0.5)
        for w in clt.W_dec:
            w.normal_(0, width**-0.5)
        clt.b_enc.zero_()
        clt.b_dec.zero_()
        # Per layer, the threshold under which about k of `width` latents fire per token.
        pre = torch.einsum("lpd,lfd->lpf", mlp_in, clt.W_enc)
        q = torch.quantile(pre.flatten(1), 1 - k / width, dim=1)
        clt.activation_function.threshold.copy_(q.view(-1, 1, 1).expand_as(clt.activation_function.threshold))
    return clt


def mlp_inputs(model, tokens) -> torch.Tensor:
    names = [f"blocks.{layer}.mlp.hook_in" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n][0] for n in names])


def run_kind(kind: str, model, tokens, args) -> dict:
    from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute, attribute_prefixes
    from matryoshka_plugin.adapters.circuit_tracer.prefix_transcoders import transcoder_width

    width = transcoder_width(model.transcoders)
    ladder = [max(1, round(f * width)) for f in args.fractions]
    opts = dict(batch_size=args.batch_size)
    full_times, derived_times = [], []
    # Interleaved repeats, best of each: other jobs on a shared machine only add time.
    for _ in range(args.repeats):
        start = time.perf_counter()
        full = attribute(tokens, model, **opts)
        full_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        derived = attribute_prefixes(tokens, model, ladder, **opts)
        derived_times.append(time.perf_counter() - start)
    full_s, derived_s = min(full_times), min(derived_times)
    row = {
        "kind": kind, "width": width, "k": args.k, "prefix_lens": ladder,
        "n_active_full": int(full.active_features.shape[0]),
        "n_active": [int(r.graph.active_features.shape[0]) for r in derived],
        "derived": [r.derived for r in derived],
        "full_graph_s": full_s, "ladder_derived_s": derived_s, "ratio_derived": derived_s / full_s,
        "per_prefix_derived_s": [r.seconds for r in derived],
        "full_graph_runs_s": full_times, "ladder_derived_runs_s": derived_times,
    }
    if not args.no_direct:
        start = time.perf_counter()
        direct = attribute_prefixes(tokens, model, ladder, derive=False, **opts)
        row["ladder_direct_s"] = time.perf_counter() - start
        row["ratio_direct"] = row["ladder_direct_s"] / full_s
        row["per_prefix_direct_s"] = [r.seconds for r in direct]
        row["max_abs_edge_diff"] = max(
            float((d.graph.adjacency_matrix - a.graph.adjacency_matrix).abs().max()) for d, a in zip(derived, direct)
        )
        row["max_abs_edge"] = max(float(a.graph.adjacency_matrix.abs().max()) for a in direct)
    return row


def report(rows: list[dict], meta: dict) -> list[str]:
    lines = [
        "# Attribution at 4 prefix lengths vs one full-width graph",
        "",
        f"- Command: `{meta['command']}`; date {meta['date']}; machine: {meta['machine']}.",
        f"- Model: SmolLM2-135M-Instruct (30 layers, d_model 576), prompt {PROMPT!r}, "
        "random seeded transcoders (cost only: see the script's docstring).",
        "- Ratio: the 4 graphs with `attribute_prefixes` (the largest attributed, the rest derived) "
        "against one `attribute` at full width, in the same process, best of interleaved repeats; "
        "ratio direct: the same 4 graphs each attributed directly (`derive=False`, run once).",
        "",
        "| transcoders | width | k | prefix lengths | active features | full graph s | ladder derived s | ratio | "
        "ladder direct s | ratio direct | max edge diff / max edge |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        direct = (
            f"{r['ladder_direct_s']:.1f} | {r['ratio_direct']:.2f}x | {r['max_abs_edge_diff']:.1e} / {r['max_abs_edge']:.1e}"
            if "ladder_direct_s" in r else "- | - | -"
        )
        lines.append(
            f"| {r['kind']} | {r['width']} | {r['k']} | {r['prefix_lens']} | {r['n_active']} | {r['full_graph_s']:.1f} | "
            f"{r['ladder_derived_s']:.1f} | {r['ratio_derived']:.2f}x | {direct} |"
        )
    return lines


def smollm2_shape() -> argparse.Namespace:
    """SmolLM2's layer count and width, from its converted config (no weights loaded)."""
    from transformers import AutoConfig

    from matryoshka_plugin.offline import SMOLLM2, resolve_model

    hf = AutoConfig.from_pretrained(resolve_model(SMOLLM2))
    return argparse.Namespace(n_layers=hf.num_hidden_layers, d_model=hf.hidden_size)


def main(argv=None) -> None:
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
    from matryoshka_plugin.offline import SMOLLM2

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {"command": command_line(__spec__.name, argv), "date": utc_timestamp(), "machine": machine_description()}
    shape = smollm2_shape()
    model = load_local_replacement_model(SMOLLM2, per_layer_transcoders(shape, args.width, args.k))
    tokens = model.ensure_tokenized(PROMPT)
    rows = []
    if "plt" in args.kinds:
        rows.append(run_kind("plt", model, tokens, args))
        print(rows[-1], flush=True)
    if "clt" in args.kinds:
        # The CLT's thresholds come from the prompt's MLP inputs, read through the
        # per-layer model (same hooks, same base model).
        clt = cross_layer_transcoder(shape, args.clt_width, args.k, mlp_inputs(model, tokens))
        del model
        rows.append(run_kind("clt", load_local_replacement_model(SMOLLM2, clt), tokens, args))
        print(rows[-1], flush=True)
    out = Path(args.out)
    write_json({**meta, "rows": rows}, out / "prefix_ladder.json")
    write_markdown(report(rows, meta), out / "prefix_ladder.md")
    print("\n".join(report(rows, meta)))


if __name__ == "__main__":
    main()
