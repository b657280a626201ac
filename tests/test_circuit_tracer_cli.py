"""End to end: tiny Llama directory -> matryoshka-export -> circuit-tracer-matryoshka
with several --prefix-len -> graph files that circuit-tracer's local server serves; and
the one-line errors for bad input."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
from circuit_tracer.graph import Graph

from matryoshka_plugin.cli.circuit_tracer import main
from matryoshka_plugin.cli.export import main as export_main

from tiny import NESTED, PROMPT, WIDTH, build_exported_transcoders, build_sparsify_run


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, *build_exported_transcoders(root)


def _attribute(llama, tc, *extra):
    main(["attribute", "--model", str(llama), "--transcoder_set", str(tc), "-p", PROMPT, *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    return lines[0]


def _feature_indices(graph_json) -> list[int]:
    return [
        int(n["node_id"].split("_")[1])
        for n in graph_json["nodes"]
        if n["feature_type"] == "cross layer transcoder"
    ]


def test_help_lists_prefix_len(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["attribute", "--help"])
    assert exc.value.code == 0
    assert "--prefix-len P [P ...]" in capsys.readouterr().out


def test_cli_writes_one_served_graph_per_prefix(paths, capsys):
    from circuit_tracer.frontend.local_server import serve

    root, llama, tc = paths
    gdir, pt = root / "graphs", root / "pt" / "france.pt"
    prefix_lens = [WIDTH, NESTED[0], 2]
    _attribute(llama, tc, "--prefix-len", *map(str, prefix_lens), "--slug", "france",
               "--graph_file_dir", str(gdir), "-o", str(pt))
    out = capsys.readouterr().out
    assert "replacement" in out and "completeness" in out

    meta = json.loads((gdir / "graph-metadata.json").read_text())["graphs"]
    assert [g["slug"] for g in meta] == [f"france-p{p}" for p in prefix_lens]
    scores = json.loads((gdir / "france.scores.json").read_text())
    for entry, score, p in zip(meta, scores, prefix_lens):
        assert entry["prefix_len"] == score["prefix_len"] == p
        assert entry["nested_sizes"] == [*NESTED, WIDTH]
        assert 0 <= entry["replacement_score"] <= 1 and 0 <= entry["completeness_score"] <= 1
        graph_json = json.loads((gdir / f"france-p{p}.json").read_text())
        assert graph_json["metadata"]["slug"] == f"france-p{p}"
        assert all(f < p for f in _feature_indices(graph_json))
        graph = Graph.from_pt(str(pt.with_name(f"france-p{p}.pt")))
        assert (graph.active_features[:, 2] < p).all()
    assert _feature_indices(json.loads((gdir / f"france-p{WIDTH}.json").read_text()))

    # A second prompt into the same data directory keeps the first graphs.
    _attribute(llama, tc, "--prefix-len", "4", "--slug", "paris", "--graph_file_dir", str(gdir))
    slugs = [g["slug"] for g in json.loads((gdir / "graph-metadata.json").read_text())["graphs"]]
    assert slugs == [f"france-p{p}" for p in prefix_lens] + ["paris-p4"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(data_dir=str(gdir), port=port)
    try:
        base = f"http://127.0.0.1:{port}/data"
        served = json.load(urllib.request.urlopen(f"{base}/graph-metadata.json", timeout=10))
        assert [g["slug"] for g in served["graphs"]] == slugs
        graph_json = json.load(urllib.request.urlopen(f"{base}/france-p{NESTED[0]}.json", timeout=10))
        assert graph_json["nodes"] and graph_json["links"]
    finally:
        server.stop()


@pytest.mark.parametrize("bad", ["0", "-1", str(WIDTH + 1)])
def test_prefix_len_out_of_range_is_a_one_line_error(paths, capsys, bad):
    root, llama, tc = paths
    gdir = root / f"bad-{bad}"
    with pytest.raises(SystemExit) as exc:
        _attribute(llama, tc, "--prefix-len", "4", bad, "--slug", "x", "--graph_file_dir", str(gdir))
    assert exc.value.code == 2
    assert f"prefix length {bad} is out of range; allowed: 1..{WIDTH}" in _error_line(capsys)
    assert not gdir.exists()


def test_corrupt_and_missing_transcoder_files(paths, capsys, tmp_path):
    import shutil

    root, llama, tc = paths
    broken = tmp_path / "broken"
    shutil.copytree(tc, broken)
    (broken / "layer_0.safetensors").write_bytes(b"\x00garbage")
    gdir = tmp_path / "g"
    with pytest.raises(SystemExit) as exc:
        _attribute(llama, broken, "--prefix-len", "4", "--slug", "x", "--graph_file_dir", str(gdir))
    assert exc.value.code == 2
    assert "layer_0.safetensors is not a readable safetensors file" in _error_line(capsys)
    (broken / "layer_0.safetensors").unlink()
    with pytest.raises(SystemExit):
        _attribute(llama, broken, "--prefix-len", "4", "--slug", "x", "--graph_file_dir", str(gdir))
    assert "layer_0.safetensors .. layer_N.safetensors" in _error_line(capsys)
    with pytest.raises(SystemExit):
        _attribute(llama, tmp_path / "absent", "--slug", "x", "--graph_file_dir", str(gdir))
    assert "config.yaml" in _error_line(capsys) or "not a directory" in capsys.readouterr().err
    assert not gdir.exists()


def test_width_mismatch_is_a_one_line_error(paths, capsys, tmp_path):
    root, llama, _ = paths
    build_sparsify_run(tmp_path / "run8", d_in=8)
    export_main([str(tmp_path / "run8"), str(tmp_path / "tc8")])
    gdir = tmp_path / "g"
    with pytest.raises(SystemExit) as exc:
        _attribute(llama, tmp_path / "tc8", "--prefix-len", "4", "--slug", "x", "--graph_file_dir", str(gdir))
    assert exc.value.code == 2
    assert "d_model=8" in _error_line(capsys)
    assert not gdir.exists()


def test_non_matryoshka_transcoders_warn_but_run(paths, tmp_path):
    root, llama, _ = paths
    build_sparsify_run(tmp_path / "plain", matryoshka=False)
    export_main([str(tmp_path / "plain"), str(tmp_path / "tcp")])
    with pytest.warns(UserWarning, match="non-Matryoshka dictionary are arbitrary"):
        _attribute(llama, tmp_path / "tcp", "--prefix-len", "4", "-o", str(tmp_path / "g.pt"))
    graph = Graph.from_pt(str(tmp_path / "g-p4.pt"))
    assert (graph.active_features[:, 2] < 4).all()
    assert json.loads((tmp_path / "g.scores.json").read_text())[0]["nested_sizes"] is None


def test_export_cli_bad_input(paths, capsys, tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    root, _, tc = paths
    with pytest.raises(SystemExit) as exc:
        export_main([str(root / "run"), str(tc)])
    assert exc.value.code == 2 and "already exists" in _error_line(capsys)
    sae = SparseCoder(16, SparseCoderConfig(num_latents=32, k=4))
    sae.save_to_disk(tmp_path / "sae" / "layers.0.mlp")
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "sae"), str(tmp_path / "out")])
    assert "transcode=False" in _error_line(capsys)
    with pytest.raises(SystemExit):
        export_main([str(root / "run"), str(tmp_path / "out"), "--activation", "jumprelu"])
    assert "needs calibration" in _error_line(capsys)
    assert not (tmp_path / "out").exists()
