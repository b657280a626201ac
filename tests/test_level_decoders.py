"""Issue #15 part 2: with nested_decoders, a prefix at a nested size is decoded by the
decoder trained for it (evaluation, export, circuit-tracer), and between sizes by the
decoder of the next nested size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, prefix_fvu
from matryoshka_plugin.core.level_decoders import decoder_level, decoder_note
from matryoshka_plugin.evaluation import prefix_curve, reconstruct

D_IN = 12


def nested_coder(seed=0, skip=True, **kwargs) -> MatryoshkaSparseCoder:
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=48, k=6, nested_sizes=[6, 24], nested_decoders=True,
        transcode=True, skip_connection=skip, **kwargs,
    )
    torch.manual_seed(seed)
    coder = MatryoshkaSparseCoder(D_IN, cfg)
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_()
    return coder


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 60), sizes=st.lists(st.integers(1, 47), max_size=4, unique=True))
def test_decoder_level_is_the_smallest_own_decoder_at_or_above_p(p, sizes):
    width = 48
    p = min(p, width)
    level = decoder_level(p, sizes, width)
    assert level >= p and (level == width or level in sizes)
    assert not [s for s in sizes if p <= s < level]
    assert (decoder_note(p, sizes, width) is None) == (not sizes or level == p)


def test_eval_at_a_nested_size_matches_the_training_level_loss():
    # The training forward's level FVU is the loss each level decoder was trained on:
    # evaluation at that nested size must report exactly it.
    coder = nested_coder()
    x, y = torch.randn(64, D_IN), torch.randn(64, D_IN)
    coder.train()
    coder(x, y)
    trained = coder.last_level_fvu.tolist()
    coder.eval()
    got = prefix_fvu(coder, x, y, coder.nested_sizes)
    assert list(got.values()) == pytest.approx(trained, rel=1e-5)
    curve = prefix_curve(coder, x, y, coder.nested_sizes, rsa_samples=0)
    assert [r["fvu"] for r in curve] == pytest.approx(trained, rel=1e-5)


def test_between_sizes_the_next_levels_decoder_is_used():
    coder = nested_coder()
    x = torch.randn(32, D_IN)
    coder.eval()
    # P = 10 lies between 6 and 24: rows of the level-24 decoder, with its bias.
    acts, idx, _ = coder.encode(x)
    keep = (idx < 10).to(acts.dtype) * acts
    W, b = coder.W_dec_levels[1], coder.b_dec + coder.b_dec_levels[1]
    dense = torch.zeros(32, 48).scatter_add_(1, idx, keep)[:, :24]
    expected = dense @ W + b + x @ coder.W_skip.mT
    torch.testing.assert_close(reconstruct(coder, x, 10), expected, rtol=1e-5, atol=1e-5)
    # Past the last inner size it is the full decoder.
    full = coder.decode(acts * (idx < 30), idx) + x @ coder.W_skip.mT
    torch.testing.assert_close(reconstruct(coder, x, 30), full)


# -- export and circuit-tracer -----------------------------------------------------------

from tiny import N_LAYERS, NESTED, PROMPT, WIDTH, K, D_MODEL, build_tiny_llama, check_edges_by_intervention, mlp_io  # noqa: E402


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    """A tiny nested_decoders transcoder run (random weights), exported, loaded lazily."""
    from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
    from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
    from matryoshka_plugin.adapters.circuit_tracer.sparsify_export import export_transcoder_set

    root = tmp_path_factory.mktemp("levels")
    torch.manual_seed(0)
    coders = []
    for layer in range(N_LAYERS):
        cfg = MatryoshkaSparseCoderConfig(
            matryoshka=True, num_latents=WIDTH, k=K, transcode=True, skip_connection=True,
            nested_sizes=NESTED, nested_decoders=True,
        )
        coder = MatryoshkaSparseCoder(D_MODEL, cfg)
        with torch.no_grad():
            for p in coder.parameters():
                p.uniform_(-1, 1)
            coder.W_skip.mul_(0.2)
        coder.save_to_disk(root / "run" / f"layers.{layer}.mlp")
        coders.append(coder.eval())
    export_transcoder_set(root / "run", root / "tc")
    transcoders, _ = load_transcoders_dir(root / "tc", lazy_decoder=True)
    model = load_local_replacement_model(build_tiny_llama(root / "llama"), transcoders)
    return root / "tc", coders, model


def checked_graph_reconstruction(model, prefix_len):
    """``(MLP inputs, circuit-tracer's reconstruction)``, each ``[n_layers, n_pos, d]``, of
    PROMPT's graph at ``prefix_len``, once every edge of the graph has been checked by
    intervention. The reconstruction is the MLP output less the error nodes."""
    from matryoshka_plugin.adapters.circuit_tracer.attribution import attribute
    from matryoshka_plugin.adapters.circuit_tracer.prefix_transcoders import prefix_truncation

    tokens = model.ensure_tokenized(PROMPT)
    mlp_in, mlp_out = mlp_io(model, tokens)
    graph = attribute(tokens, model, prefix_len=prefix_len)
    with prefix_truncation(model, prefix_len):
        ctx = model.setup_attribution(tokens)
        assert check_edges_by_intervention(model, graph) > 0
    return mlp_in, mlp_out - ctx.error_vectors


@pytest.mark.parametrize("prefix_len", [NESTED[0], NESTED[0] + 3, NESTED[1], WIDTH])
def test_graph_at_p_uses_the_decoder_evaluation_uses(nested_run, prefix_len):
    _, coders, model = nested_run
    mlp_in, recon = checked_graph_reconstruction(model, prefix_len)
    # circuit-tracer's reconstruction is the evaluation's reconstruction at P, decoded by
    # the level's own decoder.
    expected = torch.stack([reconstruct(c, mlp_in[l], prefix_len) for l, c in enumerate(coders)])
    torch.testing.assert_close(recon[:, 1:], expected[:, 1:], atol=1e-5, rtol=1e-5)
    # Afterwards the lazy full decoder is back.
    tc = model.transcoders[0]
    assert tc.lazy_decoder and "W_dec" not in tc._parameters
    torch.testing.assert_close(tc._get_decoder_vectors(), coders[0].W_dec.detach())


def test_stock_circuit_tracer_loads_the_full_width_export(nested_run):
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    tc_dir, coders, _ = nested_run
    stock = load_transcoder_set(
        {i: str(tc_dir / f"layer_{i}.safetensors") for i in range(N_LAYERS)}, scan="x",
        feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", device=torch.device("cpu"),
        dtype=torch.float32,
    )
    for t, c in zip(stock, coders):
        torch.testing.assert_close(t.W_dec, c.W_dec.detach())
        torch.testing.assert_close(t.b_dec, c.b_dec.detach())
