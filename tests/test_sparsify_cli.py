"""The sparsify-matryoshka CLI end to end on tiny local models, and its bad-input contract."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from sparsify import SparseCoder

from matryoshka_plugin import load_coder
from matryoshka_plugin.cli.sparsify import main

FAST = ["--ctx_len", "32", "--batch_size", "2", "--max_examples", "8", "--log_to_wandb", "false",
        "--data_preprocessing_num_proc", "1", "--num_latents", "32", "--k", "4", "--device", "cpu",
        "--optimizer", "adam", "--lr_warmup_steps", "1"]


def hookpoint_of(model_dir):
    return "h.0.mlp" if "gpt2" in model_dir.name else "layers.0.mlp"


def test_cli_trains_from_text_files_with_a_yaml_config(tmp_path, tiny_model_dir, text_dir):
    hook = hookpoint_of(tiny_model_dir)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "sae": {"matryoshka": True, "transcode": True, "nested_sizes": [8, 16]},
        "hookpoints": [hook],
    }))
    main([str(tiny_model_dir), str(text_dir), "--config_path", str(config),
          "--save_dir", str(tmp_path / "ck"), "--run_name", "r", *FAST])
    coder = load_coder(tmp_path / "ck" / "r" / hook)
    assert coder.cfg.matryoshka and coder.cfg.transcode and coder.nested_sizes == [8, 16, 32]
    SparseCoder.load_from_disk(tmp_path / "ck" / "r" / hook)


def test_saved_config_json_feeds_back_and_resume_reads_save_dir(tmp_path, tiny_llama_dir, text_dir):
    ck = tmp_path / "elsewhere"
    args = [str(tiny_llama_dir), str(text_dir), "--layers", "0", "--matryoshka", "true",
            "--prefix_schedule", "pareto", "--save_dir", str(ck), "--run_name", "r", *FAST]
    main(args)
    saved = json.loads((ck / "r" / "config.json").read_text())
    assert saved["layers"] and saved["hookpoints"]  # upstream writes both back
    # With a stride, the saved hookpoints are already strided: reading the file back
    # must keep them all, not stride them again.
    strided = tmp_path / "strided.json"
    strided.write_text(json.dumps({**saved, "layers": [0, 1], "layer_stride": 2,
                                   "hookpoints": ["layers.0", "layers.1"]}))
    from matryoshka_plugin.adapters.sparsify.run_config import read_config_file

    reread = read_config_file(str(strided))
    assert reread.hookpoints == ["layers.0", "layers.1"] and reread.layer_stride == 1
    sampler_before = torch.load(ck / "r" / "matryoshka_state.pt", weights_only=False)
    # The saved file, fed back with --resume, continues from {save_dir}/{run_name}.
    main([str(tiny_llama_dir), str(text_dir), "--config_path", str(ck / "r" / "config.json"),
          "--resume", "true", *FAST, "--max_examples", "12"])
    state = torch.load(ck / "r" / "state.pt", weights_only=True)
    assert state["global_step"] > 4
    sampler_after = torch.load(ck / "r" / "matryoshka_state.pt", weights_only=False)
    key = "layers.0"
    assert not torch.equal(
        sampler_before[key]["sampler"]["generator"], sampler_after[key]["sampler"]["generator"]
    )


def assert_one_line_error(returncode, stderr, message):
    """Exit 2, a single error line naming the problem as the last line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert sum("error:" in line for line in lines) == 1 and "error:" in lines[-1], lines
    assert message in lines[-1], lines[-1]
    assert "Traceback" not in stderr


BAD = [
    (["--nested_sizes", "8", "4"], "strictly increasing"),
    (["--prefix_schedule", "geometric"], "invalid choice: 'geometric'"),
    (["--nested_sizes", "8", "64"], "exceed the width"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "tpu9"], "--device 'tpu9'"),
    (["--resume", "true"], "no checkpoint to resume"),
    (["--layers", "0", "--hookpoints", "layers.0.mlp"], "contradict"),
    (["--config_path", "{cfg_bad_yaml}"], "does not parse"),
    (["--config_path", "{cfg_unknown}"], "unknown field sae.bogus"),
    (["--config_path", "{cfg_bad_literal}"], "sae.prefix_schedule='nope' is not allowed"),
    (["--config_path", "{cfg_missing}"], "no such file"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_gives_one_line_exit_2_and_no_checkpoint(
    tmp_path, tiny_llama_dir, text_dir, extra, message, capsys
):
    files = {
        "cfg_bad_yaml": ("bad.yaml", "sae: {matryoshka: true\n  oops"),
        "cfg_unknown": ("u.yaml", "sae:\n  bogus: 1\n"),
        "cfg_bad_literal": ("l.json", json.dumps({"sae": {"prefix_schedule": "nope"}})),
    }
    subs = {key: str(tmp_path / name) for key, (name, _) in files.items()}
    for name, text in files.values():
        (tmp_path / name).write_text(text)
    subs["cfg_missing"] = str(tmp_path / "missing.yaml")
    extra = [a.format(**subs) for a in extra]
    ck = tmp_path / "ck"
    argv = [str(tiny_llama_dir), str(text_dir), "--matryoshka", "true", "--layers", "0",
            *FAST, "--save_dir", str(ck), *extra]
    if "--hookpoints" in extra:
        argv.remove("--layers"), argv.remove("0")
        argv += ["--layers", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, message)
    assert not ck.exists()


def test_save_to_disk_dataset_without_the_text_column(tmp_path, tiny_llama_dir, capsys):
    from datasets import Dataset

    from tiny import CORPUS

    Dataset.from_dict({"text": [CORPUS] * 3}).save_to_disk(str(tmp_path / "ds"))
    argv = [str(tiny_llama_dir), str(tmp_path / "ds"), *FAST, "--save_dir", str(tmp_path / "ck")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--text_column", "body"])
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, "--text_column 'body'")
    assert not (tmp_path / "ck").exists()
    main([*argv, "--layers", "0"])  # the same folder with the right column trains
    assert (tmp_path / "ck" / "unnamed" / "layers.0" / "sae.safetensors").is_file()


def test_missing_dataset_and_model_are_named(tmp_path, tiny_llama_dir, text_dir, capsys):
    for model, data, message in [
        (str(tmp_path / "nope.gguf"), str(text_dir), "nope.gguf"),
        (str(tiny_llama_dir), str(tmp_path / "nodata"), "nodata"),
        (str(tiny_llama_dir), str(tmp_path), "holds no .txt files"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([model, data, *FAST, "--save_dir", str(tmp_path / "ck")])
        assert_one_line_error(exit_info.value.code, capsys.readouterr().err, message)
        assert not (tmp_path / "ck").exists()


def test_help_lists_every_sparsify_flag_plus_ours():
    from simple_parsing import ArgumentParser
    from sparsify.__main__ import RunConfig

    upstream = ArgumentParser()
    upstream.add_arguments(RunConfig, dest="run")
    flags = {o for a in upstream._actions for o in a.option_strings}
    # A real process: the console entry point, not just main().
    result = subprocess.run(
        [sys.executable, "-m", "matryoshka_plugin.cli.sparsify", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0
    for flag in flags | {"--config_path", "--matryoshka", "--nested_sizes", "--prefix_schedule", "--device"}:
        assert flag in result.stdout, flag
