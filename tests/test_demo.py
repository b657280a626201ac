"""``matryoshka-demo`` end to end.

The fast tests run the whole job (sparsify Trainer for the Matryoshka and the TopK
dictionaries, checkpoints, held-out prefix FVU, JSON, PNG, export, attribution graphs at
three prefix lengths, viewer data) on a tiny random Llama with a small BPE tokenizer
built here, on one novel. The slow test runs it on the real SmolLM2 for a few steps.
"""

import contextlib
import io
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
def demo_run_output(tiny_model, tmp_path_factory):
    """The output folder of one whole demo run, and what it printed."""
    out = tmp_path_factory.mktemp("demo-out")
    with capture_stdout() as printed:
        assert demo_cli.main(tiny_args(tiny_model, out)) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def demo_run(demo_run_output):
    return demo_run_output[0]


@contextlib.contextmanager
def capture_stdout():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


@pytest.mark.parametrize("run_name", [demo.RUN_NAME, demo.TOPK_RUN_NAME])
def test_checkpoints_in_sparsify_layout(demo_run, run_name):
    run_dir = demo_run / "checkpoints" / run_name
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
        if run_name == demo.RUN_NAME:
            assert plugin.nested_sizes == [4, 8, 16, 32, 64]  # Bussmann's 1/16,1/16,1/8,1/4,1/2
        else:  # the baseline is stock sparsify's plain TopK transcoder
            assert type(plugin) is SparseCoder and not hasattr(plugin, "nested_sizes")
        assert torch.equal(stock.W_dec, plugin.W_dec)


def test_prefix_fvu_table(demo_run, tiny_model):
    results = json.loads((demo_run / demo.RESULTS_JSON).read_text())
    assert set(results) == {"settings", "matryoshka", "topk"}
    nested = results["settings"]["nested_sizes"]
    assert nested == [4, 8, 16, 32, 64]
    assert results["settings"]["eval_tokens"] == 600
    assert results["settings"]["train_tokens"] == 6 * 4 * 32
    for coder in ("matryoshka", "topk"):
        assert list(results[coder]) == [demo.hookpoint(layer) for layer in LAYERS]
        for name, prefix_fvu in results[coder].items():
            fvu = {int(p): v for p, v in prefix_fvu.items()}
            assert set(nested) <= set(fvu) and max(fvu) == WIDTH
            assert all(math.isfinite(v) and v >= 0 for v in fvu.values()), (coder, name, fvu)

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
        for coder_key, run_name in demo.CODERS.items():
            coder = SparseCoder.load_from_disk(
                demo_run / "checkpoints" / run_name / demo.hookpoint(layer)
            )
            with torch.no_grad():
                stock_fvu = float(coder(x, y).fvu)
            reported = results[coder_key][demo.hookpoint(layer)][str(WIDTH)]
            assert reported == pytest.approx(stock_fvu, rel=1e-4)


def test_plot_written(demo_run):
    png = (demo_run / demo.RESULTS_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert not [p for p in demo_run.iterdir() if p.name.startswith(".")]  # no temp files


def test_table_marks_nested_sizes(demo_run):
    results = json.loads((demo_run / demo.RESULTS_JSON).read_text())
    table = demo.format_table(results).splitlines()
    assert table[0].split() == ["hookpoint", "coder", "1", "2", "4*", "8*", "16*", "32*", "64*"]
    rows = [line.split()[:2] for line in table[2:-1]]
    assert rows == [[demo.hookpoint(layer), coder] for layer in LAYERS for coder in ("matryoshka", "topk")]


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
    errors = [line for line in err.splitlines() if line.startswith("matryoshka-demo: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no empty --out left behind


def test_layer_beyond_model_is_rejected(tiny_model, tmp_path, capsys):
    argv = tiny_args(tiny_model, tmp_path / "out")
    argv[argv.index("--layers") :] = ["--layers", "0", "7"]
    assert demo_cli.main(argv) == 2
    assert "matryoshka-demo: error: the model has layers 0..2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path):
    out = tmp_path / "out"
    argv = ["--out", str(out), "--layers", "1", "--steps", "3", "--batch-size", "4",
            "--num-latents", "256", "--eval-tokens", "512", "--novels", "persuasion",
            "--max-feature-nodes", "64", "--viewer-tokens", "256"]
    assert demo_cli.main(argv) == 0
    results = json.loads((out / demo.RESULTS_JSON).read_text())
    for coder in ("matryoshka", "topk"):
        assert all(math.isfinite(v) for v in results[coder]["layers.1.mlp"].values())
    stock = SparseCoder.load_from_disk(out / "checkpoints" / demo.RUN_NAME / "layers.1.mlp")
    assert stock.d_in == 576 and stock.num_latents == 256


# -- export, graphs, viewer data, summary ----------------------------------------------


def test_export_covers_every_model_layer(demo_run):
    tc = demo_run / demo.TRANSCODERS_DIR
    assert sorted(p.name for p in tc.glob("layer_*")) == [f"layer_{i}.safetensors" for i in range(3)]
    # The tiny Llama has 3 layers; the demo trains 0 and 1: layer 2 is a zero transcoder.
    assert not load_file(tc / "layer_2.safetensors")["W_dec"].any()
    assert torch.equal(
        load_file(tc / "layer_1.safetensors")["W_dec"],
        load_coder(demo_run / "checkpoints" / demo.RUN_NAME / "layers.1.mlp").W_dec,
    )


def test_graphs_at_three_prefix_lengths(demo_run):
    graphs_dir = demo_run / demo.GRAPHS_DIR
    meta = json.loads((graphs_dir / "graph-metadata.json").read_text())["graphs"]
    assert [(g["slug"], g["prefix_len"]) for g in meta] == [
        ("austen-p4", 4), ("austen-p16", 16), ("austen-p64", 64)
    ]
    features = {}
    for g in meta:
        graph = json.loads((graphs_dir / f"{g['slug']}.json").read_text())
        assert graph["metadata"]["prompt"].endswith(demo.PROMPT)  # after the prepended BOS
        layers = {int(n["node_id"].split("_")[0]) for n in graph["nodes"]
                  if n["feature_type"] == "cross layer transcoder"}
        assert layers and layers <= set(LAYERS), layers  # no feature at the zero layer 2
        features[g["prefix_len"]] = g["n_active_features"]
        assert 0 < g["replacement_score"] <= g["completeness_score"] <= 1
    # Keeping more of the prefix keeps more latents active.
    assert features[4] < features[16] < features[64]
    scores = json.loads((graphs_dir / "austen.scores.json").read_text())
    assert [row["prefix_len"] for row in scores] == [4, 16, 64]


def test_graphs_carry_supernodes_from_the_nesting(demo_run):
    graphs_dir = demo_run / demo.GRAPHS_DIR
    assert not (graphs_dir / "austen-p4.hierarchy.json").exists()  # the coarsest has no parent level
    for p, coarse in ((16, 4), (64, 16)):
        side = json.loads((graphs_dir / f"austen-p{p}.hierarchy.json").read_text())
        assert (side["prefix_len"], side["parent_prefix_len"]) == (p, coarse)
        graph = json.loads((graphs_dir / f"austen-p{p}.json").read_text())
        ids = {n["node_id"] for n in graph["nodes"]}
        assert side["parents"] and set(side["parents"]) <= ids
        assert all(0 <= parent < coarse for parent in side["parents"].values())
        members = [m for group in graph["qParams"]["supernodes"] for m in group[1:]]
        assert sorted(members) == sorted(side["parents"])  # every child in exactly one supernode


def test_viewer_data_for_the_graphs(demo_run):
    from matryoshka_plugin.viewer.data import VIEWER_DIR, cantor

    graphs_dir = demo_run / demo.GRAPHS_DIR
    (scan_dir,) = (graphs_dir / VIEWER_DIR).iterdir()
    decomposition = json.loads((scan_dir / "decomposition.json").read_text())
    assert decomposition["levels"] == [4, 16, 64] and decomposition["width"] == WIDTH
    graph = json.loads((graphs_dir / "austen-p64.json").read_text())
    for node in graph["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            layer, feature, _ = map(int, node["node_id"].split("_"))
            page = json.loads((scan_dir / "features" / f"{cantor(layer, feature)}.json").read_text())
            assert (page["layer"], page["feature"]) == (layer, feature)
            assert f"{layer}_{feature}" in decomposition["features"]


def test_summary_printed(demo_run_output):
    out, printed = demo_run_output
    assert "Matryoshka / TopK held-out FVU at each nested size" in printed
    for p in (4, 8, 16, 32, 64):
        assert f"P={p:>6}: mean " in printed
    assert "no transcoder at layers 2: their MLP output is an error node" in printed
    assert f"python -m matryoshka_plugin.viewer serve {out / demo.GRAPHS_DIR}" in printed


# -- --recipe full: checkpointed, resumable ----------------------------------------------


def full_args(model, out, **overrides):
    """The tiny settings with ``--recipe full``: every layer, a checkpoint every 2 steps."""
    argv = tiny_args(model, out, **{"--save-every": "2", **overrides})
    return argv[: argv.index("--layers")] + ["--recipe", "full"]


def _state_step(run_dir):
    return torch.load(run_dir / "state.pt", weights_only=True)["global_step"]


def test_full_recipe_resumes_an_interrupted_run(tiny_model, tmp_path, monkeypatch, capsys):
    from matryoshka_plugin.adapters.sparsify import MatryoshkaTrainer

    out = tmp_path / "out"
    save = MatryoshkaTrainer.save
    saves = []

    def save_then_interrupt(self):
        save(self)
        saves.append(self.global_step)
        if self.cfg.run_name == demo.TOPK_RUN_NAME:
            raise KeyboardInterrupt  # Ctrl-C right after the baseline's first checkpoint

    monkeypatch.setattr(MatryoshkaTrainer, "save", save_then_interrupt)
    assert demo_cli.main(full_args(tiny_model, out)) == 130
    monkeypatch.setattr(MatryoshkaTrainer, "save", save)
    progress = json.loads((out / demo.PROGRESS_FILE).read_text())
    assert list(progress["done"]) == ["train-matryoshka"]
    matryoshka_dir = out / "checkpoints" / demo.RUN_NAME
    topk_dir = out / "checkpoints" / demo.TOPK_RUN_NAME
    assert _state_step(matryoshka_dir) == 6 and _state_step(topk_dir) < 6
    trained = {p: p.read_bytes() for p in matryoshka_dir.rglob("sae.safetensors")}
    capsys.readouterr()

    assert demo_cli.main(full_args(tiny_model, out)) == 0
    printed = capsys.readouterr().out
    assert "[train-matryoshka] done in an earlier run; skipped" in printed
    assert "Resuming training at step" in printed  # the baseline continues its checkpoint
    assert _state_step(topk_dir) == 6
    assert {p: p.read_bytes() for p in matryoshka_dir.rglob("sae.safetensors")} == trained
    progress = json.loads((out / demo.PROGRESS_FILE).read_text())
    assert list(progress["done"]) == [
        "train-matryoshka", "train-topk", "evaluate", "export", "graphs", "viewer"
    ]
    # Every layer of the tiny model: no empty layer in the export.
    assert progress["done"]["export"]["empty_layers"] == []
    results = json.loads((out / demo.RESULTS_JSON).read_text())
    assert list(results["topk"]) == [demo.hookpoint(layer) for layer in range(3)]

    # A third run finds everything done and changes nothing.
    graphs = (out / demo.GRAPHS_DIR / "austen-p64.json").read_bytes()
    assert demo_cli.main(full_args(tiny_model, out)) == 0
    printed = capsys.readouterr().out
    for stage in progress["done"]:
        assert f"[{stage}] done in an earlier run; skipped" in printed
    assert (out / demo.GRAPHS_DIR / "austen-p64.json").read_bytes() == graphs


def test_full_recipe_refuses_other_settings_in_its_out(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    settings = {"steps": 5}
    (out / demo.PROGRESS_FILE).write_text(json.dumps({"settings": settings, "done": {}}))
    assert demo_cli.main(full_args(tiny_model, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"matryoshka-demo: error: --out {out} holds a run with other settings (")
    assert "steps" in err[0]
