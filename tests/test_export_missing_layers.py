"""The per-layer export of a run that lacks some layers' coders (issue #14).

Layers without a coder are written as zero transcoders: no latent fires there and the
layer's MLP output goes to the error nodes, so the graph is the one of a set whose
transcoders at those layers are explicitly zero, node for node.
"""

import shutil

import pytest
import torch
from circuit_tracer import attribute as ct_attribute

from tiny import N_LAYERS, PROMPT, build_sparsify_run, build_tiny_llama

from matryoshka_plugin import load_coder
from matryoshka_plugin.adapters.circuit_tracer.loading import load_transcoders_dir
from matryoshka_plugin.adapters.circuit_tracer.local_model import load_local_replacement_model
from matryoshka_plugin.adapters.circuit_tracer.sparsify_export import export_transcoder_set
from matryoshka_plugin.adapters.circuit_tracer.transcoder_dir import read_nested_sizes
from matryoshka_plugin.cli import export as export_cli


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def _graph(llama_dir, transcoder_dir):
    transcoders, _ = load_transcoders_dir(transcoder_dir)
    model = load_local_replacement_model(llama_dir, transcoders)
    return ct_attribute(model.ensure_tokenized(PROMPT), model)


def _zero_coder(coder_dir):
    coder = load_coder(coder_dir)
    with torch.no_grad():
        for p in coder.parameters():
            p.zero_()
    coder.save_to_disk(coder_dir)


@pytest.mark.parametrize("missing", [0, N_LAYERS - 1])
def test_missing_layer_graph_equals_explicit_zero_transcoder(llama_dir, tmp_path, missing):
    explicit = build_sparsify_run(tmp_path / "explicit")
    _zero_coder(explicit / f"layers.{missing}.mlp")
    partial = build_sparsify_run(tmp_path / "partial")
    shutil.rmtree(partial / f"layers.{missing}.mlp")

    # The same directory name: the scan name written to config.yaml comes from it.
    export_transcoder_set(explicit, tmp_path / "a" / "tc")
    export_transcoder_set(partial, tmp_path / "b" / "tc", n_layers=N_LAYERS)
    assert read_nested_sizes(tmp_path / "b" / "tc")["empty_layers"] == [missing]

    ours, zero = _graph(llama_dir, tmp_path / "b" / "tc"), _graph(llama_dir, tmp_path / "a" / "tc")
    assert ours.active_features.shape[0] > 0
    assert not (ours.active_features[:, 0] == missing).any()  # no feature at the empty layer
    for name, value in vars(zero).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(ours, name), value), name
        else:
            assert getattr(ours, name) == value, name


def test_cli_notice_names_the_empty_layers(tmp_path, capsys):
    run = build_sparsify_run(tmp_path / "run")
    export_cli.main([str(run), str(tmp_path / "tc"), "--n-layers", "6"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"no coder for layers {N_LAYERS}-5: written as zero transcoders "
        "(their MLP output is an error node)"
    )
    assert sorted(p.name for p in (tmp_path / "tc").glob("layer_*")) == [f"layer_{i}.safetensors" for i in range(6)]


def test_cli_n_layers_below_the_coders_is_one_line(tmp_path, capsys):
    run = build_sparsify_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(run), str(tmp_path / "tc"), "--n-layers", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"matryoshka-export: error: --n-layers=1 is below the coders' layers (up to {N_LAYERS - 1}); "
        f"allowed: at least {N_LAYERS}"
    ]
    assert not (tmp_path / "tc").exists()
