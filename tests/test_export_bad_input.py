"""Table of bad inputs to ``matryoshka-export``: each is refused with one error line naming
the layer and the value, a non-zero exit, and no output left behind (the contract of
``test_reliability_inputs``, whose checker this reuses).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig
from test_reliability_inputs import _expect_rejected
from tiny import D_MODEL, K, NESTED, WIDTH, build_sparsify_run


def _edit_cfg(path, **fields):
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **fields}))


def _edit_weight(path, name, index, value):
    tensors = load_file(str(path))
    tensors[name][index] = value
    save_file(tensors, str(path))


def _batch_topk_layer(run, threshold: float):
    cfg = MatryoshkaSparseCoderConfig(
        matryoshka=True, num_latents=WIDTH, k=K, transcode=True, skip_connection=True, nested_sizes=NESTED,
        batch_topk=True,
    )
    coder = MatryoshkaSparseCoder(D_MODEL, cfg)
    coder.batch_topk_threshold.fill_(threshold)
    shutil.rmtree(run / "layers.1.mlp")
    coder.save_to_disk(run / "layers.1.mlp")


# run directory name -> how layer 1 of a good two-layer run is broken
BROKEN_RUNS = {
    "k0": lambda run: _edit_cfg(run / "layers.1.mlp" / "cfg.json", k=0),
    "k_negative": lambda run: _edit_cfg(run / "layers.1.mlp" / "cfg.json", k=-3),
    "k_float": lambda run: _edit_cfg(run / "layers.1.mlp" / "cfg.json", k=2.5),
    "k_differs": lambda run: _edit_cfg(run / "layers.1.mlp" / "cfg.json", k=K + 1),
    "nan_decoder": lambda run: _edit_weight(run / "layers.1.mlp" / "sae.safetensors", "W_dec", (3, 2), float("nan")),
    "inf_bias": lambda run: _edit_weight(run / "layers.1.mlp" / "sae.safetensors", "encoder.bias", 5, float("-inf")),
    "nan_threshold": lambda run: _batch_topk_layer(run, float("nan")),
    "mixed": lambda run: _batch_topk_layer(run, 0.5),
}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """Good and broken runs and calibration files; the working directory of each case."""
    monkeypatch.chdir(tmp_path)
    build_sparsify_run(tmp_path / "run")
    for name, breaks in BROKEN_RUNS.items():
        shutil.copytree(tmp_path / "run", tmp_path / name)
        breaks(tmp_path / name)
    inputs = {f"layers.{l}.mlp": torch.randn(64, D_MODEL) for l in range(2)}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    save_file({k: v[:10].clone() for k, v in inputs.items()}, str(tmp_path / "short_outputs.safetensors"))
    save_file({k: torch.randn(64, 7) for k in inputs}, str(tmp_path / "narrow.safetensors"))
    save_file({k: v.clone().fill_(float("nan")) for k, v in inputs.items()}, str(tmp_path / "nan_inputs.safetensors"))
    return tmp_path


JUMP = ["--activation", "jumprelu", "--calibration"]
# (argv, text the error line must contain). Paths are relative to the fixture directory.
CASES = [
    (["k0", "out"], "layers.1.mlp/cfg.json: k=0 is not allowed"),
    (["k_negative", "out"], "layers.1.mlp/cfg.json: k=-3 is not allowed"),
    (["k_float", "out"], "layers.1.mlp/cfg.json: k=2.5 is not allowed"),
    (["k_differs", "out"], f"'layers.1.mlp': {K + 1}"),
    (["nan_decoder", "out"], "layers.1.mlp: W_dec holds 1 NaN/Inf values (first nan at [3, 2])"),
    (["inf_bias", "out"], "layers.1.mlp: encoder.bias holds 1 NaN/Inf values (first -inf at [5])"),
    (["nan_threshold", "out"], "layers.1.mlp: batch_topk_threshold"),
    (["mixed", "out"], "layers [1] are BatchTopK and layers [0] TopK"),
    (["run", "out", *JUMP, "narrow.safetensors"], "calibration for layer 0 has 7 columns"),
    (["run", "out", *JUMP, "nan_inputs.safetensors"], "calibration for layer 0 holds NaN/Inf"),
    (
        ["run", "out", *JUMP, "inputs.safetensors", "--calibration-outputs", "short_outputs.safetensors"],
        "calibration outputs for layer 0 has 10 rows",
    ),
    (["run", "out", "--calibration-outputs", "inputs.safetensors"], "only by activation jumprelu, not 'topk'"),
]


@pytest.mark.parametrize("argv,names", CASES, ids=[" ".join(argv)[:60] for argv, _ in CASES])
def test_bad_export_input_is_rejected_with_one_line(argv, names, work, capsys):
    _expect_rejected(capsys, work, "matryoshka-export", argv, names)


def test_good_inputs_of_the_table_export(work, capsys):
    # The fixture's good run and calibration export, so each row fails for its own reason.
    from matryoshka_plugin.cli.export import main

    main(["run", "out", *JUMP, "inputs.safetensors", "--calibration-outputs", "inputs.safetensors"])
    main(["mixed", "out_mixed", *JUMP, "inputs.safetensors"])
    assert (work / "out" / "jumprelu_calibration.json").is_file() and (work / "out_mixed").is_dir()
