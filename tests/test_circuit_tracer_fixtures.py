"""Builders shared by the circuit-tracer tests (no tests here).

A tiny random Llama saved as an HF directory with a word-level tokenizer built with
``tokenizers``; tiny random sparsify transcoders saved as a sparsify run directory; a
tiny random circuit-tracer ``CrossLayerTranscoder``; and intervention checks of graph
edges (the idea of circuit-tracer's test-suite ``verify_*`` helpers: perturb one source
node with everything else frozen and compare the change of every target with the
graph's edge weights).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from circuit_tracer.transcoder.activation_functions import JumpReLU

D_MODEL = 16
N_LAYERS = 2
WIDTH = 32
K = 4
NESTED = [8, 16]
WORDS = "the capital of france is paris a an city big small red blue green house river".split()
PROMPT = "the capital of france is"


def build_tiny_llama(root: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    # circuit-tracer prepends the first non-zero special id as BOS: keep pad at 0.
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(root)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=D_MODEL,
        intermediate_size=2 * D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5000.0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    # Larger weights than HF's init so that attention and MLPs matter in the checks.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(root)
    return root


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


def build_tiny_clt(jumprelu: bool, seed: int = 0) -> CrossLayerTranscoder:
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
