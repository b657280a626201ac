"""One side of the circuit-tracer parity check; the pytest file runs it twice.

    python circuit_tracer_side.py --side plugin  OUT   # stock circuit-tracer + plugin
    python circuit_tracer_side.py --side patched OUT   # patched circuit-tracer

Both sides build the same tiny random TransformerLens model (offline: a word-level
tokenizer written to OUT/tokenizer) and load the same transcoder files: TopK per-layer
transcoders and a ReLU cross-layer transcoder. The plugin loads them with
``load_transcoders_dir`` and truncates with its own ``attribute(prefix_len=...)``; the
patched side uses circuit-tracer's own loaders (``topk_k``) and ``attribute``. Each
graph is written to ``OUT/<kind>-P<prefix>.safetensors``.
"""

import argparse
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

WORDS = "the capital of france is paris a an city big small".split()
PROMPT = "the capital of france is"
N_LAYERS, D_MODEL, WIDTH, K = 2, 8, 24, 4
PREFIX_LENS = [None, 1, 3, 8, 16, WIDTH]
HOOKS = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}


def write_tokenizer(root: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # circuit-tracer prepends the first non-zero special id as BOS: keep pad at 0.
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(root)


def tl_config(tokenizer_dir: Path):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=N_LAYERS, d_model=D_MODEL, d_head=4, n_heads=2, d_mlp=16,
        d_vocab=len(WORDS) + 3, n_ctx=16, act_fn="gelu", normalization_type="LN",
        tokenizer_name=str(tokenizer_dir), seed=0,
    )


def write_transcoder_files(out: Path) -> dict[str, Path]:
    """Per-layer TopK transcoders (with skip) and a ReLU CLT, in circuit-tracer's formats."""
    g = torch.Generator().manual_seed(0)

    def u(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g) * 2 - 1) * scale

    plt_dir, clt_dir = out / "per_layer", out / "clt"
    plt_dir.mkdir(parents=True, exist_ok=True)
    clt_dir.mkdir(parents=True, exist_ok=True)
    for layer in range(N_LAYERS):
        save_file(
            {
                "W_enc": u(WIDTH, D_MODEL), "W_dec": u(WIDTH, D_MODEL), "b_enc": u(WIDTH),
                "b_dec": u(D_MODEL), "W_skip": u(D_MODEL, D_MODEL, scale=0.2),
            },
            str(plt_dir / f"layer_{layer}.safetensors"),
        )
    # The plugin's export format for TopK transcoders: its own model kind plus topk_k.
    (plt_dir / "config.yaml").write_text(
        yaml.safe_dump({"model_kind": "matryoshka_topk_transcoder_set", "topk_k": K, "scan": "parity", **HOOKS})
    )
    for i in range(N_LAYERS):
        save_file(
            {f"W_enc_{i}": u(WIDTH, D_MODEL), f"b_enc_{i}": u(WIDTH), f"b_dec_{i}": u(D_MODEL)},
            str(clt_dir / f"W_enc_{i}.safetensors"),
        )
        save_file({f"W_dec_{i}": u(WIDTH, N_LAYERS - i, D_MODEL)}, str(clt_dir / f"W_dec_{i}.safetensors"))
    (clt_dir / "config.yaml").write_text(
        yaml.safe_dump({"model_kind": "cross_layer_transcoder", "scan": "parity", **HOOKS})
    )
    return {"per_layer": plt_dir, "clt": clt_dir}


def load(side: str, kind: str, path: Path):
    if side == "plugin":
        from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir

        transcoders, _ = load_transcoders_dir(path, device="cpu", dtype=torch.float32, lazy_decoder=False)
        return transcoders
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    if kind == "per_layer":
        paths = {i: str(path / f"layer_{i}.safetensors") for i in range(N_LAYERS)}
        return load_transcoder_set(
            paths, scan="parity", device=torch.device("cpu"), dtype=torch.float32,
            lazy_encoder=False, lazy_decoder=False, topk_k=K, **HOOKS,
        )
    return load_clt(
        str(path), scan="parity", device=torch.device("cpu"), dtype=torch.float32,
        lazy_decoder=False, **HOOKS,
    )


def attribute_fn(side: str):
    if side == "plugin":
        from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute
    else:
        from circuit_tracer import attribute
    return attribute


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["plugin", "patched"], required=True)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    from circuit_tracer import ReplacementModel

    write_tokenizer(args.out / "tokenizer")
    attribute = attribute_fn(args.side)
    for kind, path in write_transcoder_files(args.out / "transcoders").items():
        model = ReplacementModel.from_config(
            tl_config(args.out / "tokenizer"), load(args.side, kind, path), backend="transformerlens"
        )
        for p in PREFIX_LENS:
            graph = attribute(PROMPT, model, prefix_len=p, batch_size=64)
            tensors = {
                "adjacency_matrix": graph.adjacency_matrix,
                "active_features": graph.active_features,
                "activation_values": graph.activation_values,
                "selected_features": graph.selected_features,
                "input_tokens": graph.input_tokens,
                "logit_probabilities": graph.logit_probabilities,
            }
            save_file(
                {k: torch.as_tensor(v).contiguous() for k, v in tensors.items()},
                str(args.out / f"{kind}-P{p or 'full'}.safetensors"),
            )


if __name__ == "__main__":
    main()
