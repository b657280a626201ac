"""Bad input on the training side (issue #13): sparsify-matryoshka's config checks, resume
files, saved coders read by matryoshka-eval, fit_activations and the crash-safe writers.

Same contract as ``test_reliability_inputs``: a non-zero exit, exactly one
``<prog>: error: ...`` line naming the bad value, no traceback, no new files.
"""

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_reliability_inputs import _expect_rejected, _files, work  # noqa: F401 (fixture)

from matryoshka_plugin.adapters.sparsify import (
    MatryoshkaSparseCoder,
    MatryoshkaSparseCoderConfig,
    MatryoshkaTrainConfig,
    load_coder,
)
from matryoshka_plugin.adapters.sparsify.run_config import read_config_file
from matryoshka_plugin.adapters.sparsify.trainer import MATRYOSHKA_STATE_FILE
from matryoshka_plugin.atomic import atomic_dir, atomic_write_text, commit_dir, staging_dir
from matryoshka_plugin.core.errors import CheckpointError, MatryoshkaConfigError, UsageError
from matryoshka_plugin.fit import fit_activations

TINY = ["--ctx_len", "32", "--batch_size", "2", "--max_examples", "8", "--log_to_wandb", "false",
        "--data_preprocessing_num_proc", "1", "--num_latents", "32", "--k", "4", "--device", "cpu",
        "--optimizer", "adam", "--lr_warmup_steps", "1"]


def _acts(rows=256, d=16, seed=0):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


MATRYOSHKA = MatryoshkaSparseCoderConfig(matryoshka=True, num_latents=32, k=4, nested_sizes=[8, 16])


# -- 1. resume loads only tensors and plain data ----------------------------------------


class _WritesMarker:
    """Unpickling this calls ``Path.touch(marker)``: what a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_crafted_pickle_and_runs_none_of_it(tmp_path):
    fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path, optimizer="adam")
    marker = tmp_path / "pwned"
    torch.save({"site": _WritesMarker(marker)}, tmp_path / "fit" / MATRYOSHKA_STATE_FILE)
    with pytest.raises(CheckpointError, match=MATRYOSHKA_STATE_FILE) as e:
        fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path,
                        optimizer="adam", resume=True)
    assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing_optimizer", "corrupt_state", "wrong_shape", "truncated_weights"])
def test_resume_refuses_a_damaged_checkpoint_in_one_line(damage, tmp_path):
    fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path, optimizer="adam")
    run = tmp_path / "fit"
    if damage == "missing_optimizer":
        (run / "optimizer_0.pt").unlink()
    elif damage == "corrupt_state":
        (run / "state.pt").write_bytes(b"not a zip")
    elif damage == "wrong_shape":
        save_file({"encoder.weight": torch.zeros(3, 3)}, str(run / "site" / "sae.safetensors"))
    else:
        weights = run / "site" / "sae.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path,
                        optimizer="adam", resume=True)
    assert "\n" not in str(e.value) and str(run) in str(e.value)


# -- 3. a nested loss that would never be optimised is refused everywhere ---------------


@pytest.mark.parametrize("loss_fn", ["ce", "kl"])
def test_matryoshka_with_an_end_to_end_loss_is_refused_in_every_entry_point(loss_fn, tmp_path):
    expected = f"loss_fn={loss_fn!r} with matryoshka=true"
    with pytest.raises(MatryoshkaConfigError, match=expected):
        MatryoshkaTrainConfig(sae=MATRYOSHKA, loss_fn=loss_fn)
    with pytest.raises(MatryoshkaConfigError, match=expected):
        fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, loss_fn=loss_fn)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"sae": {"matryoshka": True}, "loss_fn": loss_fn}))
    with pytest.raises(MatryoshkaConfigError, match=expected):
        read_config_file(str(path))
    # Without the nested loss, ce/kl train as upstream's do.
    MatryoshkaTrainConfig(sae=MatryoshkaSparseCoderConfig(batch_topk=True), loss_fn=loss_fn)


# -- sparsify-matryoshka: a table of bad flags, files and checkpoints -------------------


@pytest.fixture(scope="module")
def trained_run(tiny_llama_dir, text_dir, tmp_path_factory):
    """A finished one-layer Matryoshka run of the tiny model (trained once per module)."""
    from matryoshka_plugin.cli.sparsify import main

    save_dir = tmp_path_factory.mktemp("trained")
    main([str(tiny_llama_dir), str(text_dir), "--layers", "0", "--matryoshka", "true",
          "--save_dir", str(save_dir), "--run_name", "r", *TINY])
    return save_dir / "r"


@pytest.fixture
def train_work(work, tiny_llama_dir, text_dir, trained_run):
    """``work`` plus the tiny model, texts, damaged copies of a run and broken inputs."""
    import shutil

    import datasets

    datasets.disable_progress_bars()  # tokenising prints bars on stderr, not error lines
    (work / "model").symlink_to(tiny_llama_dir)
    (work / "texts").symlink_to(text_dir)
    (work / "empty.txt").write_text("")
    (work / "short.txt").write_text("a few words")
    (work / "wide" / "layers.0").mkdir(parents=True)
    save_file({"encoder.weight": torch.zeros(64, 16)}, str(work / "wide" / "layers.0" / "sae.safetensors"))
    for name, damage in {
        "ck_corrupt": lambda d: (d / "state.pt").write_bytes(b"junk"),
        "ck_noopt": lambda d: (d / "optimizer_0.pt").unlink(),
        "ck_pickle": lambda d: torch.save({"layers.0": _WritesMarker(work / "pwned")},
                                          d / MATRYOSHKA_STATE_FILE),
    }.items():
        shutil.copytree(trained_run, work / name / "r")
        damage(work / name / "r")
    yield work
    datasets.enable_progress_bars()


# training_run.load_data must call run_config.chunk_and_tokenize_checked for these.
RUN = ["model", "texts", *TINY]
TRAIN_CASES = [
    (["gpt2", "data", "--loss_fn", "ce", "--matryoshka", "true"], "loss_fn='ce'"),
    (["gpt2", "data", "--loss_fn", "kl", "--matryoshka", "true"], "loss_fn='kl'"),
    (["gpt2", "data", "--k", "0"], "k=0"),
    (["gpt2", "data", "--num_latents", "-3"], "num_latents=-3"),
    (["gpt2", "data", "--num_latents", "8", "--k", "16"], "k=16"),
    (["gpt2", "data", "--batch_size", "0"], "batch_size=0"),
    (["gpt2", "data", "--save_every", "0"], "save_every=0"),
    (["gpt2", "data", "--grad_acc_steps", "0"], "grad_acc_steps=0"),
    (["gpt2", "data", "--micro_acc_steps", "0"], "micro_acc_steps=0"),
    (["gpt2", "data", "--ctx_len", "-5"], "ctx_len=-5"),
    (["gpt2", "data", "--max_examples", "-1"], "max_examples=-1"),
    (["gpt2", "data", "--max_examples", "0"], "max_examples=0"),
    (["gpt2", "data", "--lr", "nan"], "lr=nan"),
    (["gpt2", "data", "--lr", "-1"], "lr=-1"),
    (["gpt2", "data", "--lr", "inf"], "lr=inf"),
    (["gpt2", "data", "--auxk_alpha", "nan"], "auxk_alpha=nan"),
    (["gpt2", "data", "--layers", "-1"], "[-1]"),
    (["gpt2", "data", "--layer_stride", "0"], "layer_stride=0"),
    (["gpt2", "data", "--init_seeds"], "seed"),
    (["gpt2", "data", "--activation", "relu"], "relu"),
    (["gpt2", "data", "--level_weights", "nan", "1"], "level_weights"),
    (["gpt2", "data", "--group_fractions", "nan", "1"], "group_fractions"),
    # these need the model or the data
    ([*RUN, "--layers", "99"], "[99]"),
    ([*RUN, "--hookpoints", "layers.0.mlpp"], "layers.0.mlpp"),
    ([*RUN, "--batch_size", "64"], "batch_size 64"),
    (["model", "empty.txt", *TINY], "empty.txt"),
    (["model", "short.txt", *TINY], "short.txt"),
    (["model", "missing.bin", *TINY], "missing.bin"),
    ([*RUN, "--layers", "0", "--finetune", "wide"], "wide/layers.0/sae.safetensors"),
    ([*RUN, "--layers", "0", "--resume", "true", "--save_dir", "ck_corrupt", "--run_name", "r"], "ck_corrupt"),
    ([*RUN, "--layers", "0", "--resume", "true", "--save_dir", "ck_noopt", "--run_name", "r"], "optimizer_0.pt"),
    ([*RUN, "--layers", "0", "--matryoshka", "true", "--resume", "true", "--save_dir", "ck_pickle",
      "--run_name", "r"], MATRYOSHKA_STATE_FILE),
]


def _train_id(case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(argv[2:] if argv[:2] == ["gpt2", "data"] else [argv[1], *argv[len(RUN):]])[:80]


@pytest.mark.parametrize("argv,names", TRAIN_CASES, ids=[_train_id(c) for c in TRAIN_CASES])
def test_sparsify_matryoshka_bad_input_is_one_line(argv, names, train_work, capsys):
    _expect_rejected(capsys, train_work, "sparsify-matryoshka", argv, names)
    assert not (train_work / "pwned").exists()


def test_memmap_check_names_the_file(tmp_path):
    from matryoshka_plugin.adapters.sparsify.run_config import check_memmap_file

    with pytest.raises(UsageError, match="missing.bin"):
        check_memmap_file(tmp_path / "missing.bin", 32)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(UsageError, match="3 bytes"):
        check_memmap_file(tmp_path / "odd.bin", 32)
    (tmp_path / "ok.bin").write_bytes(bytes(128))
    check_memmap_file(tmp_path / "ok.bin", 32)


# -- matryoshka-eval: saved cfg.json values ---------------------------------------------

CFG_CASES = [
    ("null", None, "NoneType"),
    ("number", 3, "int 3"),
    ("string", "x", "str 'x'"),
    ("list", [1], "list"),
    ("unsorted", {"nested_sizes": [16, 8]}, "[16, 8]"),
    ("duplicated", {"nested_sizes": [8, 8]}, "[8, 8]"),
    ("above_width", {"nested_sizes": [8, 64]}, "[8, 64]"),
    ("k_above_width", {"k": 64}, "k=64"),
    ("k_zero", {"k": 0}, "k=0"),
    ("activation", {"activation": "relu"}, "relu"),
    ("schedule", {"prefix_schedule": "sometimes"}, "sometimes"),
    ("neg_latents", {"num_latents": -5}, "num_latents=-5"),
    ("huge_latents", {"num_latents": 10**12}, "1000000000000"),
    ("neg_d_in", {"d_in": -1}, "d_in=-1"),
    ("huge_d_in", {"d_in": 10**9}, "1000000000"),
    ("str_d_in", {"d_in": "16"}, "d_in='16'"),
    ("no_d_in", {"d_in": None}, "d_in=None"),
    ("list_k", {"k": [4]}, "k=[4]"),
    ("threshold", {"batch_topk_threshold": "high"}, "high"),
    ("adapted_not_adaptive", {"adapted_nested_sizes": [4, 12, 32]}, "adapted_nested_sizes=[4, 12, 32]"),
    ("adapted_unsorted", {"prefix_schedule": "adaptive", "adapted_nested_sizes": [12, 4, 32]}, "[12, 4, 32]"),
    ("adapted_short", {"prefix_schedule": "adaptive", "adapted_nested_sizes": [4, 32]}, "[4, 32]"),
    ("adapted_past_width", {"prefix_schedule": "adaptive", "adapted_nested_sizes": [4, 12, 64]}, "[4, 12, 64]"),
    ("adapted_string", {"prefix_schedule": "adaptive", "adapted_nested_sizes": "8,16"}, "'8,16'"),
]


@pytest.fixture
def eval_work(work):
    good = json.loads((work / "run" / "layers.0.mlp" / "cfg.json").read_text())
    for name, change, _ in CFG_CASES:
        d = work / f"cfg_{name}"
        d.mkdir()
        (d / "sae.safetensors").write_bytes((work / "run" / "layers.0.mlp" / "sae.safetensors").read_bytes())
        cfg = {**good, **change} if isinstance(change, dict) else change
        (d / "cfg.json").write_text(json.dumps(cfg))
    nan = MatryoshkaSparseCoder(16, MATRYOSHKA)
    with torch.no_grad():
        nan.W_dec[0, 0] = float("nan")
    nan.save_to_disk(work / "nan_coder")
    return work


@pytest.mark.parametrize("name,change,names", CFG_CASES, ids=[c[0] for c in CFG_CASES])
def test_matryoshka_eval_refuses_a_bad_cfg_json(name, change, names, eval_work, capsys):
    _expect_rejected(capsys, eval_work, "matryoshka-eval", [f"cfg_{name}", "--data", "acts.safetensors"], names)


def test_matryoshka_eval_refuses_a_coder_with_nan_weights(eval_work, capsys):
    _expect_rejected(capsys, eval_work, "matryoshka-eval", ["nan_coder", "--data", "acts.safetensors"], "W_dec")


def test_eval_report_json_is_valid_with_undefined_metrics(tmp_path):
    from matryoshka_plugin.evaluation.report import json_ready

    text = json.dumps(json_ready({"a": float("nan"), "b": [1.0, float("inf")], "c": (2, "x")}),
                      allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": [2, "x"]}


_json = st.recursive(
    # Small integers often: 0 and negatives are where sizes and counts go wrong.
    st.none() | st.booleans() | st.integers(-2, 2) | st.integers(-10, 10**13) | st.floats(allow_nan=True)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_cfg_json_loads_or_fails_with_a_checkpoint_error(data, tmp_path_factory):
    """Any JSON as cfg.json, or any one field of a good one changed: a coder or one clean line."""
    d = tmp_path_factory.mktemp("coder")
    MatryoshkaSparseCoder(16, MATRYOSHKA).save_to_disk(d / "c")
    good = json.loads((d / "c" / "cfg.json").read_text())
    if data.draw(st.booleans()):
        cfg = data.draw(_json)
    else:
        cfg = {**good, data.draw(st.sampled_from(sorted(good))): data.draw(_json)}
    (d / "c" / "cfg.json").write_text(json.dumps(cfg))
    try:
        coder = load_coder(d / "c")
    except UsageError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert coder.num_latents == 32 and coder.d_in == 16


# Edge values first: a field is far more often wrong at 0, -1, NaN or Inf than anywhere else.
_edges = st.sampled_from([0, -1, 1, 2, float("nan"), float("inf"), -0.5, 1e-3, "ce", "kl", "fvu"])
_train_fields = st.sampled_from([
    "batch_size", "grad_acc_steps", "micro_acc_steps", "save_every", "ctx_len", "max_examples",
    "lr", "auxk_alpha", "layers", "layer_stride", "loss_fn", "init_seeds", "k_decay_steps",
    "lr_warmup_steps", "dead_feature_threshold", "hookpoints",
])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=st.dictionaries(_train_fields, _edges | _json, max_size=4),
       sae=st.dictionaries(st.sampled_from(["k", "num_latents", "expansion_factor", "activation",
                                            "matryoshka", "nested_sizes"]),
                           st.booleans() | _edges | _json, max_size=3),
       as_yaml=st.booleans())
def test_fuzzed_run_config_files_load_or_fail_with_one_line(top, sae, as_yaml, tmp_path):
    import yaml

    path = tmp_path / ("fuzz.yaml" if as_yaml else "fuzz.json")
    path.write_text(yaml.safe_dump({**top, "sae": sae}) if as_yaml else json.dumps({**top, "sae": sae}))
    try:
        cfg = read_config_file(str(path))
    except UsageError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert cfg.batch_size >= 1 and cfg.save_every >= 1 and cfg.grad_acc_steps >= 1
    assert cfg.ctx_len >= 1 and (cfg.max_examples is None or cfg.max_examples >= 1)
    assert cfg.lr is None or 0 < cfg.lr < float("inf")
    assert cfg.sae.k >= 1 and all(i >= 0 for i in cfg.layers)
    assert not (cfg.sae.matryoshka and cfg.loss_fn in ("ce", "kl"))


# -- fit_activations ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_activations_refuses_non_finite_rows(bad, tmp_path):
    x = _acts()
    x[17, 3] = bad
    with pytest.raises(UsageError, match="row 17"):
        fit_activations(x, MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fit_activations_refuses_lr_nan():
    with pytest.raises(MatryoshkaConfigError, match="lr=nan"):
        fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, lr=float("nan"))


def test_fit_activations_checks_its_save_dir_before_training(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    trained = []
    monkeypatch.setattr("matryoshka_plugin.fit.MatryoshkaTrainer.fit", lambda self: trained.append(1))
    with pytest.raises(UsageError, match="file.txt is a file"):
        fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path / "file.txt" / "out")
    assert not trained


def test_a_second_run_on_the_same_directory_is_refused_at_once(tmp_path):
    from matryoshka_plugin.atomic import run_lock

    with run_lock(tmp_path / "fit"):
        with pytest.raises(UsageError, match=f"PID {os.getpid()}"):
            fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path)
    # Released with the block: the run goes ahead.
    fit_activations(_acts(), MATRYOSHKA, batch_size=64, seq_len=16, save_dir=tmp_path)
    assert (tmp_path / "fit" / "site" / "cfg.json").is_file()


def test_run_lock_is_exclusive_between_threads_of_open_files(tmp_path):
    from matryoshka_plugin.atomic import run_lock

    errors = []

    def second():
        try:
            with run_lock(tmp_path / "r"):
                pass
        except UsageError as e:
            errors.append(str(e))

    with run_lock(tmp_path / "r"):
        t = threading.Thread(target=second)
        t.start()
        t.join()
    assert len(errors) == 1 and "in use" in errors[0]


# -- atomic writes: links, files and modes --------------------------------------------


def test_a_symlinked_or_file_run_directory_is_refused_not_replaced(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep").write_text("x")
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "afile").write_text("y")
    for target, names in ((tmp_path / "link", "symbolic link"), (tmp_path / "afile", "is a file")):
        before = _files(tmp_path)
        with pytest.raises(UsageError, match=names):
            with atomic_dir(target) as tmp:
                (tmp / "new").write_text("z")
        assert _files(tmp_path) == before
        tmp = staging_dir(target)
        with pytest.raises(UsageError, match=names):
            commit_dir(tmp, target)
    assert (tmp_path / "link").is_symlink() and (real / "keep").is_file()
    assert (tmp_path / "afile").read_text() == "y"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_and_directories_follow_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner").write_text("x")
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask


def test_check_writable_dir(tmp_path):
    from matryoshka_plugin.atomic import check_writable_dir

    check_writable_dir(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []  # probed, nothing created
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_writable_dir(tmp_path / "f" / "out")
