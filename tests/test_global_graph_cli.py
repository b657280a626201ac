"""matryoshka-global end to end on a tiny random Llama with sparsify transcoders."""

import json
import random
import shutil
from functools import partial

import pytest
import torch

from matryoshka_plugin.cli.global_graph import main
from matryoshka_plugin.global_graph import (
    build_global_graph,
    corpus_token_batches,
    find_transcoders,
    gather_statistics,
)

from cli_errors import fails_in_one_line
from tiny import NESTED, WIDTH, WORDS, build_sparsify_run, build_tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("global")
    llama = build_tiny_llama(root / "llama")
    run = build_sparsify_run(root / "run")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    return root, llama, run, corpus


def _args(setup, out, *extra):
    root, llama, run, corpus = setup
    return [str(run), "--corpus", str(corpus), "--model", str(llama), "--out", str(out), "--ctx-len", "16", *extra]


def test_cli_writes_edges_per_prefix_matching_a_dense_reference(setup, capsys):
    root, llama, run, corpus = setup
    out = root / "out"
    assert main(_args(setup, out, "--prefix-len", str(NESTED[0]), str(WIDTH), "--top-k", "1000", "--threshold", "-1")) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["layers"] == [0, 1] and meta["nested_sizes"] == [*NESTED, WIDTH]
    for p in (NESTED[0], WIDTH):
        assert (out / f"graph-P{p}.png").stat().st_size > 0
        assert (out / f"graph-P{p}.csv").read_text().startswith("source_layer,source,target_layer,target")
    # Dense reference: run the model, encode densely, compute V / ERA / TWERA as matrices.
    from matryoshka_plugin.offline import load_pretrained, load_tokenizer

    model, tok = load_pretrained(str(llama)), load_tokenizer(str(llama))
    coders = find_transcoders(run)
    batches = corpus_token_batches(tok, corpus, 16, 8)
    n = meta["n_tokens"]
    dense = {0: [], 1: []}
    from matryoshka_plugin.hooks import mlp_modules

    mlps = mlp_modules(model)
    handles = [
        mlps[l][1].register_forward_pre_hook(
            lambda m, a, l=l: dense[l].append(coders[l].encode(a[0][:, 1:].reshape(-1, a[0].shape[-1])))
        )
        for l in (0, 1)
    ]
    with torch.no_grad():
        seen = 0
        for b in batches:
            if seen >= n:
                break
            model(input_ids=b)
            seen += b.shape[0] * (b.shape[1] - 1)
    for h in handles:
        h.remove()
    acts = {}
    for l in (0, 1):
        a = torch.cat([e.top_acts for e in dense[l]])
        i = torch.cat([e.top_indices for e in dense[l]])
        acts[l] = torch.zeros(a.shape[0], WIDTH).scatter(1, i, a.float()).double()
    assert acts[0].shape[0] == n
    gain = model.model.layers[1].post_attention_layernorm.weight.detach().double()
    v = coders[0].W_dec.detach().double() @ (coders[1].encoder.weight.detach().double() * gain).T
    era = v * (acts[0].T @ (acts[1] > 0).double()) / n
    twera = v * (acts[0].T @ acts[1]) / acts[1].sum(0).clamp_min(1e-300)
    for p in (NESTED[0], WIDTH):
        edges = json.loads((out / f"graph-P{p}.json").read_text())["edges"]
        co = (acts[0][:, :p].T > 0).double() @ (acts[1][:, :p] > 0).double()
        assert len(edges) == int((co > 0).sum())
        for e in edges:
            s, t = e["source"], e["target"]
            assert s < p and t < p
            assert e["virtual_weight"] == pytest.approx(float(v[s, t]), rel=1e-4, abs=1e-5)
            assert e["era"] == pytest.approx(float(era[s, t]), rel=1e-4, abs=1e-6)
            assert e["twera"] == pytest.approx(float(twera[s, t]), rel=1e-4, abs=1e-5)


def test_top_k_and_threshold_limit_edges(setup):
    root, llama, run, corpus = setup
    from matryoshka_plugin.offline import load_pretrained, load_tokenizer

    model, tok = load_pretrained(str(llama)), load_tokenizer(str(llama))
    coders = find_transcoders(run)
    stats = gather_statistics(model, coders, corpus_token_batches(tok, corpus, 16, 8), n_tokens=300, show_progress=False)
    full = build_global_graph(coders, stats, None, k=1000, threshold=-1)[0].edges
    top2 = build_global_graph(coders, stats, None, k=2, threshold=-1)[0].edges
    assert torch.bincount(top2.source).max() <= 2
    cut = float(full.twera.abs().median())
    thr = build_global_graph(coders, stats, None, k=1000, threshold=cut)[0].edges
    assert (thr.twera.abs() > cut).all() and thr.source.numel() == int((full.twera.abs() > cut).sum())


_fails = partial(fails_in_one_line, main)


def test_bad_inputs_one_line_errors(setup, capsys, tmp_path):
    root, llama, run, corpus = setup
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    spaces = tmp_path / "spaces.txt"
    spaces.write_text("   \n\n  ")
    base = ["--model", str(llama), "--ctx-len", "16"]
    _fails(capsys, [str(run), "--corpus", str(empty), "--prefix-len", "8", "--out", str(tmp_path / "a"), *base], "tokenizes to 0 tokens")
    _fails(capsys, [str(run), "--corpus", str(spaces), "--prefix-len", "8", "--out", str(tmp_path / "a"), *base], "tokenizes to 0 tokens")
    _fails(capsys, [str(run), "--corpus", str(tmp_path / "nope"), "--prefix-len", "8", "--out", str(tmp_path / "a"), *base], "is not a file")
    for p in ("0", str(WIDTH + 1)):
        _fails(capsys, [str(run), "--corpus", str(corpus), "--prefix-len", p, "--out", str(tmp_path / "a"), *base], f"--prefix-len {p} is out of range; allowed: 1..{WIDTH}")
    _fails(capsys, [str(run), "--corpus", str(corpus), "--prefix-len", "8", "--layers", "0-3", "--out", str(tmp_path / "a"), *base], "no encoder at layers [2, 3]")
    one = tmp_path / "one"
    shutil.copytree(run / "layers.0.mlp", one / "layers.0.mlp")
    _fails(capsys, [str(one), "--corpus", str(corpus), "--prefix-len", "8", "--out", str(tmp_path / "a"), *base], "two or more layers")
    # A checkpoint whose layer-1 directory has no weights: a checkpoint error, one line.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "layers.1.mlp" / "sae.safetensors").unlink()
    _fails(capsys, [str(broken), "--corpus", str(corpus), "--prefix-len", "8", "--out", str(tmp_path / "a"), *base], "sae.safetensors not found")
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    _fails(capsys, [str(run), "--corpus", str(corpus), "--prefix-len", "8", "--out", str(existing), *base], "already exists")
