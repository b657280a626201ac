"""circuit-tracer on a local model, offline.

circuit-tracer's TransformerLens path (``from_pretrained_and_transcoders``) wants an
official TransformerLens model name and goes to the hub. Here the
``HookedTransformerConfig`` is built from the local HF ``config.json`` (TransformerLens
reads local directories), the weights are converted with TransformerLens' own Llama
converter, and the model is made with ``ReplacementModel.from_config``. The tokenizer
is the one in the model directory (``cfg.tokenizer_name`` is that path, which is also
what ``create_graph_files`` loads).

GGUF files (and the name ``smollm2``) go through ``matryoshka_plugin.offline``, which
converts them once into a cached HF folder. ``load_replacement_model`` picks this path
for local models and circuit-tracer's own ``from_pretrained_and_transcoders`` for
hub names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from circuit_tracer import ReplacementModel
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

from ...core.errors import OfflineAssetError, UsageError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def is_local_model(spec: str | None) -> bool:
    """Whether a ``--model`` value names a local directory, a GGUF file or ``smollm2``."""
    from matryoshka_plugin.offline import SMOLLM2

    return bool(spec) and (Path(spec).is_dir() or str(spec).endswith(".gguf") or spec == SMOLLM2)


def _load_hf(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise UsageError(f"{path} has no config.json; a local model is an HF model directory or a .gguf file")
    arch = (AutoConfig.from_pretrained(path).architectures or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UsageError(f"{path}: architecture {arch} is not supported; allowed: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), path


def _gguf_to_hf_dir(spec: str) -> Path:
    from matryoshka_plugin.offline import resolve_model

    try:
        return Path(resolve_model(spec))
    except OfflineAssetError as e:
        raise UsageError(str(e)) from None


def local_tl_config(
    model_dir: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32, max_ctx: int = 2048
) -> HookedTransformerConfig:
    """``HookedTransformerConfig`` of a local HF Llama directory, tokenizer included.

    Built here from ``config.json``: TransformerLens 3.2.1's own converter skips reading
    the config whenever the path contains "llama" (``UnboundLocalError``) and drops
    ``rope_theta``. ``n_ctx`` is capped at ``max_ctx`` because TransformerLens builds an
    ``n_ctx x n_ctx`` mask per layer.
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir).absolute()
    hf = AutoConfig.from_pretrained(model_dir)
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv = hf.num_key_value_heads
    cfg = dict(
        d_model=hf.hidden_size,
        d_head=d_head,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        n_layers=hf.num_hidden_layers,
        n_ctx=min(hf.max_position_embeddings, max_ctx),
        eps=hf.rms_norm_eps,
        d_vocab=hf.vocab_size,
        d_vocab_out=hf.vocab_size,
        act_fn=hf.hidden_act,
        n_key_value_heads=kv if kv != hf.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=float(getattr(hf, "rope_theta", 10000.0)),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_name=str(model_dir),
        model_name=model_dir.name,
        init_weights=False,
        device=device,
        dtype=dtype,
    )
    scaling = getattr(hf, "rope_scaling", None)
    if scaling:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise UsageError(f"{model_dir}: rope_scaling {scaling} is not supported; allowed: none, llama3")
        cfg.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=scaling["factor"],
            NTK_by_parts_low_freq_factor=scaling["low_freq_factor"],
            NTK_by_parts_high_freq_factor=scaling["high_freq_factor"],
            NTK_original_ctx_len=scaling["original_max_position_embeddings"],
        )
    return HookedTransformerConfig(**cfg)


def load_local_replacement_model(
    model_path: Path | str,
    transcoders,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A circuit-tracer ``ReplacementModel`` (TransformerLens backend) from local files."""
    from matryoshka_plugin.offline import SMOLLM2

    spec = str(model_path)
    if spec == SMOLLM2 or spec.endswith(".gguf"):
        # Converted once into a cached HF folder by matryoshka_plugin.offline.
        path = _gguf_to_hf_dir(spec)
    else:
        path = Path(spec).absolute()
    if not path.is_dir():
        raise UsageError(f"model {path} is neither a directory nor a .gguf file")
    hf_model, model_dir = _load_hf(path, dtype)
    cfg = local_tl_config(model_dir, device=device, dtype=dtype)
    check_transcoders_fit(cfg, transcoders)
    check_feature_hooks(cfg, transcoders)
    state_dict = convert_llama_weights(hf_model, cfg)
    model = ReplacementModel.from_config(cfg, transcoders, backend="transformerlens")
    load_tl_weights(model, state_dict)
    check_bos(model)
    return model


def load_replacement_model(
    model_spec: str, transcoders, dtype: torch.dtype = torch.float32, backend: str = "transformerlens"
):
    """A ``ReplacementModel`` for ``--model``: a local model here, a hub name upstream."""
    if is_local_model(model_spec):
        if backend != "transformerlens":
            raise UsageError("local models (--model PATH) run on --backend transformerlens only")
        return load_local_replacement_model(model_spec, transcoders, dtype=dtype)
    model = ReplacementModel.from_pretrained_and_transcoders(model_spec, transcoders, dtype=dtype, backend=backend)
    if backend == "transformerlens":
        check_transcoders_fit(model.cfg, transcoders)
    return model


def check_transcoders_fit(cfg, transcoders) -> None:
    """Raise a one-line error when transcoders and model disagree in depth or width."""
    n_layers = transcoders.n_layers
    d_model = transcoders.d_model if hasattr(transcoders, "d_model") else transcoders[0].d_model
    if (n_layers, d_model) != (cfg.n_layers, cfg.d_model):
        raise UsageError(
            f"transcoders have {n_layers} layers of width d_model={d_model}, the model "
            f"{cfg.n_layers} layers of d_model={cfg.d_model}; they must match"
        )


def check_feature_hooks(cfg, transcoders) -> None:
    """Raise a one-line error when the transcoders' feature hooks are not hook points of a
    block of ``cfg``'s model, as circuit-tracer wraps it (``ReplacementMLP``); circuit-tracer
    itself fails with an ``AttributeError`` deep inside ``from_config``."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import ReplacementMLP
    from transformer_lens.components import TransformerBlock
    from transformer_lens.hook_points import HookPoint

    # One block on the meta device: its module tree without allocating its weights.
    with torch.device("meta"):
        block = TransformerBlock(cfg.__class__(**{**cfg.to_dict(), "device": "meta"}), 0)
        block.mlp = ReplacementMLP(block.mlp)
    allowed = sorted(name for name, m in block.named_modules() if isinstance(m, HookPoint))
    for what in ("feature_input_hook", "feature_output_hook"):
        hook = getattr(transcoders, what)
        if hook not in allowed:
            raise UsageError(f"{what} {hook!r} in the transcoder config is not a hook point of a block; allowed: {', '.join(allowed)}")


def load_tl_weights(model, state_dict: dict) -> None:
    """Load converted TransformerLens weights into a ``from_config`` replacement model.

    ``from_config`` wraps each block's MLP as ``mlp.old_mlp`` and the unembedding as
    ``unembed.old_unembed``; the converter names them ``mlp.*`` and ``unembed.*``.
    """
    remapped = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "mlp":
            key = ".".join([*parts[:3], "old_mlp", *parts[3:]])
        elif parts[0] == "unembed":
            key = ".".join(["unembed", "old_unembed", *parts[1:]])
        remapped[key] = value
    own = model.state_dict()
    unknown = sorted(set(remapped) - set(own))
    if unknown:
        raise UsageError(f"converted weights have keys the model lacks: {unknown[:5]}")
    missing = [k for k in own if k not in remapped and not k.startswith("transcoders.") and not _is_buffer(model, k)]
    if missing:
        raise UsageError(f"converted weights lack {missing[:5]}")
    with torch.no_grad():
        for key, value in remapped.items():
            own[key].copy_(value.to(own[key].dtype))


def _is_buffer(model, key: str) -> bool:
    return key in dict(model.named_buffers(remove_duplicate=False))


def check_bos(model) -> None:
    """circuit-tracer prepends a special token, skipping id 0 (``filter(None, ...)``)."""
    tok = model.tokenizer
    candidates = [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, *tok.all_special_ids]
    if not any(candidates):
        raise UsageError(
            "the tokenizer has no special token with a non-zero id; circuit-tracer needs one to prepend as BOS"
        )
