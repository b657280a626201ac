"""Tiny random models, tokenizers and runs shared by the tests (no tests here).

- Tokenizers built offline with ``tokenizers``: a byte-level BPE trained on a text
  (``build_tokenizer``) and a word-level one over a fixed vocabulary (``word_tokenizer``).
- Tiny GPT-2 / Llama configs (``tiny_config``), seeded random models
  (``random_model``), saved as a local HF folder with their tokenizer (``save_model``).
- The circuit-tracer setting: a tiny Llama with a word-level vocabulary
  (``build_tiny_llama``), tiny random sparsify transcoders saved as a sparsify run
  directory (``build_sparsify_run``), both with the run exported as a circuit-tracer
  transcoder set (``build_exported_transcoders``), a tiny random circuit-tracer
  ``CrossLayerTranscoder`` (``build_tiny_clt``), and intervention checks of graph edges
  (the idea of circuit-tracer's test-suite ``verify_*`` helpers: perturb one source
  node with everything else frozen and compare the change of every target with the
  graph's edge weights).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

CORPUS = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters. "
) * 40

# The circuit-tracer setting.
D_MODEL = 16
N_LAYERS = 2
WIDTH = 32
K = 4
NESTED = [8, 16]
WORDS = "the capital of france is paris a an city big small red blue green house river".split()
PROMPT = "the capital of france is"


# -- tokenizers -------------------------------------------------------------------------


def build_tokenizer(
    text: str = CORPUS,
    vocab_size: int = 96,
    *,
    bos: str = "<|endoftext|>",
    eos: str = "<|endoftext|>",
    pad: str | None = "<pad>",
):
    """A byte-level BPE tokenizer trained on ``text``, as a transformers tokenizer.

    Special tokens take the first ids in the order pad, bos, eos; with the defaults the
    BOS/EOS id is 1, as circuit-tracer needs a non-zero BOS id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(t for t in (pad, bos, eos) if t)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=512
    )


def word_tokenizer(tokens: list[str], *, bos: str, eos: str, pad: str, unk: str):
    """A whitespace-split word-level tokenizer; ``tokens[i]`` gets id ``i``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)


# -- models -----------------------------------------------------------------------------


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    d_model: int = 16,
    n_layers: int = 2,
    n_heads: int = 2,
    n_kv_heads: int = 1,
    max_positions: int = 128,
    bos_token_id: int = 1,
    eos_token_id: int = 1,
    **extra,
):
    """A tiny ``gpt2`` or ``llama`` config (MLP width ``2 * d_model``)."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **extra)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=d_model, n_layer=n_layers, n_head=n_heads, **ids
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_positions, **ids,
    )


def random_model(config, seed: int = 0, *, lm_head: bool = True):
    """A randomly initialised model (in eval mode) for ``config``; ``lm_head=False``: the bare
    transformer (``AutoModel``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    return (AutoModelForCausalLM if lm_head else AutoModel).from_config(config).eval()


def save_model(path: Path, model, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved together as a local HF folder."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_model(root: Path, arch: str) -> Path:
    """A tiny random ``arch`` model with the default BPE tokenizer, in ``root/tiny-<arch>``."""
    tokenizer = build_tokenizer()
    model = random_model(tiny_config(arch, len(tokenizer)))
    return save_model(root / f"tiny-{arch}", model, tokenizer)


def build_tiny_llama(root: Path, seed: int = 0, *, d_model: int = D_MODEL, n_layers: int = N_LAYERS) -> Path:
    """The circuit-tracer setting's Llama over ``WORDS`` (``D_MODEL`` wide, ``N_LAYERS`` deep
    unless ``d_model`` / ``n_layers`` say otherwise)."""
    # circuit-tracer prepends the first non-zero special id as BOS: keep pad at 0.
    tokenizer = word_tokenizer(["<pad>", "<bos>", "<eos>", *WORDS], bos="<bos>", eos="<eos>", pad="<pad>", unk="<pad>")
    cfg = tiny_config(
        "llama", len(tokenizer), d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_positions=64,
        eos_token_id=2, rope_theta=5000.0, tie_word_embeddings=False,
    )
    model = random_model(cfg, seed)
    # Larger weights than HF's init so that attention and MLPs matter in the checks.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return save_model(root, model, tokenizer)


def build_sparsify_run(
    root: Path, matryoshka: bool = True, d_in: int = D_MODEL, skip: bool = True, seed: int = 0
) -> Path:
    from sparsify import SparseCoder, SparseCoderConfig

    from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig

    torch.manual_seed(seed)
    for layer in range(N_LAYERS):
        if matryoshka:
            cfg = MatryoshkaSparseCoderConfig(
                matryoshka=True, num_latents=WIDTH, k=K, transcode=True, skip_connection=skip, nested_sizes=NESTED
            )
            coder = MatryoshkaSparseCoder(d_in, cfg)
        else:
            cfg = SparseCoderConfig(num_latents=WIDTH, k=K, transcode=True, skip_connection=skip)
            coder = SparseCoder(d_in, cfg)
        with torch.no_grad():
            for p in coder.parameters():
                p.uniform_(-1, 1)
            if coder.W_skip is not None:
                coder.W_skip.mul_(0.2)
        coder.save_to_disk(root / f"layers.{layer}.mlp")
    return root


def build_exported_transcoders(root: Path) -> tuple[Path, Path]:
    """``(llama, tc)`` under ``root``: the tiny Llama, and a ``build_sparsify_run`` (in
    ``root/run``) exported by ``matryoshka-export`` as a circuit-tracer transcoder set."""
    from matryoshka_plugin.cli.export import main as export_main

    llama = build_tiny_llama(root / "llama")
    build_sparsify_run(root / "run")
    export_main([str(root / "run"), str(root / "tc")])
    return llama, root / "tc"


def build_prompt_graphs(root: Path, prefix_lens, supernodes: bool = False) -> tuple[Path, Path, Path]:
    """``(llama, tc, graphs)``: ``build_exported_transcoders`` under ``root``, and PROMPT's
    graphs at ``prefix_lens`` (slug ``france``) in ``root/graphs``.

    Without automatic supernodes by default: their members come pinned in the graph file,
    and the viewer tests count the pins a user makes (or plant their own parents).
    """
    from matryoshka_plugin.cli.circuit_tracer import main

    llama, tc = build_exported_transcoders(root)
    graphs = root / "graphs"
    main(["attribute", "--model", str(llama), "--transcoder_set", str(tc), "-p", PROMPT,
          "--prefix-len", *map(str, prefix_lens), "--slug", "france", "--graph_file_dir", str(graphs),
          *([] if supernodes else ["--no-supernodes"])])
    return llama, tc, graphs


def build_tiny_clt(jumprelu: bool, seed: int = 0):
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(
        N_LAYERS,
        WIDTH,
        D_MODEL,
        activation_function="jump_relu" if jumprelu else "relu",
        lazy_decoder=False,
        feature_input_hook="mlp.hook_in",
        feature_output_hook="mlp.hook_out",
        scan="tiny-clt",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        for name, p in clt.named_parameters():
            if "threshold" in name:
                p.uniform_(0, 1)
            else:
                p.uniform_(-1, 1)
    if jumprelu:
        assert isinstance(clt.activation_function, JumpReLU)
    return clt


# -- checks by intervention ------------------------------------------------------------


def _observe(graph, logits, pre_acts):
    af = graph.active_features
    last = logits.squeeze(0)[-1]
    return pre_acts[af[:, 0], af[:, 1], af[:, 2]], last[graph.logit_token_ids] - last.mean()


def _assert_effects(graph, col, base, new, act_tol, logit_tol):
    n_feat = graph.active_features.shape[0]
    n_logits = len(graph.logit_targets)
    expected = graph.adjacency_matrix[:, col]
    torch.testing.assert_close(new[0] - base[0], expected[:n_feat], **act_tol)
    torch.testing.assert_close(new[1] - base[1], expected[-n_logits:], **logit_tol)


def check_edges_by_intervention(model, graph, n_features: int = 12, seed: int = 0) -> int:
    """Every error and token node, and up to ``n_features`` feature nodes, perturbed with
    all layers frozen: the change of each active feature's pre-activation and of each
    target's demeaned logit must equal the graph's edge weight. Returns nodes checked.
    """
    act_tol = dict(atol=5e-4, rtol=1e-3)
    logit_tol = dict(atol=1e-4, rtol=1e-3)
    tokens = graph.input_tokens
    n_layers = model.cfg.n_layers
    layers = range(n_layers)
    assert len(graph.selected_features) == graph.active_features.shape[0], "graph must keep all features"
    n_feat = graph.active_features.shape[0]
    logits, pre = model.get_activations(tokens, apply_activation_function=False)
    base = _observe(graph, logits, pre)
    checked = 0

    gen = torch.Generator().manual_seed(seed)
    for i in torch.randperm(n_feat, generator=gen)[:n_features].tolist():
        layer, pos, feat = graph.active_features[i].tolist()
        value = 2 * pre[layer, pos, feat]
        new_logits, new_pre = model.feature_intervention(
            tokens, [(layer, pos, feat, value)], constrained_layers=layers, apply_activation_function=False
        )
        _assert_effects(graph, i, base, _observe(graph, new_logits, new_pre), act_tol, logit_tol)
        checked += 1

    ctx = model.setup_attribution(tokens)
    _, freeze_hooks = model.setup_intervention_with_freeze(tokens, constrained_layers=layers)
    n_pos = len(tokens)

    def add_at(acts, hook, pos, vec):
        acts = acts.clone()
        acts[:, pos] += vec
        return acts

    def run(intervention):
        cache, caching_hooks = model._get_activation_caching_hooks(apply_activation_function=False)
        new_logits = model.run_with_hooks(tokens, fwd_hooks=[*freeze_hooks, intervention, *caching_hooks])
        return _observe(graph, new_logits, torch.stack(cache))

    for layer in layers:
        for pos in range(1, n_pos):
            hook = (f"blocks.{layer}.{model.feature_output_hook}", partial(add_at, pos=pos, vec=ctx.error_vectors[layer, pos]))
            _assert_effects(graph, n_feat + layer * n_pos + pos, base, run(hook), act_tol, logit_tol)
            checked += 1
    for pos in range(1, n_pos):
        hook = ("hook_embed", partial(add_at, pos=pos, vec=ctx.token_vectors[pos]))
        _assert_effects(graph, n_feat + n_layers * n_pos + pos, base, run(hook), act_tol, logit_tol)
        checked += 1
    return checked


def mlp_io(model, tokens):
    """(MLP inputs, MLP outputs), each ``[n_layers, n_pos, d_model]``, from a plain run."""
    names = {f"blocks.{l}.mlp.hook_in" for l in range(model.cfg.n_layers)}
    names |= {f"blocks.{l}.mlp.hook_out" for l in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    ins = torch.stack([cache[f"blocks.{l}.mlp.hook_in"][0] for l in range(model.cfg.n_layers)])
    outs = torch.stack([cache[f"blocks.{l}.mlp.hook_out"][0] for l in range(model.cfg.n_layers)])
    return ins, outs
