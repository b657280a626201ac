"""Global graphs of cross-layer transcoders: effective decoders, the CLT path of
``matryoshka-global`` against dense references, and its agreement with the per-layer path."""

import json
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin.clt import CLTConfig, MatryoshkaCLT, save_clt
from matryoshka_plugin.core.edge_scores import (
    CoactivationStats,
    clt_effective_decoders,
    dense_era_reference,
    pair_virtual_weights,
)
from matryoshka_plugin.cli.global_graph import main
from matryoshka_plugin.core.errors import GlobalGraphError
from matryoshka_plugin.global_graph import build_clt_global_graph

from cli_errors import fails_in_one_line
from tiny import CORPUS, build_tokenizer, tiny_config

N_MODEL_LAYERS = 3
D = 16
WIDTH = 24
K = 4
NESTED = [6, 12]


def _random_clt(d, layers, width, k=2, nested=None, seed=0, dtype=torch.float64):
    cfg = (
        CLTConfig(matryoshka=True, num_latents=width, k=k, nested_sizes=nested)
        if nested
        # An explicit one-level list: the default group fractions leave empty groups at tiny widths.
        else CLTConfig(matryoshka=False, num_latents=width, k=k, nested_sizes=[width])
    )
    clt = MatryoshkaCLT(d, layers, cfg, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return clt.eval()


def _naive_decoder(clt, source_layer, target_layer):
    """Everything the source layer's features write into MLP outputs of layers < target_layer."""
    s = clt.layers.index(source_layer)
    total = torch.zeros(clt.num_latents, clt.d_model, dtype=torch.float64)
    for t in range(clt.n_layers - s):
        if source_layer <= clt.layers[s + t] < target_layer:
            total = total + clt.W_dec[s][:, t].detach().double()
    return total


def _naive_virtual_weights(clt, source_layer, target_layer, gain=None):
    enc = clt.W_enc[clt.layers.index(target_layer)].detach().double()
    if gain is not None:
        enc = enc * gain.double()
    return _naive_decoder(clt, source_layer, target_layer) @ enc.T


layer_lists = st.lists(st.integers(0, 9), min_size=2, max_size=5, unique=True).map(sorted)


@settings(max_examples=30, deadline=None)
@given(layers=layer_lists, width=st.integers(1, 10), d=st.integers(1, 6), p=st.integers(1, 10), data=st.data())
def test_effective_decoder_virtual_weights_equal_dense_reference(layers, width, d, p, data):
    p = min(p, width)
    clt = _random_clt(d, layers, width, k=1, seed=data.draw(st.integers(0, 2**16)))
    s = data.draw(st.integers(0, len(layers) - 2))
    later = layers[s + 1 :]
    targets = data.draw(st.lists(st.sampled_from(later), min_size=1, unique=True))
    yielded = list(clt_effective_decoders(clt.W_dec[s].detach()[:p], clt.layers, s, targets))
    assert [m for m, _ in yielded] == sorted(targets)
    src, tgt = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    src, tgt = src.flatten(), tgt.flatten()
    for m, eff in yielded:
        vw = pair_virtual_weights(eff, clt.W_enc[clt.layers.index(m)].detach(), src, tgt)
        dense = _naive_virtual_weights(clt, layers[s], m)[:p, :p]
        torch.testing.assert_close(vw.reshape(p, p), dense)


def test_effective_decoders_reject_bad_input():
    clt = _random_clt(3, [0, 2, 5], 4)
    with pytest.raises(GlobalGraphError, match=r"target layers \[2\] do not come after source layer 2"):
        list(clt_effective_decoders(clt.W_dec[1].detach(), clt.layers, 1, [2, 5]))
    with pytest.raises(GlobalGraphError, match="expected \\[width, 3 target slots"):
        list(clt_effective_decoders(clt.W_dec[1].detach(), clt.layers, 0, [5]))
    with pytest.raises(GlobalGraphError, match="source slot 3 is out of range"):
        list(clt_effective_decoders(clt.W_dec[0].detach(), clt.layers, 3, [5]))


def _topk_dense(x, k):
    acts, idx = x.relu().topk(k, dim=1)
    return torch.zeros_like(x).scatter(1, idx, acts)


@settings(max_examples=20, deadline=None)
@given(
    layers=layer_lists,
    n=st.integers(1, 30),
    width=st.integers(2, 10),
    d=st.integers(1, 5),
    p=st.integers(1, 10),
    seed=st.integers(0, 2**16),
    with_gain=st.booleans(),
    drop=st.booleans(),
)
def test_clt_era_twera_equal_dense_reference(layers, n, width, d, p, seed, with_gain, drop):
    """The whole CLT edge path (stats over a subset of layers, prefix, gain fold) vs dense matrices."""
    p, k = min(p, width), min(2, width)
    clt = _random_clt(d, layers, width, k=k, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    # Leaving out a middle CLT layer keeps its decoder slot in the sum but drops its features.
    chosen = [l for i, l in enumerate(layers) if not (drop and 0 < i < len(layers) - 1 and i % 2)]
    dense = {l: _topk_dense(torch.randn(n, width, generator=g, dtype=torch.float64), k) for l in chosen}
    gains = {l: torch.rand(d, generator=g) + 0.5 for l in chosen} if with_gain else None
    stats = CoactivationStats({l: width for l in chosen})
    stats.update({l: dense[l].topk(k, dim=1) for l in chosen})
    graph = build_clt_global_graph(clt, stats, p, k=None, threshold=-1.0, gains=gains)
    assert [(le.source_layer, le.target_layer) for le in graph] == stats.layer_pairs()
    for le in graph:
        a, b = le.source_layer, le.target_layer
        v = _naive_virtual_weights(clt, a, b, gains[b] if gains else None)
        dec = _naive_decoder(clt, a, b)
        enc = clt.W_enc[clt.layers.index(b)].detach().double() * (gains[b].double() if gains else 1)
        v_ref, era, twera = dense_era_reference(dense, a, b, dec, enc)
        torch.testing.assert_close(v_ref, v)
        co = (dense[a][:, :p].T > 0).double() @ (dense[b][:, :p] > 0).double()
        e = le.edges
        assert e.source.numel() == int((co > 0).sum())
        assert (e.source < p).all() and (e.target < p).all()
        torch.testing.assert_close(e.virtual_weight, v[e.source, e.target], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e.era, era[e.source, e.target], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(e.twera, twera[e.source, e.target], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e.coactive_count, co[e.source, e.target].long())


# -- matryoshka-global on a tiny random Llama -------------------------------------------------


def _tiny_llama(root):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    cfg = tiny_config("llama", len(tokenizer))
    cfg.num_hidden_layers = N_MODEL_LAYERS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        # Non-unit norm gains, so that the gain fold is visible in the virtual weights.
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    path = root / "llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("global-clt")
    llama = _tiny_llama(root)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    clt = _random_clt(D, [0, 1, 2], WIDTH, k=K, nested=NESTED, seed=1, dtype=torch.float32)
    # A CLT run directory as `matryoshka-clt train` leaves it: the CLT under save_dir/clt.
    save_clt(clt, root / "run" / "clt")
    return root, llama, corpus, clt


def _args(setup, checkpoint, out, *extra):
    root, llama, corpus, _ = setup
    return [str(checkpoint), "--corpus", str(corpus), "--model", str(llama), "--out", str(out), "--ctx-len", "16", *extra]


def _dense_codes(llama, corpus, clt, n_tokens):
    """Dense CLT activations per layer of the first ``n_tokens`` statistics tokens (BOS dropped)."""
    from matryoshka_plugin.hooks import mlp_modules
    from matryoshka_plugin.global_graph import corpus_token_batches
    from matryoshka_plugin.offline import load_pretrained, load_tokenizer

    model, tok = load_pretrained(str(llama)), load_tokenizer(str(llama))
    mlps = mlp_modules(model)
    got = {l: [] for l in clt.layers}
    handles = [
        mlps[l][1].register_forward_pre_hook(
            lambda m, a, l=l: got[l].append(a[0][:, 1:].reshape(-1, D))
        )
        for l in clt.layers
    ]
    with torch.no_grad():
        for b in corpus_token_batches(tok, corpus, 16, 8):
            if sum(x.shape[0] for x in got[0]) >= n_tokens:
                break
            model(input_ids=b)
    for h in handles:
        h.remove()
    dense = {}
    for s, l in enumerate(clt.layers):
        out = clt.encode_layer(torch.cat(got[l])[:n_tokens], s)
        dense[l] = torch.zeros(n_tokens, WIDTH).scatter(1, out.top_indices, out.top_acts.detach()).double()
    gains = {l: model.model.layers[l].post_attention_layernorm.weight.detach().double() for l in clt.layers}
    return dense, gains


def test_cli_on_clt_writes_edges_matching_a_dense_reference(setup):
    """--layers 0,2 skips layer 1's features, yet layer 0's slot-1 decoder still feeds layer 2."""
    root, llama, corpus, clt = setup
    out = root / "out"
    assert main(_args(setup, root / "run", out, "--layers", "0,2", "--prefix-len", str(NESTED[0]), str(WIDTH), "--top-k", "1000", "--threshold", "-1")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "clt" and meta["layers"] == [0, 2] and meta["nested_sizes"] == [*NESTED, WIDTH]
    n = meta["n_tokens"]
    dense, gains = _dense_codes(llama, corpus, clt, n)
    dec = _naive_decoder(clt, 0, 2)
    assert not torch.allclose(dec, clt.W_dec[0][:, 0].detach().double())
    v, era, twera = dense_era_reference(dense, 0, 2, dec, clt.W_enc[2].detach().double() * gains[2])
    for p in (NESTED[0], WIDTH):
        assert (out / f"graph-P{p}.png").stat().st_size > 0
        assert (out / f"graph-P{p}.csv").read_text().startswith("source_layer,source,target_layer,target")
        edges = json.loads((out / f"graph-P{p}.json").read_text())["edges"]
        co = (dense[0][:, :p].T > 0).double() @ (dense[2][:, :p] > 0).double()
        assert len(edges) == int((co > 0).sum()) > 0
        for e in edges:
            s, t = e["source"], e["target"]
            assert (e["source_layer"], e["target_layer"]) == (0, 2) and s < p and t < p
            assert e["virtual_weight"] == pytest.approx(float(v[s, t]), rel=1e-4, abs=1e-5)
            assert e["era"] == pytest.approx(float(era[s, t]), rel=1e-4, abs=1e-6)
            assert e["twera"] == pytest.approx(float(twera[s, t]), rel=1e-4, abs=1e-5)
            assert e["coactive_count"] == int(co[s, t])


def test_single_layer_decoder_clt_equals_per_layer_transcoders(setup):
    """A CLT that decodes only into its own layer is a set of per-layer transcoders: same edges."""
    from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig

    root, llama, corpus, clt = setup
    local = _random_clt(D, [0, 1, 2], WIDTH, k=K, nested=NESTED, seed=2, dtype=torch.float32)
    run = root / "per-layer"
    with torch.no_grad():
        for s, layer in enumerate(local.layers):
            local.W_dec[s][:, 1:] = 0
            cfg = MatryoshkaSparseCoderConfig(
                matryoshka=True, num_latents=WIDTH, k=K, transcode=True, nested_sizes=NESTED
            )
            coder = MatryoshkaSparseCoder(D, cfg)
            coder.encoder.weight.copy_(local.W_enc[s])
            coder.encoder.bias.copy_(local.b_enc[s])
            coder.W_dec.copy_(local.W_dec[s][:, 0])
            coder.b_dec.copy_(local.b_dec[s])
            coder.save_to_disk(run / f"layers.{layer}.mlp")
    save_clt(local, root / "local-clt")
    outs = {}
    for name, ckpt in (("clt", root / "local-clt"), ("tc", run)):
        outs[name] = root / f"out-{name}"
        assert main(_args(setup, ckpt, outs[name], "--prefix-len", str(NESTED[1]), "--top-k", "5")) == 0
    metas = {k: json.loads((v / "meta.json").read_text()) for k, v in outs.items()}
    assert metas["clt"]["kind"] == "clt" and metas["tc"]["kind"] == "transcoders"
    assert metas["clt"]["n_coactive_pairs"] == metas["tc"]["n_coactive_pairs"] > 0
    edges = {k: json.loads((v / f"graph-P{NESTED[1]}.json").read_text())["edges"] for k, v in outs.items()}
    assert len(edges["clt"]) == len(edges["tc"]) > 0
    assert {(e["source_layer"], e["target_layer"]) for e in edges["clt"]} == {(0, 1), (0, 2), (1, 2)}
    for a, b in zip(edges["clt"], edges["tc"]):
        assert {k: a[k] for k in ("source_layer", "source", "target_layer", "target", "coactive_count")} == {
            k: b[k] for k in ("source_layer", "source", "target_layer", "target", "coactive_count")
        }
        for key in ("virtual_weight", "era", "twera"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)


_fails = partial(fails_in_one_line, main)


def test_clt_bad_prefix_and_layers_one_line_errors(setup, capsys, tmp_path):
    root, llama, corpus, clt = setup
    ckpt = root / "run" / "clt"
    out = tmp_path / "a"
    for p in ("0", str(WIDTH + 1)):
        _fails(capsys, _args(setup, ckpt, out, "--prefix-len", p), f"--prefix-len {p} is out of range; allowed: 1..{WIDTH}")
    _fails(capsys, _args(setup, ckpt, out, "--prefix-len", "4", "--layers", "1-4"), "--layers [3, 4] are not in the CLT")
    _fails(capsys, _args(setup, ckpt, out, "--prefix-len", "4", "--layers", "1-4"), "allowed: [0, 1, 2]")
    _fails(capsys, _args(setup, ckpt, out, "--prefix-len", "4", "--layers", "2"), "two or more layers")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt / "config.json").read_text())
    _fails(capsys, _args(setup, broken, out, "--prefix-len", "4"), "clt.safetensors not found")
    assert not out.exists()
