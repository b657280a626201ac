"""benchmarks/gpu/run.sh runs its CPU-safe parts without a GPU (the CI smoke test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([str(REPO / "benchmarks/gpu/run.sh"), "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "results.json").is_file()
    text = (tmp_path / "results.md").read_text()
    assert "batchtopk_fixed5" in text and "CLT: plain" in text and "Options of issue #19" in text
    # The issue-#19 options hold on the CPU as they must on the device.
    opts = json.loads((tmp_path / "results.json").read_text())["options"]
    a, p, t = opts["adaptive"], opts["permute"], opts["threshold"]
    assert a["sizes_dev"] != a["start"] and a["sizes_dev"] == a["sizes_ref"] == a["sizes_reloaded"]
    assert p["moved_latents"] > 0 and p["output_rel_err"] < 1e-5
    # Moving Adam's state gives the reordered step; moving the weights alone does not.
    assert p["step_rel_err_optimizer_moved"] < 1e-4 < 0.1 < p["step_rel_err_weights_only"]
    assert t["rule_rel_err_float32"] < 1e-5 and t["rule_updates_equal"] and t["updates"] == t["batches"]
