"""CLT training path 1 end to end on a tiny random Llama: cache -> train -> export -> graph.

Also: export round trips against circuit-tracer's own CrossLayerTranscoder, resume,
and one-line errors for bad input.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt as ct_load_clt
from safetensors.torch import load_file, save_file

from matryoshka_plugin.core.errors import ExportError
from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
from matryoshka_plugin.adapters.circuit_tracer.prefix_transcoders import set_prefix_len
from matryoshka_plugin.adapters.circuit_tracer.clt_export import export_clt, export_per_layer
from matryoshka_plugin.adapters.installed_sparsify import detect_clt_training
from matryoshka_plugin.cli.clt import main
from matryoshka_plugin.clt import (
    ActivationCache,
    CLTConfig,
    CLTTrainConfig,
    MatryoshkaCLT,
    cache_activations,
    load_clt,
    save_clt,
    train_clt,
)
from matryoshka_plugin.clt.model import shared_nested_sizes
from matryoshka_plugin.core.errors import CLTError

from tiny import random_model, save_model, tiny_config, word_tokenizer

VOCAB = 96
N_MODEL_LAYERS = 3
D = 32


def _tiny_llama(path: Path):
    cfg = tiny_config(
        "llama", VOCAB, d_model=D, n_layers=N_MODEL_LAYERS, n_heads=4, n_kv_heads=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    tokenizer = word_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", *(f"w{i}" for i in range(4, VOCAB))],
        bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
    )
    model = random_model(cfg)
    save_model(path, model, tokenizer)
    return model


def _random_batches(seed=0, batch=8, seq=24):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(4, VOCAB, (batch, seq), generator=g)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("clt")
    model = _tiny_llama(root / "model")
    cache = cache_activations(
        model, _random_batches(), [0, 1, 2], root / "cache", n_tokens=2400, show_progress=False
    )
    return root, model, cache


def _train_cfg(root, cache, name, **kw):
    clt = kw.pop("clt", CLTConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[4, 12]))
    return CLTTrainConfig(
        cache=str(cache), save_dir=str(root / name), clt=clt, batch_size=128,
        lr=3e-4, lr_warmup_steps=5, **kw,
    )


@pytest.fixture(scope="module")
def trained(tiny):
    root, _, cache = tiny
    cfg = _train_cfg(root, cache, "run", max_steps=40, save_every=15)
    clt = train_clt(cfg, show_progress=False)
    return root, cfg, clt


# -- cache ------------------------------------------------------------------------


def test_cache_matches_model_hooks(tiny):
    """Cached rows are the MLP inputs/outputs: re-running the MLP on the input gives the output."""
    _, model, cache_dir = tiny
    cache = ActivationCache(cache_dir)
    assert cache.layers == [0, 1, 2] and cache.d_model == D and cache.n_tokens == 2400
    x, y = cache.load()
    assert x.shape == y.shape == (2400, 3, D)
    for i in range(3):
        mlp = model.model.layers[i].mlp
        torch.testing.assert_close(mlp(x[:50, i]), y[:50, i], rtol=1e-4, atol=1e-5)
    # Layer 1's MLP input is layer 1's post-attention norm of the residual: not layer 0's output.
    assert not torch.allclose(x[:, 1], y[:, 0])


# -- training -----------------------------------------------------------------------


def test_training_reduces_loss_and_writes_run(trained):
    root, cfg, clt = trained
    metrics = json.loads((root / "run" / "clt" / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0]
    assert set(metrics["holdout_prefix_fvu"]) == {"4", "12", "32"}
    assert all(len(v) == 3 for v in metrics["holdout_prefix_fvu"].values())
    assert (root / "run" / "clt_training.png").is_file()
    loaded = load_clt(root / "run" / "clt")
    for a, b in zip(loaded.state_dict().values(), clt.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert loaded.source["n_model_layers"] == N_MODEL_LAYERS
    assert not list(root.glob(".run*")), "temporary directories were left behind"


@pytest.mark.parametrize("batch_topk", [False, True])
def test_resume_continues_exactly(tiny, batch_topk):
    root, _, cache = tiny
    clt = CLTConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[4, 12], batch_topk=batch_topk)
    run = lambda name, **kw: train_clt(_train_cfg(root, cache, f"{name}{batch_topk}", clt=clt, **kw),  # noqa: E731
                                       show_progress=False)
    straight = run("straight", max_steps=16)
    run("resumed", max_steps=8)
    resumed = run("resumed", max_steps=16, resume=True)
    # The BatchTopK thresholds are in the state dict; their EMA windows must go on
    # from the step reached, not restart.
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert torch.equal(resumed.batch_topk_updates, straight.batch_topk_updates)


def test_a_plain_clt_evaluates_as_a_matryoshka_one(tiny):
    """#20: every entry point returns coders that evaluate the same way, baselines included."""
    root, _, cache = tiny
    plain = train_clt(_train_cfg(root, cache, "plain", max_steps=4,
                                 clt=CLTConfig(matryoshka=False, num_latents=32, k=4)), show_progress=False)
    nested = train_clt(_train_cfg(root, cache, "nested", max_steps=4), show_progress=False)
    assert type(plain) is type(nested) is MatryoshkaCLT and not plain.training
    assert plain.nested_sizes == [32] and nested.nested_sizes == [4, 12, 32]
    x, y = ActivationCache(cache).load()
    x, y = x[:256].float(), y[:256].float()
    for clt in (plain, nested):
        by_prefix = clt.prefix_fvu(x, y, [4, 12, 32])
        assert list(by_prefix) == [4, 12, 32] and all(len(v) == 3 for v in by_prefix.values())
        # The full width's FVU is the CLT's own full reconstruction's.
        full = ((y - clt.reconstruct(x)).pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2)))
        assert by_prefix[32] == pytest.approx(full.tolist(), rel=1e-5)
    assert list(plain.prefix_fvu(x, y)) == [32]
    metrics = json.loads((root / "plain" / "clt" / "metrics.json").read_text())
    assert list(metrics["holdout_prefix_fvu"]) == ["2", "4", "8", "16", "32"]


# -- export round trips ---------------------------------------------------------------


def _random_clt(layers, cfg, seed=0, d=D):
    torch.manual_seed(seed)
    clt = MatryoshkaCLT(d, layers, cfg)
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_(std=0.3)
        clt.b_dec.normal_()
        for b in clt.b_enc:
            b.normal_(std=0.2)
    return clt.eval()


@pytest.mark.parametrize("layers,n_model", [([0, 1, 2], 3), ([1, 3], 5)])
def test_export_topk_round_trip_equals_circuit_tracer(tmp_path, layers, n_model):
    clt = _random_clt(layers, CLTConfig(matryoshka=True, num_latents=24, k=3, nested_sizes=[4, 10]))
    out = export_clt(clt, tmp_path / "ct", n_model_layers=n_model)
    ct, config = load_transcoders_dir(out, dtype=torch.float32)
    assert config["model_kind"].endswith("cross_layer_transcoder")
    assert config["matryoshka"]["nested_sizes"] == [4, 10, 24]
    assert ct.n_layers == n_model and ct.d_transcoder == 24
    x = torch.randn(n_model, 7, D)
    slots = torch.tensor(layers)
    for p in [None, 4, 10, 24]:
        set_prefix_len(ct, p)
        got = ct(x)
        want = clt.reconstruct(x[slots].transpose(0, 1), prefix_len=p).transpose(0, 1)
        torch.testing.assert_close(got[slots], want, rtol=1e-4, atol=1e-4)
        untrained = [i for i in range(n_model) if i not in layers]
        assert not got[untrained].any()
    # The raw files hold the documented layout.
    W_dec_first = load_file(str(out / f"W_dec_{layers[0]}.safetensors"))[f"W_dec_{layers[0]}"]
    assert W_dec_first.shape == (24, n_model - layers[0], D)


def test_export_batch_topk_loads_in_stock_circuit_tracer(tmp_path):
    cfg = CLTConfig(matryoshka=True, num_latents=24, k=3, nested_sizes=[6], batch_topk=True)
    clt = _random_clt([0, 1, 2], cfg)
    clt.train()
    clt(torch.randn(64, 3, D), torch.randn(64, 3, D))  # sets the inference thresholds
    clt.eval()
    assert (clt.batch_topk_threshold > 0).all()
    out = export_clt(clt, tmp_path / "ct")
    ct = ct_load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    x = torch.randn(3, 9, D)
    want = clt.reconstruct(x.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(ct(x), want, rtol=1e-4, atol=1e-4)
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["model_kind"] == "cross_layer_transcoder"


@pytest.mark.parametrize("batch_topk", [False, True])
def test_per_layer_export_equals_one_layer_clts_in_circuit_tracer(tmp_path, batch_topk):
    cfg = CLTConfig(matryoshka=True, num_latents=24, k=3, nested_sizes=[4, 10], batch_topk=batch_topk)
    clts = [_random_clt([layer], cfg, seed=layer) for layer in range(3)]
    if batch_topk:
        for c in clts:
            c.train()
            c(torch.randn(64, 1, D), torch.randn(64, 1, D))  # sets the inference threshold
            c.eval()
    out = export_per_layer(clts, tmp_path / "ct")
    ct, config = load_transcoders_dir(out, dtype=torch.float32)
    assert config["model_kind"].endswith("transcoder_set")
    assert config["matryoshka"]["nested_sizes"] == [4, 10, 24]
    x = torch.randn(7, D)
    for layer, c in enumerate(clts):
        for p in [None, 4] if not batch_topk else [None]:
            set_prefix_len(ct, p)
            got = ct[layer].decode(ct[layer].encode(x), x)
            torch.testing.assert_close(got, c.reconstruct(x[:, None], prefix_len=p)[:, 0], rtol=1e-4, atol=1e-4)


def test_per_layer_export_rejects_multi_layer_and_mixed_shapes(tmp_path):
    cfg = CLTConfig(num_latents=24, k=3)
    with pytest.raises(ExportError, match="not a per-layer transcoder"):
        export_per_layer([_random_clt([0, 1], cfg)], tmp_path / "a")
    with pytest.raises(ExportError, match="differ from"):
        export_per_layer([_random_clt([0], cfg), _random_clt([1], CLTConfig(num_latents=16, k=3))], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_jumprelu_calibrated_fires_like_topk(tmp_path):
    clt = _random_clt([0, 1, 2], CLTConfig(num_latents=24, k=3))
    calib = torch.randn(400, 3, D)
    out = export_clt(clt, tmp_path / "ct", activation="jumprelu", calibration=calib)
    ct = ct_load_clt(str(out), device=torch.device("cpu"), dtype=torch.float32)
    acts = ct.encode(calib.transpose(0, 1))  # [L, n, M]
    codes = clt.encode(calib)
    for s in range(3):
        topk_counts = torch.bincount(codes[s].top_indices[codes[s].top_acts > 0].flatten(), minlength=24)
        torch.testing.assert_close((acts[s] > 0).sum(0), topk_counts)


# -- end to end to a graph ------------------------------------------------------------------


def test_end_to_end_cache_train_export_graph(trained, tmp_path):
    root, cfg, clt = trained
    out = tmp_path / "ct"
    assert main(["export", str(root / "run" / "clt"), str(out)]) == 0
    graph = tmp_path / "graph.pt"
    cmd = [
        sys.executable, "-m", "matryoshka_plugin.cli.circuit_tracer", "attribute",
        "--prompt", "w5 w6 w7 w8", "--transcoder_set", str(out), "--model", str(root / "model"),
        "--graph_output_path", str(graph), "--prefix-len", "4", "32", "--max_n_logits", "3",
        "--batch_size", "16", "--dtype", "float32",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    scores = json.loads(graph.with_suffix(".scores.json").read_text())
    assert [r["prefix_len"] for r in scores] == [4, 32]
    assert scores[0]["nested_sizes"] == [4, 12, 32]
    for r in scores:
        assert 0 <= r["completeness_score"] <= 1 + 1e-6
    assert scores[0]["n_active_features"] <= scores[1]["n_active_features"]
    assert (tmp_path / "graph-p4.pt").is_file() and (tmp_path / "graph-p32.pt").is_file()


# -- bad input ----------------------------------------------------------------------------


def test_cache_rejects_layers_not_in_model(tiny, tmp_path):
    _, model, _ = tiny
    with pytest.raises(CLTError, match=r"layers \[7\] are not in the model; allowed: 0..2"):
        cache_activations(model, _random_batches(), [0, 7], tmp_path / "c", n_tokens=10)
    assert not (tmp_path / "c").exists()


def test_train_rejects_layers_not_in_cache(tiny, tmp_path):
    root, _, cache = tiny
    with pytest.raises(CLTError, match=r"layers \[5\] are not in the cache .* it holds \[0, 1, 2\]"):
        train_clt(_train_cfg(tmp_path, cache, "x", layers=[0, 5], max_steps=1), show_progress=False)


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    root, _, cache = tiny
    rc = main(["train", "--cache", str(cache), "--save_dir", str(tmp_path / "r"), "--layers", "0", "9"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "layers [9] are not in the cache" in err
    rc = main(["train", "--cache", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "manifest.json not found" in err
    rc = main(["train", "--cache", str(cache), "--nested_sizes", "8", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "strictly increasing" in err and "\n" not in err


def test_cache_with_mismatched_shapes_is_rejected(tiny, tmp_path):
    _, _, cache = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(manifest))
    for i in [0, 1, 2]:
        t = load_file(str(Path(cache) / f"layer_{i}.safetensors"))
        if i == 1:
            t["output"] = t["output"][:, :16].contiguous()
        save_file(t, str(bad / f"layer_{i}.safetensors"))
    with pytest.raises(CLTError, match=r"layer_1.safetensors: output has shape \[2400, 16\]; the manifest says \[2400, 32\]"):
        ActivationCache(bad)


def test_nested_sizes_must_be_shared_across_layers(tmp_path):
    with pytest.raises(CLTError, match="nested sizes differ across layers"):
        shared_nested_sizes({"0": [4, 32], "1": [8, 32]})
    clt = _random_clt([0, 1], CLTConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[4]))
    save_clt(clt, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["nested_sizes_by_layer"]["1"] = [8, 32]
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CLTError, match=r"layer 0: \[4, 32\]; layer 1: \[8, 32\]"):
        load_clt(tmp_path / "c")


def test_inputs_with_wrong_layer_count_are_rejected():
    clt = _random_clt([0, 1, 2], CLTConfig(num_latents=16, k=2))
    with pytest.raises(CLTError, match=r"expected \[tokens, 3 layers, 32\] for layers \[0, 1, 2\]"):
        clt.reconstruct(torch.randn(5, 2, D))


def test_export_rejects_a_model_with_too_few_layers(tmp_path):
    clt = _random_clt([1, 3], CLTConfig(num_latents=16, k=2))
    with pytest.raises(ExportError, match=r"covers layers \[1, 3\], beyond the model's 3 layers"):
        export_clt(clt, tmp_path / "ct", n_model_layers=3)
    assert not (tmp_path / "ct").exists()


def test_path2_detection(tmp_path):
    # PyPI eai-sparsify 1.3.3 is installed here: not clt-training.
    assert detect_clt_training() is None
    # clt-training's package layout (a Triton kernels.py beside the trainer) is detected.
    fork = tmp_path / "sparsify"
    fork.mkdir()
    (fork / "__init__.py").write_text("")
    assert detect_clt_training([str(fork)]) is None
    (fork / "kernels.py").write_text("import triton\n")
    assert detect_clt_training([str(fork)]) is not None


def test_clt_training_install_gets_one_clear_error(tmp_path):
    # A clt-training-shaped ``sparsify`` first on the path: its package import needs
    # Triton, so the plugin must refuse it before importing it.
    fork = tmp_path / "sparsify"
    fork.mkdir()
    (fork / "__init__.py").write_text("from .kernels import *\n")
    (fork / "kernels.py").write_text("import triton\n")
    code = (
        "import matryoshka_plugin\n"
        "from matryoshka_plugin.core import MatryoshkaConfig\n"
        "import matryoshka_plugin.clt\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "CLTTrainingInstalledError" in last and "clt-training" in last, proc.stderr
    assert "No module named 'triton'" not in proc.stderr


@pytest.mark.slow
def test_smollm2_default_path(tmp_path):
    """The embedded default: SmolLM2-135M on Austen, cache -> train -> export (CLI)."""
    pytest.importorskip("gguf")
    from matryoshka_plugin.core.errors import OfflineAssetError
    from matryoshka_plugin.offline import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except OfflineAssetError as e:
        pytest.skip(str(e))
    cache = tmp_path / "cache"
    assert main(["cache", "--layers", "0-1", "--out", str(cache), "--n-tokens", "3000"]) == 0
    assert ActivationCache(cache).d_model == 576
    run = tmp_path / "run"
    assert main(["train", "--cache", str(cache), "--save_dir", str(run), "--num_latents", "128",
                 "--k", "8", "--max_steps", "40", "--batch_size", "128", "--lr", "3e-3",
                 "--lr_warmup_steps", "5"]) == 0
    metrics = json.loads((run / "clt" / "metrics.json").read_text())
    fvu = [h["fvu_mean"] for h in metrics["history"]]
    assert sum(fvu[-5:]) / 5 < fvu[0]
    held_full = metrics["holdout_prefix_fvu"]["128"]
    assert sum(held_full) / len(held_full) < 1.0
    assert main(["export", str(run / "clt"), str(tmp_path / "ct")]) == 0
    ct, config = load_transcoders_dir(tmp_path / "ct")
    assert ct.n_layers == 30 and config["model_name"] == "smollm2"
