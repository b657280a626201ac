"""What a calibrated JumpReLU export is, against the TopK code it replaces, and sets that
mix BatchTopK and TopK layers.

The known answers use an identity encoder (pre-activation j is input j), so TopK's and
the calibrated thresholds' active sets can be worked out by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig, load_coder
from matryoshka_plugin.adapters.circuit_tracer.activations import calibrate_jumprelu_thresholds, jumprelu_agreement
from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
from matryoshka_plugin.adapters.circuit_tracer.sparsify_export import export_transcoder_set
from matryoshka_plugin.adapters.circuit_tracer.transcoder_dir import CALIBRATION_FILE
from matryoshka_plugin.cli.export import main as export_main
from tiny import D_MODEL, K, NESTED, WIDTH, build_sparsify_run


def identity_coder(d: int, k: int) -> SparseCoder:
    """A transcoder whose latents are the inputs (W_enc = W_dec = I, no biases, no skip)."""
    coder = SparseCoder(d, SparseCoderConfig(num_latents=d, k=k, transcode=True))
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.eye(d))
        coder.W_dec.copy_(torch.eye(d))
        coder.encoder.bias.zero_()
        coder.b_dec.zero_()
    return coder


def identity_run(root, d: int, k: int, n_layers: int = 2):
    for layer in range(n_layers):
        identity_coder(d, k).save_to_disk(root / f"layers.{layer}.mlp")
    return root


def run_export(capsys, run, out, inputs: torch.Tensor, outputs: torch.Tensor, n_layers: int = 2) -> tuple[dict, str]:
    """``matryoshka-export --activation jumprelu`` with the same rows for every layer."""
    save_file({f"layers.{l}.mlp": inputs.clone() for l in range(n_layers)}, str(out.parent / "in.safetensors"))
    save_file({f"layers.{l}.mlp": outputs.clone() for l in range(n_layers)}, str(out.parent / "out.safetensors"))
    capsys.readouterr()
    export_main([
        str(run), str(out), "--activation", "jumprelu",
        "--calibration", str(out.parent / "in.safetensors"),
        "--calibration-outputs", str(out.parent / "out.safetensors"),
    ])
    return json.loads((out / CALIBRATION_FILE).read_text()), capsys.readouterr().out


def test_thresholds_that_reproduce_topk_report_full_agreement(tmp_path, capsys):
    # Each token has k inputs >= 10 and the rest in [0, 1): TopK keeps the large ones, and
    # each latent's calibrated threshold (its largest small value) keeps exactly them.
    d, k, n = 8, 2, 200
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, d, generator=gen)
    big = torch.rand(n, d, generator=gen).argsort(dim=1)[:, :k]
    x.scatter_add_(1, big, torch.full((n, k), 10.0))
    y = x @ torch.randn(d, d, generator=gen)
    report, out = run_export(capsys, identity_run(tmp_path / "run", d, k), tmp_path / "tc", x, y)
    assert report["exact_layers"] == []
    for layer in ("0", "1"):
        s = report["layers"][layer]
        assert (s["tokens"], s["k"]) == (n, k)
        assert s["same_active_set"] == 1.0 and s["mean_jaccard"] == 1.0
        assert (s["l0_mean"], s["l0_std"], s["l0_min"], s["l0_max"], s["topk_l0_mean"]) == (k, 0, k, k, k)
        assert s["fvu_jumprelu_vs_topk"] == 0.0
        assert s["fvu_jumprelu"] == pytest.approx(s["fvu_topk"], abs=1e-12)
    assert "layer 0 (200 tokens): 100.0%, 1.000, L0 2.00/0.00 [2, 2] vs k=2" in out


def test_thresholds_that_cannot_reproduce_topk_report_the_hand_computed_answer(tmp_path, capsys):
    # k = 1. TopK: latent 0 on x1, x2, latent 1 on x3, x4. Latent 0 must fire at 2 (x1)
    # but not at 3 (x4): no threshold does that. Calibration gives both latents the
    # threshold 2 (their 3rd largest value), so JumpReLU fires {} , {0,1}, {}, {0,1}.
    x = torch.tensor([[2.0, 1.0], [4.0, 3.0], [1.0, 2.0], [3.0, 4.0]])
    report, out = run_export(capsys, identity_run(tmp_path / "run", 2, 1), tmp_path / "tc", x, x)
    s = report["layers"]["0"]
    assert s["same_active_set"] == 0.0
    assert s["mean_jaccard"] == pytest.approx(0.25)  # (0 + 1/2 + 0 + 1/2) / 4
    assert (s["l0_mean"], s["l0_std"], s["l0_min"], s["l0_max"], s["topk_l0_mean"]) == (1.0, 1.0, 0, 2, 1.0)
    # TopK outputs (2,0) (4,0) (0,2) (0,4), variance 22; JumpReLU misses by 4 + 9 + 4 + 9.
    assert s["fvu_jumprelu_vs_topk"] == pytest.approx(26 / 22)
    # Against y = x (variance 10): TopK misses 1 + 9 + 1 + 9, JumpReLU 5 + 0 + 5 + 0.
    assert s["fvu_topk"] == pytest.approx(2.0) and s["fvu_jumprelu"] == pytest.approx(1.0)
    assert "layer 0 (4 tokens): 0.0%, 0.250, L0 1.00/1.00 [0, 2] vs k=1, FVU 2.0000 -> 1.0000" in out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 64), k=st.integers(1, 6))
def test_calibrated_code_fires_as_often_as_topk(seed, n, k):
    # The calibration gives each latent exactly its TopK firing count on the calibration
    # rows (continuous random data: no ties), so the L0s agree on average, though not
    # token by token; a token with TopK's active set has Jaccard 1, so Jaccard >= that share.
    torch.manual_seed(seed)
    coder = SparseCoder(D_MODEL, SparseCoderConfig(num_latents=WIDTH, k=k, transcode=True, skip_connection=True))
    x = torch.randn(n, D_MODEL)
    s = jumprelu_agreement(coder, x, calibrate_jumprelu_thresholds(coder, x), y=torch.randn(n, D_MODEL))
    assert s["l0_mean"] == pytest.approx(s["topk_l0_mean"])
    assert s["l0_min"] <= s["l0_mean"] <= s["l0_max"]
    assert 0 <= s["same_active_set"] <= s["mean_jaccard"] + 1e-12 <= 1 + 1e-12
    assert s["fvu_jumprelu_vs_topk"] is None or s["fvu_jumprelu_vs_topk"] >= 0
    # chunking does not change the answer
    assert jumprelu_agreement(coder, x, calibrate_jumprelu_thresholds(coder, x), chunk=7)["mean_jaccard"] == (
        pytest.approx(s["mean_jaccard"])
    )


# -- sets that mix BatchTopK and TopK layers ---------------------------------------------


@pytest.fixture
def mixed_run(tmp_path):
    """Layer 0 a TopK Matryoshka transcoder, layer 1 a BatchTopK one with threshold 0.5."""
    run = build_sparsify_run(tmp_path / "run")
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=WIDTH, k=K, transcode=True, skip_connection=True, nested_sizes=NESTED,
        batch_topk=True,
    )
    torch.manual_seed(1)
    coder = MatryoshkaSparseCoder(D_MODEL, cfg)
    coder.batch_topk_threshold.fill_(0.5)
    coder.save_to_disk(run / "layers.1.mlp")
    return run


def test_mixed_set_exports_as_jumprelu_with_exact_batch_topk_layers(mixed_run, tmp_path):
    # Calibration rows only for the TopK layer: the BatchTopK one needs none.
    x = torch.randn(256, D_MODEL)
    out = export_transcoder_set(mixed_run, tmp_path / "tc", activation="jumprelu", calibration={0: x})
    coders = [load_coder(mixed_run / f"layers.{l}.mlp") for l in (0, 1)]
    layer0 = load_file(str(out / "layer_0.safetensors"))["activation_function.threshold"]
    torch.testing.assert_close(layer0, calibrate_jumprelu_thresholds(coders[0], x), rtol=0, atol=0)
    assert json.loads((out / CALIBRATION_FILE).read_text())["exact_layers"] == [1]

    # Loaded through circuit-tracer's own per-layer loader, the BatchTopK layer is its
    # own activation, bit for bit.
    transcoders, config = load_transcoders_dir(out)
    assert config["model_kind"] == "transcoder_set"
    probe = torch.randn(64, D_MODEL)
    acts, idx, _ = coders[1].encode(probe)
    dense = torch.zeros(64, WIDTH).scatter_add_(1, idx, acts)
    torch.testing.assert_close(transcoders[1].encode(probe), dense, rtol=0, atol=0)


def test_all_batch_topk_set_needs_no_calibration(tmp_path):
    run = build_sparsify_run(tmp_path / "run")
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=WIDTH, k=K, transcode=True, nested_sizes=NESTED, batch_topk=True)
    for layer in (0, 1):
        MatryoshkaSparseCoder(D_MODEL, cfg).save_to_disk(run / f"layers.{layer}.mlp")
    out = export_transcoder_set(run, tmp_path / "tc", activation="jumprelu")
    assert not (out / CALIBRATION_FILE).exists()
    assert not math.isnan(float(load_file(str(out / "layer_1.safetensors"))["activation_function.threshold"][0]))
