"""Determinism of exports and attribution graphs: the same inputs give the same files."""

import json
from pathlib import Path

import torch

from matryoshka_plugin.cli.circuit_tracer import main
from matryoshka_plugin.cli.export import main as export_main

from tiny import NESTED, PROMPT, build_sparsify_run, build_tiny_llama


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _graph_tensors(pt: Path) -> dict:
    return torch.load(pt, weights_only=False)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _untimed(obj):
    """The JSON without wall-clock fields (``*_seconds``), which differ run to run."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def test_export_and_attribution_are_reproducible(tmp_path):
    llama = build_tiny_llama(tmp_path / "tiny-llama")
    build_sparsify_run(tmp_path / "run")
    outputs = []
    for name in ("a", "b"):
        # Same relative names: the export records its folder name as the scan.
        root = tmp_path / name
        export_main([str(tmp_path / "run"), str(root / "tc")])
        gdir, pt = root / "graphs", root / "pt" / "g.pt"
        main(["attribute", "--model", str(llama), "--transcoder_set", str(root / "tc"),
              "-p", PROMPT, "--prefix-len", str(NESTED[0]), "--slug", "g",
              "--graph_file_dir", str(gdir), "-o", str(pt)])
        outputs.append((root / "tc", gdir, pt.with_name(f"g-p{NESTED[0]}.pt")))
    (tc_a, g_a, pt_a), (tc_b, g_b, pt_b) = outputs
    assert _tree_bytes(tc_a) == _tree_bytes(tc_b)
    graph_a, graph_b = _graph_tensors(pt_a), _graph_tensors(pt_b)
    assert graph_a["adjacency_matrix"].abs().sum() > 0
    assert _same(graph_a, graph_b)
    json_a, json_b = _tree_bytes(g_a), _tree_bytes(g_b)
    assert json_a.keys() == json_b.keys() and "g-p8.json" in json_a
    for name in json_a:
        assert _untimed(json.loads(json_a[name])) == _untimed(json.loads(json_b[name])), name
