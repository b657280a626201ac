"""Parity: patched upstream (this venv) against the plugin (its own venv).

The patched packages import as ``sparsify`` / ``circuit_tracer``, the same names as the
stock packages the plugin builds on, and the plugin's subclasses would stack on top of
the patched classes (the patched forward would call the plugin's overrides). So each
side runs in its own process and venv, and the tensors cross over as safetensors files.
Both sides run the same torch build, one thread, deterministic algorithms. Graphs,
checkpoint layouts, configs, integer tensors and the sampler state are compared
exactly; floating-point losses, gradients and weights to float32 rounding
(rtol 1e-5, atol 1e-6): the plugin subtracts ``b_dec`` from the target once where the
patch adds it to every level, which moves the last bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
PLUGIN_PYTHON = os.environ.get("PLUGIN_PYTHON")
PATCHED_PYTHON = os.environ.get("PATCHED_PYTHON", sys.executable)

pytestmark = pytest.mark.skipif(
    not PLUGIN_PYTHON, reason="run through integration_tests/run.sh (PLUGIN_PYTHON unset)"
)


def run_side(python: str, script: str, *args) -> None:
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [python, str(HERE / script), *map(str, args)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, f"{script} {args[:2]} failed:\n{proc.stderr[-4000:]}"


def assert_same_tensors(ours: dict, theirs: dict, what: str, exact: bool = True) -> None:
    assert sorted(ours) == sorted(theirs), f"{what}: different tensor names"
    for key in ours:
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {key} {a.shape} vs {b.shape}"
        if key.endswith("latent_indices") or key.endswith("latent_acts"):
            # topk(sorted=False) may list the same latents in another order
            a, order_a = ours[key.replace("acts", "indices")].sort(dim=-1)
            b, order_b = theirs[key.replace("acts", "indices")].sort(dim=-1)
            if key.endswith("latent_acts"):
                a, b = ours[key].gather(-1, order_a), theirs[key].gather(-1, order_b)
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), f"{what}: {key} differs"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {key}: {m}")


# -- sparsify --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparsify_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsify")
    run_side(PLUGIN_PYTHON, "sparsify_side.py", "--side", "plugin", root / "plugin")
    run_side(
        PATCHED_PYTHON, "sparsify_side.py", "--side", "patched", root / "patched",
        "--other", root / "plugin",
    )
    cases = json.loads((root / "plugin" / "cases.json").read_text())
    return root / "plugin", root / "patched", cases


def sparsify_cases():
    sys.path.insert(0, str(HERE))
    try:
        from sparsify_side import CASES, TRAIN_CASES
    finally:
        sys.path.pop(0)
    return list(CASES), TRAIN_CASES


CASE_NAMES, TRAIN_NAMES = sparsify_cases()


@pytest.mark.parametrize("case", CASE_NAMES)
def test_losses_outputs_and_gradients_match(sparsify_runs, case):
    plugin, patched, _ = sparsify_runs
    ours = load_file(str(patched / f"{case}.safetensors"))
    theirs = load_file(str(plugin / f"{case}.safetensors"))
    assert any(k.startswith("0.grad.") for k in ours)  # gradients were recorded
    exact = {k: v for k, v in ours.items() if k == "sampler_state"}
    assert_same_tensors(exact, {k: theirs[k] for k in exact}, case)
    assert_same_tensors(ours, theirs, case, exact=False)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_coder_checkpoints_match_and_cross_load(sparsify_runs, case):
    plugin, patched, _ = sparsify_runs
    ours, theirs = patched / case / "coder", plugin / case / "coder"
    assert json.loads((ours / "cfg.json").read_text()) == json.loads((theirs / "cfg.json").read_text())
    assert_same_tensors(
        load_file(str(ours / "sae.safetensors")), load_file(str(theirs / "sae.safetensors")),
        case, exact=False,
    )
    # the plugin's checkpoint, loaded by the patched stock-API loader, runs identically
    # (eval mode: same weights, same code path, so exactly)
    loaded = load_file(str(patched / f"{case}.loaded.safetensors"))
    recorded = load_file(str(plugin / f"{case}.safetensors"))
    assert torch.equal(loaded["eval.sae_out"], recorded["eval.sae_out"])
    assert torch.equal(loaded["eval.fvu"], recorded["eval.fvu"])
    assert torch.equal(loaded["nested_sizes"], recorded["nested_sizes"])


@pytest.mark.parametrize("case", TRAIN_NAMES)
def test_trainer_checkpoints_match(sparsify_runs, case):
    plugin, patched, _ = sparsify_runs
    ours, theirs = patched / f"train-{case}" / "run", plugin / f"train-{case}" / "run"
    for hook in ("h.0", "h.1"):
        assert json.loads((ours / hook / "cfg.json").read_text()) == json.loads(
            (theirs / hook / "cfg.json").read_text()
        )
        assert_same_tensors(
            load_file(str(ours / hook / "sae.safetensors")),
            load_file(str(theirs / hook / "sae.safetensors")),
            f"{case}/{hook}",
            exact=False,
        )
    assert torch.load(ours / "state.pt") == torch.load(theirs / "state.pt")
    opt_ours = torch.load(ours / "optimizer_0.pt", weights_only=False)["state"]
    opt_theirs = torch.load(theirs / "optimizer_0.pt", weights_only=False)["state"]
    assert opt_ours.keys() == opt_theirs.keys()
    for i in opt_ours:
        for name, value in opt_ours[i].items():
            torch.testing.assert_close(value, opt_theirs[i][name], rtol=1e-4, atol=1e-7)
    m_ours = torch.load(ours / "matryoshka_state.pt", weights_only=False)
    m_theirs = torch.load(theirs / "matryoshka_state.pt", weights_only=False)
    assert m_ours.keys() == m_theirs.keys()
    for hook in m_ours:
        assert torch.equal(
            m_ours[hook]["sampler"]["generator"], m_theirs[hook]["sampler"]["generator"]
        )
        torch.testing.assert_close(
            m_ours[hook]["batch_topk_threshold"], m_theirs[hook]["batch_topk_threshold"]
        )


# -- circuit-tracer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuit_tracer")
    run_side(PLUGIN_PYTHON, "circuit_tracer_side.py", "--side", "plugin", root / "plugin")
    run_side(PATCHED_PYTHON, "circuit_tracer_side.py", "--side", "patched", root / "patched")
    return root / "plugin", root / "patched"


def graph_files():
    sys.path.insert(0, str(HERE))
    try:
        from circuit_tracer_side import PREFIX_LENS
    finally:
        sys.path.pop(0)
    return [f"{kind}-P{p or 'full'}" for kind in ("per_layer", "clt") for p in PREFIX_LENS]


@pytest.mark.parametrize("graph", graph_files())
def test_graphs_match(graph_runs, graph):
    plugin, patched = graph_runs
    ours = load_file(str(patched / f"{graph}.safetensors"))
    theirs = load_file(str(plugin / f"{graph}.safetensors"))
    assert_same_tensors(ours, theirs, graph)
    prefix = graph.rsplit("-P", 1)[1]
    if prefix != "full":
        assert (ours["active_features"][:, 2] < int(prefix)).all()
