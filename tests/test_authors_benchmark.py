"""benchmarks/authors: the argument refusals, the budget plan and the batches the authors'
code gets, and (when their checkouts are at $MATRYOSHKA_AUTHORS_DIR) a tiny run of it.

$MATRYOSHKA_AUTHORS_DIR holds ``matryoshka_sae`` (bartbussmann/matryoshka_sae) and
``matryoshka-saes`` (noanabeshima/matryoshka-saes), read-only clones outside the repo.
"""

import json
import os
from unittest import mock
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.authors import run as R
from benchmarks.quality.bussmann_gap import lever_trainer
from matryoshka_plugin import MatryoshkaSparseCoderConfig
from matryoshka_plugin import fit as fit_module
from matryoshka_plugin.fit import fit_activations

AUTHORS_DIR = os.environ.get("MATRYOSHKA_AUTHORS_DIR")
BUSSMANN = Path(AUTHORS_DIR or "/nonexistent") / "matryoshka_sae"
NABESHIMA = Path(AUTHORS_DIR or "/nonexistent") / "matryoshka-saes"
needs_checkouts = pytest.mark.skipif(
    not (BUSSMANN / "sae.py").is_file() or not (NABESHIMA / "sae.py").is_file(),
    reason="set MATRYOSHKA_AUTHORS_DIR to a folder holding clones matryoshka_sae (bartbussmann) "
    "and matryoshka-saes (noanabeshima) to run the authors' code",
)


def fake_checkout(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "repo"
    d.mkdir()
    (d / "sae.py").write_text(text)
    return d


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--nabeshima", "/x"], "--bussmann is required: a local checkout of bartbussmann/matryoshka_sae"),
        (["--bussmann", "/no/such/dir", "--nabeshima", "/x"], "--bussmann /no/such/dir: no such directory"),
    ],
)
def test_missing_checkout_is_refused_in_one_line(argv, expected, capsys):
    assert R.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"run.py: error: {expected}"


def test_a_folder_that_is_not_the_repository_is_refused(tmp_path, capsys):
    wrong = fake_checkout(tmp_path, "class SomethingElse: pass\n")
    assert R.main(["--bussmann", str(wrong), "--rows", "bussmann_matryoshka"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"run.py: error: --bussmann {wrong} does not look like bartbussmann/matryoshka_sae: "
                   "sae.py lacks 'class GlobalBatchTopKMatryoshkaSAE'")
    assert err.count("\n") == 0


def test_only_the_checkouts_the_rows_need_are_required(tmp_path, capsys):
    # Plugin rows alone need neither checkout; the first bad value named is the row.
    assert R.main(["--rows", "matryoshka_fixed,nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("run.py: error: --rows 'nope' is unknown; allowed: topk,")


def test_smollm2_suite_needs_a_cache(capsys):
    assert R.main(["--rows", "topk", "--suite", "smollm2"]) == 2
    assert "--cache is required for the smollm2 suite" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(available=st.integers(64, 200_000), steps=st.integers(1, 3000), seqs=st.integers(1, 32))
def test_budget_plan_gives_exactly_the_steps(available, steps, seqs):
    batch = 64 * seqs
    if available < batch:
        with pytest.raises(ValueError, match="fewer than one batch"):
            R.plan_budget(available, steps, batch)
        return
    b = R.plan_budget(available, steps, batch)
    assert b.steps == steps
    assert b.rows * b.epochs == steps * batch  # every step a full batch, every epoch the same rows
    assert b.rows <= available and b.rows % 64 == 0
    # No fewer epochs would do: either too many rows or not dividing the steps.
    for e in range(1, b.epochs):
        assert steps % e or steps // e * batch > available


def test_budget_plan_matches_the_toy_benchmark():
    # benchmarks/toy trains 6 epochs of 65536 rows in batches of 512.
    suite = R.default_suite("toy")
    b = R.plan_budget(suite.available_rows, suite.steps, suite.batch_size)
    assert (b.rows, b.epochs, b.steps, suite.width, suite.k) == (65536, 6, 768, 48, 4)


@pytest.mark.parametrize("batch, steps", [(100, 10), (0, 10), (64, 0)])
def test_budget_plan_names_the_bad_value(batch, steps):
    with pytest.raises(ValueError, match=f"--(batch-size {batch}|steps {steps})"):
        R.plan_budget(10_000, steps, batch)


def test_bussmann_groups_are_the_plugin_nested_sizes():
    suite = R.default_suite("hard_toy")
    nested = MatryoshkaSparseCoderConfig(matryoshka=True).resolve_nested_sizes(suite.width, suite.k)
    cfg = R.bussmann_cfg(suite, 32, nested, seed=3)
    bounds = [sum(cfg["group_sizes"][: i + 1]) for i in range(len(cfg["group_sizes"]))]
    assert bounds == nested and bounds[-1] == suite.width == cfg["dict_size"]
    assert (cfg["top_k"], cfg["lr"], cfg["seed"], cfg["input_unit_norm"]) == (suite.k, suite.lr, 3, False)


def test_authors_get_the_batches_sparsify_trains_on(monkeypatch):
    """row_batches must be the rows fit_activations feeds sparsify, step by step."""
    seen = []
    original = fit_module._Site.forward

    def recording(self, inputs, targets):
        seen.append(inputs[..., 0].flatten().round().long().clone())
        return original(self, inputs, targets)

    monkeypatch.setattr(fit_module._Site, "forward", recording)
    n, batch = 256, 128
    x = torch.randn(n, 4)
    x[:, 0] = torch.arange(n, dtype=torch.float32)  # each row carries its index
    budget = R.plan_budget(n, 6, batch)
    fit_activations(x, MatryoshkaSparseCoderConfig(num_latents=8, k=2), batch_size=batch,
                    epochs=budget.epochs, seed=5, optimizer="adam", lr=1e-3)
    expected = R.row_batches(budget, batch, seed=5)
    seen = [rows for rows in seen if rows.numel() > 1]  # not the trainer's one-token probe at start
    assert len(seen) == budget.steps
    for step, rows in enumerate(seen):
        assert torch.equal(rows, expected[step])


def suite_entry(rows: list[str], lr: float) -> dict:
    return {"command": "c", "date": "d", "machine": "m", "adapter_max_abs_diff": {},
            "settings": {"lr": lr, "nabeshima_l0k_calibration": {}},
            "summary": {r: {"fvu_full": r} for r in rows}, "per_seed": {r: [] for r in rows}}


def test_merge_adds_rows_in_table_order_and_refuses_other_settings():
    merged = R.merge_rows(suite_entry(["topk", "bussmann_matryoshka"], 1e-3), suite_entry(["batch_topk"], 1e-3))
    assert list(merged["summary"]) == ["topk", "batch_topk", "bussmann_matryoshka"]
    assert [r["rows"] for r in merged["runs"]] == [["topk", "bussmann_matryoshka"], ["batch_topk"]]
    with pytest.raises(ValueError, match="cannot merge: setting 'lr' is 0.002 here but 0.001"):
        R.merge_rows(suite_entry(["topk"], 1e-3), suite_entry(["batch_topk"], 2e-3))


@needs_checkouts
def test_tiny_end_to_end_run(tmp_path):
    out = tmp_path / "out"
    rows = "matryoshka_fixed,bussmann_matryoshka,bussmann_batch_topk,nabeshima_matryoshka"
    code = R.main(["--bussmann", str(BUSSMANN), "--nabeshima", str(NABESHIMA), "--suite", "toy",
                   "--seeds", "0", "--steps", "12", "--rows", rows, "--out-dir", str(out)])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    for suite in ("toy", "hard_toy"):
        r = result["suites"][suite]
        assert r["settings"]["steps"] == 12
        assert list(r["summary"]) == rows.split(",")
        # The adapters reproduce the authors' own encode/decode.
        assert r["adapter_max_abs_diff"] and max(r["adapter_max_abs_diff"].values()) <= 1e-4
        for row, m in r["summary"].items():
            fvu = [v["mean"] for v in m["fvu_vs_prefix"].values()]
            assert all(0 <= f < 10 for f in fvu), (suite, row, fvu)
            assert 0 <= m["absorption_rate"]["mean"] <= 1
            assert m["ms_per_step"]["mean"] > 0
    assert (out / "table.md").read_text().count("| Bussmann Matryoshka |") == 2
    assert (out / "prefix_fvu.png").stat().st_size > 0


@needs_checkouts
def test_nabeshima_permutation_leaves_adam_state_behind():
    """The fact the RESULTS.md "authors" section states: his permute_latents looks for optimizer state in
    ``param_group["state"]``, which torch never fills, so Adam's moments stay in the old order."""
    module = R.load_sae_module(NABESHIMA, "nabeshima")
    torch.manual_seed(0)
    sae = module.MatryoshkaSAE(d_model=8, n_latents=16, n_prefixes=4, target_l0=2, n_steps=10, lr=1e-2)
    x = torch.randn(64, 8)
    sae.step(x)  # creates Adam's state
    moments = sae.optimizer.state[sae.W_enc]["exp_avg"]
    before = sae.W_enc.detach().clone()
    sae.step(x)
    assert not torch.equal(sae.W_enc.detach(), before)
    assert all("state" not in g for g in sae.optimizer.param_groups)
    # Adam updated its moment in place; a permutation would have put a new tensor there.
    assert sae.optimizer.state[sae.W_enc]["exp_avg"] is moments


def test_bussmann_gap_levers_take_effect():
    """Each of Bussmann's differences is really switched on in the trainer it builds:
    a frozen zero encoder bias, a constant learning rate, Adam beta2 0.99."""
    built = []

    class Recording(lever_trainer(("no_encoder_bias", "constant_lr", "beta2_099"))):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cfg = MatryoshkaSparseCoderConfig(num_latents=32, k=4, matryoshka=True)
    with mock.patch.object(fit_module, "MatryoshkaTrainer", Recording):
        coder = fit_activations(x, cfg, batch_size=128, epochs=2, optimizer="adam", lr=1e-2,
                                lr_warmup_steps=0)
    (trainer,) = built
    assert torch.count_nonzero(coder.encoder.bias) == 0
    assert coder.W_dec.abs().sum() > 0
    (adam,) = trainer.optimizers
    assert all(g["betas"][1] == 0.99 for g in adam.param_groups)
    assert all(g["lr"] == pytest.approx(1e-2) for g in adam.param_groups), "lr decayed"
