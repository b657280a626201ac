"""Meta-SAE composition: known answers on planted decoders, and matryoshka-eval --meta-sae."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig
from matryoshka_plugin.cli.eval import main
from matryoshka_plugin.core.errors import UsageError
from matryoshka_plugin.evaluation import coder_meta_sae, meta_sae_composition

from cli_errors import fails_in_one_line


def sparse_combinations(n: int, d: int, atoms: int, per_row: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows, each a positive combination of ``per_row`` of ``atoms`` orthonormal atoms."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, atoms, generator=g))[0].T
    rows = []
    for _ in range(n):
        pick = torch.randperm(atoms, generator=g)[:per_row]
        rows.append((0.5 + torch.rand(per_row, generator=g)) @ basis[pick])
    return torch.stack(rows)


def test_rows_made_of_few_atoms_reconstruct_almost_exactly():
    rows = sparse_combinations(128, 32, atoms=8, per_row=2)
    result = meta_sae_composition(rows, [32, 128], meta_width=8, meta_k=2)
    assert result["fvu"] < 0.01
    assert result["mean_cosine"] > 0.99
    assert [lv["fvu"] < 0.01 for lv in result["levels"]] == [True, True]


@settings(max_examples=5, deadline=None)
@given(n=st.integers(16, 48), seed=st.integers(0, 1000))
def test_orthonormal_rows_cannot_be_explained_by_few_directions(n, seed):
    # meta_width directions span at most meta_width of the n orthogonal unit rows' squared
    # norm, whatever the training: FVU >= 1 - meta_width / n.
    g = torch.Generator().manual_seed(seed)
    rows = torch.linalg.qr(torch.randn(n + 8, n, generator=g))[0].T
    result = meta_sae_composition(rows, [n // 2, n], meta_width=4, meta_k=2, steps=200)
    assert result["fvu"] >= 1 - 4 / n - 1e-5
    level_sse = sum(lv["fvu"] * lv["n_rows"] for lv in result["levels"])
    assert level_sse == pytest.approx(result["fvu"] * n, rel=1e-5)  # levels add up


def test_same_seed_same_answer_and_scale_does_not_matter():
    rows = sparse_combinations(64, 16, atoms=6, per_row=2, seed=3)
    a, again, scaled = (meta_sae_composition(r, [64], meta_width=6, meta_k=2, steps=300, seed=1)
                        for r in (rows, rows, 5 * rows))
    assert a == again
    assert scaled["fvu"] == pytest.approx(a["fvu"], abs=1e-5)  # only the rows' directions count


@pytest.mark.parametrize("kwargs, match", [
    ({"meta_k": 0}, "meta_k=0"),
    ({"meta_width": 2, "meta_k": 3}, "meta_k=3 exceeds meta_width=2"),
    ({"steps": 0}, "meta_steps=0"),
    ({"lr": -1.0}, "meta_lr=-1.0"),
])
def test_bad_options_name_the_value(kwargs, match):
    with pytest.raises(UsageError, match=match):
        meta_sae_composition(torch.randn(8, 4), [8], **kwargs)


def test_bad_levels_are_refused():
    with pytest.raises(UsageError, match="must increase"):
        meta_sae_composition(torch.randn(8, 4), [4, 2, 8])


@pytest.fixture(scope="module")
def coder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    torch.manual_seed(0)
    cfg = MatryoshkaSparseCoderConfig(num_latents=32, k=4, matryoshka=True, nested_sizes=[8, 32])
    coder = MatryoshkaSparseCoder(8, cfg)
    coder.save_to_disk(root / "coder")
    save_file({"inputs": torch.randn(200, 8)}, str(root / "data.safetensors"))
    return root


def test_coder_levels_default_to_its_nested_sizes(coder_dir):
    from matryoshka_plugin.adapters.sparsify import load_coder

    result = coder_meta_sae(load_coder(coder_dir / "coder"), steps=20)
    assert [(lv["start"], lv["end"]) for lv in result["levels"]] == [(0, 8), (8, 32)]
    assert result["settings"]["meta_width"] == 4  # 32 / 8


def test_cli_writes_the_meta_sae_section(coder_dir, tmp_path):
    out = tmp_path / "eval.json"
    rc = main([str(coder_dir / "coder"), "--data", str(coder_dir / "data.safetensors"), "--out", str(out),
               "--rsa-samples", "0", "--meta-sae", "--meta-steps", "30", "--prefix-lens", "16"])
    assert rc == 0
    section = json.loads(out.read_text())["meta_sae"]
    assert [(lv["start"], lv["end"]) for lv in section["levels"]] == [(0, 16), (16, 32)]
    assert 0 <= section["fvu"] and -1 <= section["mean_cosine"] <= 1


@pytest.mark.parametrize("extra, match", [
    (["--meta-k", "0"], "--meta-k 0 must be at least 1"),
    (["--meta-width", "0"], "--meta-width 0 must be at least 1"),
    (["--meta-steps", "-3"], "--meta-steps -3 must be at least 1"),
    (["--meta-width", "2", "--meta-k", "3"], "--meta-k 3 exceeds --meta-width 2"),
])
def test_cli_bad_meta_values_are_one_line_without_output(coder_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "eval.json"
    argv = [str(coder_dir / "coder"), "--data", str(coder_dir / "data.safetensors"), "--out", str(out),
            "--meta-sae", *extra]
    fails_in_one_line(main, capsys, argv, match)
    assert list(tmp_path.iterdir()) == []
