"""Evaluation metrics and the matryoshka-eval CLI, on real sparsify coders."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig
from matryoshka_plugin.cli.eval import main
from matryoshka_plugin.core import truncate_dense
from matryoshka_plugin.evaluation import (
    default_prefix_lens,
    dictionary_power_law,
    evaluate,
    latent_stats,
    permute_latents,
    power_law_fit,
    prefix_curve,
    reconstruct,
    reorder_by_mean_squared_activation,
    rsa,
    spliced_lm_metrics,
)
from matryoshka_plugin.fit import fit_activations
from matryoshka_plugin.toy import dense_codes

from tiny import random_model, tiny_config

coder_shapes = st.tuples(
    st.integers(4, 12),  # d_in
    st.integers(8, 48),  # num_latents
    st.integers(1, 8),  # k
    st.integers(0, 10_000),  # seed
)


def random_coder(d, width, k, seed, *, transcode=False, skip=False, matryoshka=False):
    torch.manual_seed(seed)
    k = min(k, width)
    if matryoshka:
        cfg = MatryoshkaSparseCoderConfig(
            num_latents=width, k=k, matryoshka=True, nested_sizes=[width // 4, width // 2],
            transcode=transcode, skip_connection=skip,
        )
        coder = MatryoshkaSparseCoder(d, cfg)
    else:
        cfg = SparseCoderConfig(num_latents=width, k=k, transcode=transcode, skip_connection=skip)
        coder = SparseCoder(d, cfg)
    with torch.no_grad():
        # Non-zero biases and skip, so that a metric which forgets one of them fails.
        coder.b_dec.normal_(0, 0.1)
        coder.encoder.bias.normal_(0, 0.1)
        if transcode:  # sparsify starts a transcoder's decoder at zero
            coder.W_dec.normal_(0, 0.3)
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.1)
    return coder.eval()


def identity_coder(d: int) -> SparseCoder:
    """Latents relu(x_i) and relu(-x_i), decoded back with +-1: a perfect reconstruction."""
    coder = SparseCoder(d, SparseCoderConfig(num_latents=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.cat([eye, -eye]))
        coder.encoder.bias.zero_()
        coder.W_dec.copy_(torch.cat([eye, -eye]))
        coder.b_dec.zero_()
    return coder.eval()


@settings(max_examples=30, deadline=None)
@given(shape=coder_shapes, transcode=st.booleans(), matryoshka=st.booleans())
def test_fvu_at_full_prefix_is_the_coders_own_fvu(shape, transcode, matryoshka):
    d, width, k, seed = shape
    coder = random_coder(d, width, k, seed, transcode=transcode, skip=transcode,
                         matryoshka=matryoshka)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, d, generator=g)
    y = torch.randn(64, d, generator=g) if transcode else None
    curve = prefix_curve(coder, x, y, [width], rsa_samples=0, chunk_size=23)
    with torch.no_grad():
        own = float(coder(x, y).fvu)
    assert curve[-1]["fvu"] == pytest.approx(own, rel=1e-4, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(shape=coder_shapes, data=st.data())
def test_prefix_fvu_matches_a_dense_truncation(shape, data):
    """Independent route: dense codes, zero latents >= P, multiply by W_dec."""
    d, width, k, seed = shape
    coder = random_coder(d, width, k, seed)
    P = data.draw(st.integers(1, width))
    x = torch.randn(50, d, generator=torch.Generator().manual_seed(seed))
    dense = truncate_dense(dense_codes(coder, x), P)
    recon = dense @ coder.W_dec.detach() + coder.b_dec.detach()
    expected_sse = (x - recon).pow(2).sum()
    expected = float(expected_sse / (x - x.mean(0)).pow(2).sum())
    row = prefix_curve(coder, x, None, [P], rsa_samples=0)[0]
    assert row["fvu"] == pytest.approx(expected, rel=1e-4)
    assert row["mse"] == pytest.approx(float(expected_sse) / x.numel(), rel=1e-4)
    assert row["l0"] == pytest.approx(float((dense > 0).sum(1).float().mean()))


@settings(max_examples=20, deadline=None)
@given(d=st.integers(2, 10), seed=st.integers(0, 1000))
def test_perfect_reconstruction_has_fvu_0_and_rsa_1(d, seed):
    coder = identity_coder(d)
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(seed))
    full = prefix_curve(coder, x, None, [2 * d], rsa_samples=40)[0]
    assert full["fvu"] == pytest.approx(0, abs=1e-10)
    assert full["rsa"] == pytest.approx(1, abs=1e-9)
    # Switching latents off loses information: FVU rises above 0 at a short prefix.
    short = prefix_curve(coder, x, None, [1], rsa_samples=40)[0]
    assert short["fvu"] > 0.1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 40), d=st.integers(1, 6), scale=st.floats(0.1, 10),
       shift=st.floats(-5, 5), seed=st.integers(0, 1000))
def test_rsa_invariants(n, d, scale, shift, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    # Distances scale and ignore translation, and Pearson ignores scale: RSA stays 1.
    assert rsa(a, scale * a + shift) == pytest.approx(1, abs=1e-9)
    assert rsa(a, b) == pytest.approx(rsa(b, a), abs=1e-12)
    assert -1 - 1e-9 <= rsa(a, b) <= 1 + 1e-9


def test_rsa_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        rsa(torch.zeros(5, 2), torch.zeros(4, 2))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 200), exponent=st.floats(-3, -0.1), scale=st.floats(0.01, 100),
       seed=st.integers(0, 1000))
def test_power_law_fit_recovers_an_exact_power_law(n, exponent, scale, seed):
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    values = scale * rank**exponent
    shuffled = values[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    fit = power_law_fit(shuffled)
    assert fit["exponent"] == pytest.approx(exponent, abs=1e-6)
    assert fit["intercept"] == pytest.approx(torch.log10(torch.tensor(scale)).item(), abs=1e-6)
    assert fit["r2"] == pytest.approx(1, abs=1e-9)
    assert fit["n"] == n


def test_dictionary_power_law_on_a_coder():
    coder = random_coder(8, 32, 4, 0)
    x = torch.randn(500, 8)
    fits = dictionary_power_law(coder, x)
    for key in ("mean_squared_activation", "frequency", "decoder_covariance_eigenvalues"):
        assert fits[key]["exponent"] < 0  # values are sorted descending
        assert fits[key]["n"] >= 2
    # 32 decoder rows in 8 dimensions: the covariance has rank 8.
    assert fits["decoder_covariance_eigenvalues"]["n"] == 8
    narrow = random_coder(8, 5, 2, 0)  # 5 rows: rank 4, round-off eigenvalues dropped
    assert dictionary_power_law(narrow, x)["decoder_covariance_eigenvalues"]["n"] == 4


@settings(max_examples=30, deadline=None)
@given(shape=coder_shapes, matryoshka=st.booleans())
def test_latent_stats_add_up(shape, matryoshka):
    d, width, k, seed = shape
    coder = random_coder(d, width, k, seed, matryoshka=matryoshka)
    x = torch.randn(80, d, generator=torch.Generator().manual_seed(seed))
    stats = latent_stats(coder, x, dense_threshold=0.3, chunk_size=17)
    freq = torch.tensor(stats["frequency"], dtype=torch.float64)
    dense = dense_codes(coder, x)
    torch.testing.assert_close(freq, (dense > 0).double().mean(0))
    assert stats["l0"] == pytest.approx(float(freq.sum()))
    assert stats["l0"] <= coder.cfg.k
    assert stats["dead"] == int((freq == 0).sum())
    assert stats["dense"] == int((freq > 0.3).sum())
    levels = stats["levels"]
    assert levels[0]["start"] == 0 and levels[-1]["end"] == width
    assert sum(lv["dead"] for lv in levels) == stats["dead"]
    per_level_l0 = sum(lv["mean_frequency"] * (lv["end"] - lv["start"]) for lv in levels)
    assert per_level_l0 == pytest.approx(stats["l0"], rel=1e-6, abs=1e-9)
    if stats["l0"] > 0:
        assert sum(lv["l0_share"] for lv in levels) == pytest.approx(1)


@settings(max_examples=30, deadline=None)
@given(shape=coder_shapes, skip=st.booleans(), data=st.data())
def test_permuting_latents_leaves_outputs_unchanged(shape, skip, data):
    d, width, k, seed = shape
    coder = random_coder(d, width, k, seed, transcode=skip, skip=skip)
    perm = torch.tensor(data.draw(st.permutations(range(width))))
    permuted = permute_latents(coder, perm)
    x = torch.randn(30, d, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(reconstruct(permuted, x), reconstruct(coder, x))
    # New latent i is old latent perm[i].
    torch.testing.assert_close(dense_codes(permuted, x), dense_codes(coder, x)[:, perm])
    # The original is untouched.
    assert not torch.equal(perm, torch.arange(width)) or torch.equal(
        permuted.encoder.weight, coder.encoder.weight
    )


@settings(max_examples=30, deadline=None)
@given(shape=coder_shapes)
def test_reorder_sorts_by_mean_squared_activation(shape):
    d, width, k, seed = shape
    coder = random_coder(d, width, k, seed)
    x = torch.randn(100, d, generator=torch.Generator().manual_seed(seed))
    reordered, perm = reorder_by_mean_squared_activation(coder, x, chunk_size=33)
    torch.testing.assert_close(reconstruct(reordered, x), reconstruct(coder, x))
    msq = dense_codes(reordered, x).pow(2).mean(0)
    assert (msq[:-1] >= msq[1:] - 1e-6).all()
    assert sorted(perm.tolist()) == list(range(width))


def test_permute_rejects_a_non_permutation_and_nested_decoders():
    coder = random_coder(4, 8, 2, 0)
    with pytest.raises(ValueError, match="permutation"):
        permute_latents(coder, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    cfg = MatryoshkaSparseCoderConfig(num_latents=16, k=2, matryoshka=True,
                                      nested_sizes=[4, 8], nested_decoders=True)
    with pytest.raises(ValueError, match="nested_decoders"):
        permute_latents(MatryoshkaSparseCoder(4, cfg), torch.arange(16))


def test_default_prefix_lens():
    assert default_prefix_lens(random_coder(4, 48, 2, 0)) == [1, 2, 4, 8, 16, 32, 48]
    assert default_prefix_lens(random_coder(4, 48, 2, 0, matryoshka=True)) == [12, 24, 48]


@pytest.mark.parametrize("bad", [0, 49, 2.5])
def test_bad_prefix_length_is_rejected(bad):
    with pytest.raises(ValueError, match="prefix length"):
        prefix_curve(random_coder(4, 48, 2, 0), torch.randn(10, 4), None, [bad])


# -- the coder spliced into a language model ---------------------------------------
def tiny_gpt2():
    return random_model(tiny_config("gpt2", 64, max_positions=32))


def tiny_llama():
    return random_model(tiny_config("llama", 64, max_positions=32))


def token_batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(64, (3, 12), generator=g) for _ in range(n)]


def test_spliced_perfect_coder_recovers_all_loss():
    model = tiny_gpt2()
    with torch.no_grad():
        before = model(token_batches()[0]).logits
    result = spliced_lm_metrics(model, identity_coder(16), "h.0.mlp", token_batches(), [32])
    row = result["prefix"][0]
    assert row["kl"] == pytest.approx(0, abs=1e-6)
    assert row["ce"] == pytest.approx(result["ce_clean"], rel=1e-5)
    assert row["loss_recovered"] == pytest.approx(1, abs=1e-4)
    assert result["ce_zero_ablated"] != pytest.approx(result["ce_clean"])
    with torch.no_grad():  # the hooks are gone afterwards
        torch.testing.assert_close(model(token_batches()[0]).logits, before)


def test_spliced_transcoder_in_llama_reaches_the_model():
    model = tiny_llama()
    coder = random_coder(16, 32, 4, 0, transcode=True)
    result = spliced_lm_metrics(model, coder, "layers.1.mlp", token_batches(), [1, 32])
    short, full = result["prefix"]
    assert result["n_tokens"] == 2 * 3 * 11
    assert short["kl"] >= 0 and full["kl"] > 0
    assert short["ce"] != full["ce"]  # truncation changes what the model sees
    assert all(torch.isfinite(torch.tensor([r["loss_recovered"] for r in result["prefix"]])))


def test_first_position_keeps_the_models_own_output_there():
    from matryoshka_plugin.evaluation import spliced

    model = tiny_llama()
    coder = random_coder(16, 32, 4, 0, transcode=True)
    ids = token_batches()[0]
    with torch.no_grad():
        clean = model(ids).logits
        for ablate in (False, True):
            with spliced(model, coder, "layers.1.mlp", ablate=ablate, first_position=1):
                got = model(ids).logits
            # Causal attention: position 0's logits see only position 0, left unspliced.
            torch.testing.assert_close(got[:, 0], clean[:, 0])
            assert not torch.allclose(got[:, 1:], clean[:, 1:])
    # Splicing from past the sequence changes nothing: every number equals the clean run.
    result = spliced_lm_metrics(model, coder, "layers.1.mlp", token_batches(), [32], first_position=12)
    assert result["prefix"][0]["kl"] == pytest.approx(0, abs=1e-6)
    assert result["ce_zero_ablated"] == pytest.approx(result["ce_clean"], rel=1e-6)


def test_unknown_hookpoint_is_one_line():
    with pytest.raises(ValueError, match="not a submodule"):
        spliced_lm_metrics(tiny_gpt2(), identity_coder(16), "h.9.mlp", token_batches(), [32])


# -- end to end: a trained checkpoint and the CLI -----------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    x = torch.randn(2048, 8) @ torch.randn(8, 8)
    cfg = MatryoshkaSparseCoderConfig(num_latents=32, k=4, matryoshka=True)
    coder = fit_activations(x, cfg, batch_size=256, seq_len=64, save_dir=root / "run",
                            optimizer="adam", lr=3e-3, lr_warmup_steps=2)
    data = root / "heldout.safetensors"
    save_file({"inputs": torch.randn(300, 8) @ torch.randn(8, 8)}, str(data))
    return root, coder, data


def test_evaluate_on_a_trained_matryoshka_checkpoint(checkpoint):
    _, coder, data = checkpoint
    x = torch.randn(300, 8)
    result = evaluate(coder, x, rsa_samples=100)
    assert [r["prefix_len"] for r in result["prefix"]] == coder.nested_sizes
    assert [lv["end"] for lv in result["latents"]["levels"]] == coder.nested_sizes
    assert result["coder"]["matryoshka"] is True
    json.dumps(result)  # JSON-ready


def test_cli_writes_json_and_png(checkpoint, tmp_path):
    root, coder, data = checkpoint
    out = tmp_path / "eval.json"
    rc = main([str(root / "run" / "fit"), "--data", str(data), "--out", str(out),
               "--prefix-lens", "4,32", "--rsa-samples", "50"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["prefix_len"] for r in result["prefix"]] == [4, 32]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_with_language_model(tmp_path):
    model_dir = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(model_dir)
    coder_dir = tmp_path / "h.0.mlp"
    identity_coder(16).save_to_disk(coder_dir)
    data = tmp_path / "acts.safetensors"
    save_file({"inputs": torch.randn(50, 16)}, str(data))
    tokens = tmp_path / "tokens.safetensors"
    save_file({"input_ids": torch.cat(token_batches())}, str(tokens))
    out = tmp_path / "eval.json"
    rc = main([str(coder_dir), "--data", str(data), "--model", str(model_dir),
               "--tokens", str(tokens), "--prefix-lens", "32", "--out", str(out)])
    assert rc == 0
    lm = json.loads(out.read_text())["lm"]
    assert lm["hookpoint"] == "h.0.mlp"
    assert lm["prefix"][0]["loss_recovered"] == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prefix-lens", "0"], "prefix length 0"),
        (["--prefix-lens", "4,x"], "comma-separated"),
        (["--data", "/nonexistent.safetensors"], "cannot read --data"),
        (["--hookpoint", "nope"], "--hookpoint 'nope'"),
        (["--model", "/tmp"], "--model and --tokens go together"),
        (["--splice-from-position", "-1"], "--splice-from-position -1"),
    ],
)
def test_cli_bad_input_is_one_line_without_output(checkpoint, tmp_path, capsys, extra, message):
    root, _, data = checkpoint
    out = tmp_path / "eval.json"
    rc = main([str(root / "run" / "fit"), "--data", str(data), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_cli_process_exits_non_zero_without_traceback(checkpoint, tmp_path):
    root, _, data = checkpoint
    args = [sys.executable, "-m", "matryoshka_plugin.cli.eval", str(root / "run" / "fit"),
            "--data", str(data), "--out", str(tmp_path / "e.json"), "--prefix-lens", "999"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "matryoshka-eval: error: prefix length 999 is out of range; allowed: 1..32"
    assert list(tmp_path.iterdir()) == []
