"""Bad-input sweep over every console script and every Matryoshka config field.

Contract for each case: a non-zero exit, exactly one ``<prog>: error: ...`` line on
stderr naming the bad value (argparse may print its usage line before it), no
traceback, and no new files anywhere under the test's directory (which is also the
working directory, where default outputs would land).

"Unwritable output directory": the tests run as root, so chmod does not stop writes;
an output path under a regular file (``file.txt/out``) is unwritable for anyone.

Each CLI's ``main(argv)`` is called in-process (a subprocess costs ~30 s of imports
here); ``test_console_scripts_exit_cleanly`` runs one real subprocess.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from matryoshka_plugin.cli import circuit_tracer as ct_cli
from matryoshka_plugin.cli import export as export_cli
from matryoshka_plugin.adapters.sparsify import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig
from matryoshka_plugin.adapters.sparsify.run_config import read_config_file
from matryoshka_plugin.cli.clt import main as clt_main
from matryoshka_plugin.cli.demo import main as demo_main
from matryoshka_plugin.cli.eval import main as eval_main
from matryoshka_plugin.cli.sparsify import main as sparsify_main
from matryoshka_plugin.core import MatryoshkaConfig, MatryoshkaConfigError
from matryoshka_plugin.core.errors import UsageError

MAINS = {
    "sparsify-matryoshka": sparsify_main,
    "matryoshka-export": export_cli.main,
    "circuit-tracer-matryoshka": ct_cli.main,
    "matryoshka-eval": eval_main,
    "matryoshka-clt": clt_main,
    "matryoshka-demo": demo_main,
}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A directory with good and broken inputs; the working directory of each case."""
    monkeypatch.chdir(tmp_path)
    # No network here: fail hub look-ups at once instead of after ~45 s of retries.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[8, 16])
    coder = MatryoshkaSparseCoder(16, cfg)
    run = tmp_path / "run"
    coder.save_to_disk(run / "layers.0.mlp")
    (tmp_path / "file.txt").write_text("a regular file\n")
    save_file({"inputs": torch.randn(64, 16)}, str(tmp_path / "acts.safetensors"))
    save_file({"inputs": torch.randn(64, 7)}, str(tmp_path / "wrong_width.safetensors"))
    save_file({"other": torch.randn(64, 16)}, str(tmp_path / "no_inputs.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    good = (run / "layers.0.mlp" / "sae.safetensors").read_bytes()
    for name, mutate in {
        "truncated": lambda d: (d / "sae.safetensors").write_bytes(good[: len(good) // 2]),
        "wrong_shape": lambda d: save_file(
            {k: torch.zeros(3, 3) for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec")},
            str(d / "sae.safetensors"),
        ),
        "int_weights": lambda d: save_file(
            {k: v.to(torch.int32) for k, v in load_file(str(d / "sae.safetensors")).items()},
            str(d / "sae.safetensors"),
        ),
        "bad_cfg": lambda d: (d / "cfg.json").write_text("{not json"),
        "bad_field": lambda d: (d / "cfg.json").write_text(
            json.dumps({**json.loads((run / "layers.0.mlp" / "cfg.json").read_text()), "nested_sizes": [16, 8]})
        ),
    }.items():
        d = tmp_path / f"run_{name}" / "layers.0.mlp"
        coder.save_to_disk(d)
        mutate(d)
    (tmp_path / "cfg_bad.json").write_text(json.dumps({"sae": {"prefix_schedule": "sometimes"}}))
    (tmp_path / "cfg_trunc.json").write_text('{"sae": {"matryoshka": tr')
    (tmp_path / "cfg_list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "cfg_unknown.json").write_text(json.dumps({"sae": {"nested_size": [8]}}))
    return tmp_path


def _expect_rejected(capsys, work: Path, prog: str, argv: list[str], names: str):
    before = _files(work)
    capsys.readouterr()
    try:
        rc = MAINS[prog](argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line or line.startswith("error:")]
    assert rc not in (0, None), (argv, err)
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    others = [line for line in lines if line not in errors and not line.startswith(("usage:", " "))]
    assert not others, err
    assert names in errors[0], (names, errors[0])
    assert _files(work) == before, sorted(_files(work) - before)


# (prog, argv, text the error must name). Paths are relative to the fixture directory.
CASES = [
    # sparsify-matryoshka: config fields as flags and files
    ("sparsify-matryoshka", ["gpt2", "data", "--matryoshka", "maybe"], "maybe"),
    ("sparsify-matryoshka", ["gpt2", "data", "--prefix_schedule", "sometimes"], "sometimes"),
    ("sparsify-matryoshka", ["gpt2", "data", "--nested_sizes", "16", "8"], "[16, 8]"),
    ("sparsify-matryoshka", ["gpt2", "data", "--nested_sizes", "0"], "[0]"),
    ("sparsify-matryoshka", ["gpt2", "data", "--nested_sizes", "x"], "'x'"),
    ("sparsify-matryoshka", ["gpt2", "data", "--nested_sizes", "8", "--group_fractions", "0.5", "0.5"], "contradict"),
    ("sparsify-matryoshka", ["gpt2", "data", "--group_fractions", "0.5", "0.6"], "[0.5, 0.6]"),
    ("sparsify-matryoshka", ["gpt2", "data", "--num_prefixes", "0"], "num_prefixes=0"),
    ("sparsify-matryoshka", ["gpt2", "data", "--min_prefix", "-1"], "min_prefix=-1"),
    ("sparsify-matryoshka", ["gpt2", "data", "--pareto_shape", "0"], "pareto_shape=0"),
    ("sparsify-matryoshka", ["gpt2", "data", "--pareto_shape", "nan"], "pareto_shape=nan"),
    ("sparsify-matryoshka", ["gpt2", "data", "--level_weights", "-1", "2"], "[-1.0, 2.0]"),
    ("sparsify-matryoshka", ["gpt2", "data", "--prefix_schedule", "pareto", "--nested_decoders", "true"], "nested_decoders"),
    ("sparsify-matryoshka", ["gpt2", "data", "--stop_gradient", "true", "--nested_decoders", "true"], "stop_gradient"),
    ("sparsify-matryoshka", ["gpt2", "data", "--batch_topk_momentum", "1.5"], "1.5"),
    ("sparsify-matryoshka", ["gpt2", "data", "--prefix_seed", "one"], "'one'"),
    ("sparsify-matryoshka", ["gpt2", "data", "--layers", "0", "--hookpoints", "h.0"], "contradict"),
    ("sparsify-matryoshka", ["gpt2", "data", "--device", "tpu:x"], "tpu:x"),
    ("sparsify-matryoshka", ["gpt2", "data", "--config_path", "missing.json"], "missing.json"),
    ("sparsify-matryoshka", ["gpt2", "data", "--config_path", "cfg_trunc.json"], "cfg_trunc.json"),
    ("sparsify-matryoshka", ["gpt2", "data", "--config_path", "cfg_bad.json"], "sometimes"),
    ("sparsify-matryoshka", ["gpt2", "data", "--config_path", "cfg_list.yaml"], "cfg_list.yaml"),
    ("sparsify-matryoshka", ["gpt2", "data", "--config_path", "cfg_unknown.json"], "nested_size"),
    ("sparsify-matryoshka", ["gpt2", "data", "--resume", "true", "--save_dir", "file.txt/out"], "file.txt/out"),
    ("sparsify-matryoshka", ["gpt2", "data", "--finetune", "missing_run"], "missing_run"),
    # matryoshka-export
    ("matryoshka-export", ["missing_run", "out"], "missing_run"),
    ("matryoshka-export", ["run", "file.txt/out"], "file.txt"),
    ("matryoshka-export", ["run_truncated", "out"], "run_truncated"),
    ("matryoshka-export", ["run_wrong_shape", "out"], "run_wrong_shape"),
    ("matryoshka-export", ["run_bad_cfg", "out"], "cfg.json"),
    ("matryoshka-export", ["run_bad_field", "out"], "[16, 8]"),
    ("matryoshka-export", ["run", "out", "--calibration", "corrupt.safetensors"], "corrupt.safetensors"),
    ("matryoshka-export", ["run", "run"], "run"),
    # circuit-tracer-matryoshka
    ("circuit-tracer-matryoshka", ["attribute", "--prompt", "hi", "--transcoder_set", "./missing", "--model", "m", "--graph_output_path", "g.pt"], "missing"),
    ("circuit-tracer-matryoshka", ["attribute", "--prompt", "hi", "--transcoder_set", "file.txt", "--model", "m", "--graph_output_path", "g.pt"], "file.txt"),
    ("circuit-tracer-matryoshka", ["attribute", "--prompt", "hi", "--transcoder_set", "run", "--model", "m", "--graph_output_path", "g.pt", "--prefix-len", "x"], "'x'"),
    # matryoshka-eval
    ("matryoshka-eval", ["missing_run", "--data", "acts.safetensors"], "missing_run"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "missing.safetensors"], "missing.safetensors"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "corrupt.safetensors"], "corrupt.safetensors"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "wrong_width.safetensors"], "7"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "no_inputs.safetensors"], "inputs"),
    ("matryoshka-eval", ["run_int_weights/layers.0.mlp", "--data", "acts.safetensors"], "I32"),
    ("matryoshka-export", ["run_int_weights", "out"], "I32"),
    ("matryoshka-eval", ["run_truncated/layers.0.mlp", "--data", "acts.safetensors"], "run_truncated"),
    ("matryoshka-eval", ["run_wrong_shape/layers.0.mlp", "--data", "acts.safetensors"], "run_wrong_shape"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "acts.safetensors", "--prefix-lens", "8,x"], "8,x"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "acts.safetensors", "--prefix-lens", "64"], "64"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "acts.safetensors", "--max-rows", "0"], "0"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "acts.safetensors", "--out", "file.txt/eval.json"], "file.txt"),
    # matryoshka-clt
    ("matryoshka-clt", ["train", "--cache", "missing_cache", "--save_dir", "out"], "missing_cache"),
    ("matryoshka-clt", ["export", "missing_clt", "out"], "missing_clt"),
    ("matryoshka-clt", ["eval", "missing_clt", "missing_cache"], "missing_clt"),
    ("matryoshka-clt", ["cache", "--out", "c", "--dataset", "random", "--model", "missing_model"], "missing_model"),
    ("matryoshka-clt", ["cache", "--out", "c", "--layers", "a-b"], "a-b"),
    # matryoshka-demo
    ("matryoshka-demo", ["--steps", "0"], "steps"),
    ("matryoshka-demo", ["--k", "64", "--num-latents", "32"], "k"),
    ("matryoshka-demo", ["--model", "missing_model_dir/"], "missing_model_dir"),
    ("matryoshka-demo", ["--optimizer", "sgd"], "sgd"),
    ("matryoshka-demo", ["--out", "file.txt/out", "--steps", "1"], "file.txt"),
    # --device: a name torch does not know, and CUDA on a machine without it (this one in CI)
    ("matryoshka-demo", ["--device", "tpu9"], "'tpu9'"),
    ("matryoshka-eval", ["run/layers.0.mlp", "--data", "acts.safetensors", "--device", "tpu9"], "'tpu9'"),
    ("matryoshka-clt", ["cache", "--out", "c", "--dataset", "random", "--device", "tpu9"], "'tpu9'"),
    *(
        [("matryoshka-demo", ["--device", "cuda"], "CUDA is not available"),
         ("matryoshka-eval", ["run/layers.0.mlp", "--data", "acts.safetensors", "--device", "cuda:0"], "CUDA is not available"),
         ("matryoshka-clt", ["cache", "--out", "c", "--dataset", "random", "--device", "cuda"], "CUDA is not available")]
        if not torch.cuda.is_available() else []
    ),
]


def _case_id(case) -> str:
    prog, argv, _ = case.values if hasattr(case, "values") else case
    return f"{prog}:{' '.join(argv)}"[:90]


@pytest.mark.parametrize("prog,argv,names", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_rejected_with_one_line(prog, argv, names, work, capsys):
    _expect_rejected(capsys, work, prog, argv, names)


# -- every Matryoshka config field through the config-file loader ----------------------

BAD_FIELD_VALUES = {
    "matryoshka": ["yes please", 3],
    "nested_sizes": [[16, 8], [0], [-4], "eight", [1.5]],
    "group_fractions": [[0.5, 0.6], [-0.5, 1.5], "half"],
    "prefix_schedule": ["sometimes", "", 1],
    "num_prefixes": [0, -3, "ten"],
    "min_prefix": [0, "one"],
    "pareto_shape": [0, -1.0, "wide"],
    "prefix_seed": ["seed"],
    "level_weights": [[-1.0, 2.0], [0.0, 0.0], "equal"],
    "stop_gradient": ["sometimes"],
    "bias_level": ["sometimes"],
    "nested_decoders": ["sometimes"],
    "batch_topk": ["sometimes"],
    "batch_topk_momentum": [1.0, -0.1, "slow"],
    "adaptive_every": [0, -5, "often", 2.5],
    "permute_every": [-1, "often", 2.5],
}
FIELD_CASES = [(f, v) for f, vs in BAD_FIELD_VALUES.items() for v in vs]


def test_every_matryoshka_field_has_bad_values():
    from dataclasses import fields

    assert {f.name for f in fields(MatryoshkaConfig)} == set(BAD_FIELD_VALUES)


@pytest.mark.parametrize("field_name,value", FIELD_CASES, ids=[f"{f}={v!r}" for f, v in FIELD_CASES])
def test_bad_config_file_value_is_rejected(field_name, value, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"sae": {"matryoshka": True, field_name: value}}))
    with pytest.raises((UsageError, MatryoshkaConfigError)) as e:
        read_config_file(str(path))
    message = str(e.value)
    assert "\n" not in message
    assert field_name in message or repr(value) in message or str(value) in message, message


# -- hypothesis: any config dict is a valid config or one clean error ------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 100) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=6,
)
_field_names = st.sampled_from([*BAD_FIELD_VALUES, "k", "num_latents", "activation", "bogus"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sae=st.dictionaries(_field_names, _json_values, max_size=4))
def test_fuzzed_config_dicts_load_or_fail_with_one_line(sae, tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps({"sae": sae}))
    try:
        cfg = read_config_file(str(path))
    except (UsageError, MatryoshkaConfigError) as e:
        assert "\n" not in str(e) and str(e)
        return
    # Accepted: the result must satisfy the invariants the validation promises.
    sizes = list(cfg.sae.nested_sizes)
    assert all(isinstance(s, int) and s > 0 for s in sizes)
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert cfg.sae.num_prefixes >= 1 and cfg.sae.min_prefix >= 1
    assert cfg.sae.pareto_shape > 0 and not math.isnan(cfg.sae.pareto_shape)
    assert 0 <= cfg.sae.batch_topk_momentum < 1


def test_console_scripts_exit_cleanly(tmp_path):
    """A real process: the installed entry point keeps the contract too."""
    bindir = Path(sys.executable).parent
    for script, argv in [
        ("sparsify-matryoshka", ["gpt2", "data", "--prefix_schedule", "sometimes"]),
    ]:
        proc = subprocess.run([str(bindir / script), *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"{script}: error:"), proc.stderr
        assert list(tmp_path.iterdir()) == []
