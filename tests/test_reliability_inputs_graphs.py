"""Bad input for the graph-side scripts (issue #13): ``circuit-tracer-matryoshka attribute``,
``matryoshka-global`` and ``matryoshka-clt train --resume``.

The contract and its checker are test_reliability_inputs.py's (``_expect_rejected``): a
non-zero exit, one ``prog: error:`` line naming the bad value, no traceback, and no new
file anywhere under the working directory. The inputs are built once per module (a
tiny Llama, exported transcoders, a sparsify run, a CLT cache and checkpoint) and each
broken variant is a copy with one thing wrong.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from matryoshka_plugin.cli.clt import main as clt_main
from matryoshka_plugin.cli.export import main as export_main
from matryoshka_plugin.cli.global_graph import main as global_main
from test_correctness_clt import RunsCode
from test_reliability_inputs import MAINS, _expect_rejected
from tiny import PROMPT, WORDS, build_sparsify_run, build_tiny_llama, random_model, tiny_config

# The shared checker dispatches on the program name.
MAINS["matryoshka-global"] = global_main

CLT_FLAGS = ["--batch_size", "64", "--num_latents", "32", "--k", "4", "--nested_sizes", "8", "16",
             "--lr", "1e-3", "--holdout_fraction", "0"]


def _copy_with(root: Path, src: str, name: str, mutate) -> None:
    shutil.copytree(root / src, root / name)
    mutate(root / name)


def _set_yaml(path: Path, **kw) -> None:
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **kw}))


def _set_json(path: Path, **kw) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **kw}))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from matryoshka_plugin.clt import cache_activations

    root = tmp_path_factory.mktemp("bad-graph-inputs")
    (root / "file.txt").write_text("a regular file\n")
    build_tiny_llama(root / "llama")
    build_sparsify_run(root / "run")
    export_main([str(root / "run"), str(root / "tc")])
    _copy_with(root, "tc", "tc_stray", lambda d: (d / "layer_x.safetensors").write_bytes(b"x"))
    _copy_with(root, "tc", "tc_collide", lambda d: shutil.copy(d / "layer_1.safetensors", d / "layer_01.safetensors"))
    _copy_with(root, "tc", "tc_bigk", lambda d: _set_yaml(d / "config.yaml", topk_k=999))
    _copy_with(root, "tc", "tc_hook", lambda d: _set_yaml(d / "config.yaml", feature_input_hook="mlp.hook_bogus"))
    (root / "corpus.txt").write_text(" ".join(random.Random(0).choice(WORDS) for _ in range(300)))
    for name, kw in {
        "unsorted": dict(nested_sizes=[16, 8]),
        "duplicated": dict(nested_sizes=[8, 8]),
        "above_width": dict(nested_sizes=[8, 64]),
        "k_above_width": dict(k=999),
    }.items():
        _copy_with(root, "run", f"run_{name}", lambda d, kw=kw: _set_json(d / "layers.0.mlp" / "cfg.json", **kw))

    g = torch.Generator().manual_seed(0)
    batches = (torch.randint(4, 64, (8, 17), generator=g) for _ in range(8))
    model = random_model(tiny_config("llama", 64, d_model=16, n_layers=2))
    cache_activations(model, batches, [0, 1], root / "cache", n_tokens=1024, show_progress=False)
    assert clt_main(["train", "--cache", str(root / "cache"), "--save_dir", str(root / "clt_run"),
                     "--max_steps", "2", *CLT_FLAGS]) == 0
    ckpt = Path("checkpoint")
    for name, mutate in {
        "garbage_state": lambda d: (d / ckpt / "state.pt").write_bytes(b"\x00garbage" * 10),
        "truncated_state": lambda d: (d / ckpt / "state.pt").write_bytes((d / ckpt / "state.pt").read_bytes()[:100]),
        "missing_state": lambda d: (d / ckpt / "state.pt").unlink(),
        "code_state": lambda d: torch.save({"optimizer": RunsCode(d / "MARKER")}, d / ckpt / "state.pt"),
        "keyless_state": lambda d: torch.save({"step": 2}, d / ckpt / "state.pt"),
        "missing_config": lambda d: (d / ckpt / "config.json").unlink(),
        "truncated_weights": lambda d: (d / ckpt / "clt.safetensors").write_bytes(b"\x08\x00"),
        "checkpoint_is_file": lambda d: (shutil.rmtree(d / ckpt), (d / ckpt).write_text("x")),
    }.items():
        _copy_with(root, "clt_run", f"clt_{name}", mutate)
    return root


@pytest.fixture
def work(root, monkeypatch):
    monkeypatch.chdir(root)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _attribute(tc: str, *extra: str) -> list[str]:
    return ["attribute", "--model", "llama", "--transcoder_set", tc, *extra]


def _global(run: str) -> list[str]:
    return [run, "--corpus", "corpus.txt", "--model", "llama", "--prefix-len", "8", "--out", "out", "--ctx-len", "16"]


def _resume(run: str, *extra: str) -> list[str]:
    return ["train", "--cache", "cache", "--save_dir", run, "--max_steps", "4", "--resume", "true", *CLT_FLAGS, *extra]


# (prog, argv, text the error line must hold). Paths are relative to the module directory.
CASES = [
    ("circuit-tracer-matryoshka", _attribute("tc", "-p", "", "-o", "g.pt"), "prompt ''"),
    ("circuit-tracer-matryoshka", _attribute("tc", "-p", " ".join(["the"] * 80), "-o", "g.pt"), "n_ctx=64"),
    ("circuit-tracer-matryoshka", _attribute("tc", "-p", PROMPT, "-o", "file.txt/x.pt"), "file.txt"),
    ("circuit-tracer-matryoshka", _attribute("tc", "-p", PROMPT, "--slug", "s", "--graph_file_dir", "file.txt/d"), "file.txt"),
    ("circuit-tracer-matryoshka", _attribute("tc_stray", "-p", PROMPT, "-o", "g.pt"), "layer_x.safetensors"),
    ("circuit-tracer-matryoshka", _attribute("tc_collide", "-p", PROMPT, "-o", "g.pt"), "layer_01.safetensors"),
    ("circuit-tracer-matryoshka", _attribute("tc_bigk", "-p", PROMPT, "-o", "g.pt"), "topk_k=999"),
    ("circuit-tracer-matryoshka", _attribute("tc_hook", "-p", PROMPT, "-o", "g.pt"), "mlp.hook_bogus"),
    ("matryoshka-global", _global("run_unsorted"), "[16, 8]"),
    ("matryoshka-global", _global("run_duplicated"), "[8, 8]"),
    ("matryoshka-global", _global("run_above_width"), "[8, 64]"),
    ("matryoshka-global", _global("run_k_above_width"), "k=999"),
    ("matryoshka-clt", ["train", "--cache", "cache", "--save_dir", "file.txt/run", *CLT_FLAGS], "file.txt"),
    ("matryoshka-clt", _resume("clt_garbage_state"), "state.pt"),
    ("matryoshka-clt", _resume("clt_truncated_state"), "state.pt"),
    ("matryoshka-clt", _resume("clt_missing_state"), "state.pt"),
    ("matryoshka-clt", _resume("clt_code_state"), "plain data"),
    ("matryoshka-clt", _resume("clt_keyless_state"), "state.pt"),
    ("matryoshka-clt", _resume("clt_missing_config"), "config.json"),
    ("matryoshka-clt", _resume("clt_truncated_weights"), "clt.safetensors"),
    ("matryoshka-clt", _resume("clt_checkpoint_is_file"), "checkpoint"),
    ("matryoshka-clt", [*_resume("clt_run"), "--num_latents", "64"], "same CLT config"),
]


@pytest.mark.parametrize("prog,argv,names", CASES, ids=[f"{p}:{' '.join(a)}"[:90] for p, a, _ in CASES])
def test_bad_graph_input_is_rejected_with_one_line(prog, argv, names, work, capsys):
    _expect_rejected(capsys, work, prog, argv, names)
    assert not any(work.rglob("MARKER")), "a state file ran code"
