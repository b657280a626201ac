"""``matryoshka-demo`` end to end.

The fast tests run the whole job (sparsify Trainer, checkpoints, held-out prefix FVU,
JSON, PNG) on a tiny random Llama with a small BPE tokenizer built here, on one novel.
The slow test runs it on the real SmolLM2 for a few steps.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from sparsify import SparseCoder

from tiny import build_tokenizer, random_model, save_model, tiny_config

from matryoshka_plugin import demo_job as demo
from matryoshka_plugin import load_coder
from matryoshka_plugin.cli import demo as demo_cli
from matryoshka_plugin.corpus import austen_dataset, austen_texts

LAYERS = [0, 1]
WIDTH = 64


def build_tiny_llama(path):
    """A 3-layer random Llama and a byte-level BPE tokenizer, saved as a HF folder."""
    tokenizer = build_tokenizer(
        austen_texts()["persuasion"][:50_000], 400, bos="<s>", eos="</s>", pad=None
    )
    config = tiny_config(
        "llama", tokenizer.vocab_size, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    # A causal LM (with its head): circuit-tracer needs the logits for the graphs.
    return save_model(path, random_model(config), tokenizer)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def tiny_args(model, out, **overrides):
    options = {
        "--model": str(model),
        "--out": str(out),
        "--num-latents": str(WIDTH),
        "--k": "4",
        "--ctx-len": "32",
        "--batch-size": "4",
        "--steps": "6",
        "--eval-tokens": "600",
        "--novels": "persuasion",
        "--optimizer": "adam",
        "--lr": "3e-3",
        "--lr-warmup-steps": "1",
    }
    options.update(overrides)
    argv = [item for pair in options.items() for item in pair]
    return argv + ["--layers", *map(str, LAYERS)]


@pytest.fixture(scope="module")
def demo_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-out")
    assert demo_cli.main(tiny_args(tiny_model, out)) == 0
    return out


def test_checkpoints_in_sparsify_layout(demo_run):
    run_dir = demo_run / "checkpoints" / demo.RUN_NAME
    for name in ("config.json", "state.pt", "optimizer_0.pt"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["hookpoints"] == [
        demo.hookpoint(layer) for layer in LAYERS
    ]
    for layer in LAYERS:
        coder_dir = run_dir / demo.hookpoint(layer)
        assert sorted(p.name for p in coder_dir.iterdir()) == ["cfg.json", "sae.safetensors"]
        # Stock sparsify loads the coder and sees exactly its own tensors.
        stock = SparseCoder.load_from_disk(coder_dir)
        assert stock.cfg.transcode and stock.num_latents == WIDTH and stock.d_in == 32
        assert set(load_file(coder_dir / "sae.safetensors")) == {
            "encoder.weight", "encoder.bias", "W_dec", "b_dec"
        }
        plugin = load_coder(coder_dir)
        assert plugin.nested_sizes == [4, 8, 16, 32, 64]  # Bussmann's 1/16,1/16,1/8,1/4,1/2
        assert torch.equal(stock.W_dec, plugin.W_dec)


def test_prefix_fvu_table(demo_run, tiny_model):
    results = json.loads((demo_run / demo.RESULTS_JSON).read_text())
    assert list(results["layers"]) == [demo.hookpoint(layer) for layer in LAYERS]
    assert results["settings"]["eval_tokens"] == 600
    assert results["settings"]["train_tokens"] == 6 * 4 * 32
    for name, layer in results["layers"].items():
        fvu = {int(p): v for p, v in layer["prefix_fvu"].items()}
        assert set(layer["nested_sizes"]) <= set(fvu) and max(fvu) == WIDTH
        assert all(math.isfinite(v) and v >= 0 for v in fvu.values()), (name, fvu)

    # Independent check of the full-width entry: stock sparsify's own forward on the
    # same held-out activations gives the same FVU.
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    test = austen_dataset(tokenizer, 32, "test", novels=["persuasion"])
    exclude = torch.tensor([tokenizer.bos_token_id, tokenizer.eos_token_id])
    acts = demo.collect_mlp_activations(base, test, LAYERS, 600, 4, exclude)
    for layer in LAYERS:
        x, y = acts[layer]
        assert x.shape == y.shape == (600, 32)
        coder = SparseCoder.load_from_disk(
            demo_run / "checkpoints" / demo.RUN_NAME / demo.hookpoint(layer)
        )
        with torch.no_grad():
            stock_fvu = float(coder(x, y).fvu)
        reported = results["layers"][demo.hookpoint(layer)]["prefix_fvu"][str(WIDTH)]
        assert reported == pytest.approx(stock_fvu, rel=1e-4)


def test_plot_written(demo_run):
    png = (demo_run / demo.RESULTS_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert not [p for p in demo_run.iterdir() if p.name.startswith(".")]  # no temp files


def test_table_marks_nested_sizes(demo_run):
    results = json.loads((demo_run / demo.RESULTS_JSON).read_text())
    table = demo.format_table(results)
    assert table.splitlines()[0].split() == ["prefix", *results["layers"]]
    starred = [line.split()[0] for line in table.splitlines()[2:-1] if "*" in line]
    assert starred == ["4", "8", "16", "32", "64"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"--k": "0"}, "--k=0 must be at least 1"),
        ({"--k": "65"}, "--k=65 must not exceed --num-latents=64"),
        ({"--steps": "100000"}, "needs 400000 sequences but the training split has"),
    ],
)
def test_bad_options_fail_with_one_line(tiny_model, tmp_path, capsys, override, message):
    assert demo_cli.main(tiny_args(tiny_model, tmp_path / "out", **override)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / demo.RESULTS_JSON).exists()


def test_layer_beyond_model_is_rejected(tiny_model, tmp_path, capsys):
    argv = tiny_args(tiny_model, tmp_path / "out")
    argv[argv.index("--layers") :] = ["--layers", "0", "7"]
    assert demo_cli.main(argv) == 2
    assert "the model has layers 0..2" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--layers", "1", "--steps", "3", "--batch-size", "4",
            "--num-latents", "256", "--eval-tokens", "512", "--novels", "persuasion"]
    assert demo_cli.main(argv) == 0
    results = json.loads((out / demo.RESULTS_JSON).read_text())
    fvu = results["layers"]["layers.1.mlp"]["prefix_fvu"]
    assert all(math.isfinite(v) for v in fvu.values())
    stock = SparseCoder.load_from_disk(out / "checkpoints" / demo.RUN_NAME / "layers.1.mlp")
    assert stock.d_in == 576 and stock.num_latents == 256
