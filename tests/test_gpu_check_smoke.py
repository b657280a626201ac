"""benchmarks/gpu/run.sh runs its CPU-safe parts without a GPU (the CI smoke test)."""

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
    assert "batchtopk_fixed5" in text and "CLT: plain" in text
