"""Issue #15 part 2 for cross-layer transcoders: a ``nested_decoders`` CLT decodes a prefix
at a nested size with the decoder trained for it, in its own evaluation, in the export
and in circuit-tracer (``--prefix-len``), and between sizes with the next size's decoder.
"""

from __future__ import annotations

import json

import pytest
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt
from safetensors.torch import load_file, save_file

from matryoshka_plugin.adapters.circuit_tracer.clt_export import export_clt, export_per_layer
from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
from matryoshka_plugin.adapters.circuit_tracer.prefix_transcoders import level_decoder_sizes, set_prefix_len
from matryoshka_plugin.adapters.circuit_tracer.transcoder_dir import level_decoder_path
from matryoshka_plugin.cli.circuit_tracer import main
from matryoshka_plugin.clt import CLTConfig, MatryoshkaCLT
from matryoshka_plugin.core.level_decoders import decoder_level

from cli_errors import fails_in_one_line
from tiny import D_MODEL, K, N_LAYERS, NESTED, PROMPT, WIDTH, build_tiny_llama

try:
    from .test_level_decoders import checked_graph_reconstruction
except ImportError:
    from test_level_decoders import checked_graph_reconstruction

D = 12


def nested_clt(layers, d=D, width=24, k=3, sizes=(4, 10), seed=0, **kw) -> MatryoshkaCLT:
    cfg = CLTConfig(matryoshka=True, num_latents=width, k=k, nested_sizes=list(sizes), nested_decoders=True, **kw)
    torch.manual_seed(seed)
    clt = MatryoshkaCLT(d, layers, cfg)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(std=0.3)
    return clt.eval()


def by_hand(clt: MatryoshkaCLT, x: torch.Tensor, prefix_len: int, W_by_source, b_dec) -> torch.Tensor:
    """Targets ``[N, L, d]``: latents < P of every source, decoded by ``W_by_source`` (their
    first P rows) into each later target, plus ``b_dec``. Independent of the CLT's decode."""
    out = b_dec.expand(x.shape[0], -1, -1).clone()
    for s, code in enumerate(clt.encode(x)):
        dense = torch.zeros(x.shape[0], clt.num_latents).scatter_add_(1, code.top_indices, code.top_acts)
        dense = dense[:, :prefix_len]
        for t in range(clt.n_layers - s):
            out[:, s + t] += dense @ W_by_source[s][:prefix_len, t]
    return out


def test_eval_at_a_nested_size_matches_the_training_level_loss():
    # Each level decoder was trained on the training forward's level FVU: the evaluation
    # at that nested size must report exactly it.
    clt = nested_clt([0, 1, 2])
    x, y = torch.randn(64, 3, D), torch.randn(64, 3, D)
    clt.train()
    trained = clt(x, y, sizes=clt.nested_sizes).level_fvu
    clt.eval()
    got = clt.prefix_fvu(x, y, clt.nested_sizes)
    for i, p in enumerate(clt.nested_sizes):
        assert got[p] == pytest.approx(trained[:, i].tolist(), rel=1e-5)


def test_each_prefix_uses_the_decoder_that_serves_it():
    clt = nested_clt([0, 1, 2])
    x = torch.randn(32, 3, D)
    full = list(clt.W_dec), clt.b_dec
    for p, level in [(4, 4), (6, 10), (10, 10), (12, None), (24, None)]:
        W, b = clt.level_decoder(level) if level else full
        torch.testing.assert_close(clt.reconstruct(x, p), by_hand(clt, x, p, W, b), rtol=1e-5, atol=1e-5)
    # The level decoder is not the truncated full one (else the checks above prove nothing).
    assert not torch.allclose(clt.reconstruct(x, 4), by_hand(clt, x, 4, *full), atol=1e-2)


@pytest.mark.parametrize("lazy", [True, False])
def test_exported_clt_reconstructs_as_its_level_decoders(tmp_path, lazy):
    layers, n_model = [1, 3], 5
    clt = nested_clt(layers)
    out = export_clt(clt, tmp_path / "ct", n_model_layers=n_model)
    assert json.loads((out / "matryoshka.json").read_text())["level_decoders"] == [4, 10]
    assert load_file(str(level_decoder_path(out, 1)))["W_dec_4"].shape == (4, n_model - 1, D)
    ct, _ = load_transcoders_dir(out, dtype=torch.float32, lazy_decoder=lazy)
    assert level_decoder_sizes(ct) == [4, 10]
    x = torch.randn(n_model, 7, D)
    slots = torch.tensor(layers)
    untrained = [i for i in range(n_model) if i not in layers]
    for p in [4, 6, 10, 12, None]:
        set_prefix_len(ct, p)
        got = ct(x)
        want = clt.reconstruct(x[slots].transpose(0, 1), prefix_len=p).transpose(0, 1)
        torch.testing.assert_close(got[slots], want)
        assert not got[untrained].any()
    # Back at the full width: the full bias and (lazily read) full decoder again.
    torch.testing.assert_close(ct.b_dec[slots], clt.b_dec)
    torch.testing.assert_close(ct._get_decoder_vectors(1), load_file(str(out / "W_dec_1.safetensors"))["W_dec_1"])
    assert ct.lazy_decoder is lazy


def test_stock_circuit_tracer_loads_the_full_width_export(tmp_path):
    # BatchTopK: exported as JumpReLU, which stock circuit-tracer runs exactly (it has no TopK).
    clt = nested_clt([0, 1, 2], batch_topk=True)
    clt.train()
    clt(torch.randn(64, 3, D), torch.randn(64, 3, D))  # sets the inference thresholds
    clt.eval()
    out = export_clt(clt, tmp_path / "ct")
    stock = ct_load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    x = torch.randn(3, 9, D)
    torch.testing.assert_close(stock(x), clt.reconstruct(x.transpose(0, 1)).transpose(0, 1), rtol=1e-4, atol=1e-4)


def test_per_layer_export_of_one_layer_clts_keeps_their_level_decoders(tmp_path):
    clts = [nested_clt([layer], seed=layer) for layer in range(3)]
    out = export_per_layer(clts, tmp_path / "ct")
    ct, _ = load_transcoders_dir(out, dtype=torch.float32)
    assert level_decoder_sizes(ct) == [4, 10]
    x = torch.randn(7, D)
    for p in [4, 6, 10, 12]:
        set_prefix_len(ct, p)
        for layer, c in enumerate(clts):
            got = ct[layer].decode(ct[layer].encode(x), x)
            torch.testing.assert_close(got, c.reconstruct(x[:, None], prefix_len=p)[:, 0])


# -- circuit-tracer graphs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clt_run(tmp_path_factory):
    """A tiny nested_decoders CLT (random weights) over the tiny Llama, exported and loaded."""
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model

    root = tmp_path_factory.mktemp("clt-levels")
    clt = nested_clt(list(range(N_LAYERS)), d=D_MODEL, width=WIDTH, k=K, sizes=NESTED)
    tc = export_clt(clt, root / "tc")
    llama = build_tiny_llama(root / "llama")
    transcoders, _ = load_transcoders_dir(tc, lazy_decoder=True)
    return root, clt, llama, load_local_replacement_model(llama, transcoders)


@pytest.mark.parametrize("prefix_len", [NESTED[0], NESTED[0] + 3, NESTED[1], WIDTH])
def test_graph_at_p_is_exact_and_uses_the_decoder_evaluation_uses(clt_run, prefix_len):
    _, clt, _, model = clt_run
    # Every edge (through the level decoder) is what an intervention on the model gives.
    mlp_in, recon = checked_graph_reconstruction(model, prefix_len)
    # circuit-tracer's reconstruction is the CLT's own at P, decoded by the level's own
    # decoder (the next level's between sizes).
    level = decoder_level(prefix_len, NESTED, WIDTH)
    W, b = clt.level_decoder(level) if level < WIDTH else (list(clt.W_dec), clt.b_dec)
    x = mlp_in.transpose(0, 1)
    want = by_hand(clt, x, prefix_len, W, b).transpose(0, 1)
    torch.testing.assert_close(clt.reconstruct(x, prefix_len).transpose(0, 1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    assert model.transcoders.prefix_len is None and model.transcoders.lazy_decoder


def run_cli(argv) -> int:
    """The circuit-tracer CLI's exit code (its ``main`` exits only on an error)."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def test_cli_says_which_decoder_serves_a_prefix_between_sizes(clt_run, tmp_path):
    root, _, llama, _ = clt_run
    graph = tmp_path / "g.pt"
    with pytest.warns(UserWarning, match=r"prefix length 11 is not a nested size.*nested size 16, first 11 rows"):
        assert run_cli(["attribute", "--model", str(llama), "--transcoder_set", str(root / "tc"), "-p", PROMPT,
                     "--prefix-len", "11", "16", "--graph_output_path", str(graph)]) == 0
    rows = json.loads(graph.with_suffix(".scores.json").read_text())
    assert [(r["prefix_len"], r["decoder_prefix_len"]) for r in rows] == [(11, 16), (16, 16)]


def _broken_copy(root, tmp_path, name):
    import shutil

    broken = tmp_path / name
    shutil.copytree(root / "tc", broken)
    return broken


def test_bad_level_decoder_files_give_one_line(clt_run, tmp_path, capsys):
    root, _, llama, _ = clt_run

    def argv(tc):
        return ["attribute", "--model", str(llama), "--transcoder_set", str(tc), "-p", PROMPT,
                "--prefix-len", "8", "--graph_output_path", str(tmp_path / "g.pt")]

    missing = _broken_copy(root, tmp_path, "missing")
    level_decoder_path(missing, 1).unlink()
    fails_in_one_line(run_cli, capsys, argv(missing), "level_decoders/layer_1.safetensors not found")

    shape = _broken_copy(root, tmp_path, "shape")
    tensors = load_file(str(level_decoder_path(shape, 0)))
    tensors["W_dec_8"] = tensors["W_dec_8"][:, :1].contiguous()  # one target slot, not N_LAYERS
    save_file(tensors, str(level_decoder_path(shape, 0)))
    fails_in_one_line(run_cli, capsys, argv(shape), f"W_dec_8 (8, 1, {D_MODEL})")

    lacking = _broken_copy(root, tmp_path, "lacking")
    tensors = load_file(str(level_decoder_path(lacking, 0)))
    del tensors["b_dec_16"]
    save_file(tensors, str(level_decoder_path(lacking, 0)))
    fails_in_one_line(run_cli, capsys, argv(lacking), "lacks tensors ['b_dec_16']")

    sizes = _broken_copy(root, tmp_path, "sizes")
    record = json.loads((sizes / "matryoshka.json").read_text())
    record["level_decoders"] = [8, WIDTH]
    (sizes / "matryoshka.json").write_text(json.dumps(record))
    fails_in_one_line(run_cli, capsys, argv(sizes), f"level decoders [{WIDTH}]; allowed: sizes in 1..{WIDTH - 1}")
    assert list(tmp_path.glob("g*")) == []
