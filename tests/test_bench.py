"""Smoke tests of the benchmark script on a tiny configuration, so it cannot rot (no timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_runs_and_both_sides_agree(googlenet_path, googlenet_caffe_dir, tmp_path):
    """The timed table (memory is measured in child processes, one per case and side: that
    part is smoke-tested below on one case)."""
    pytest.importorskip("captum")
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--model", str(googlenet_path),
                    "--caffe", str(googlenet_caffe_dir), "--repeats", "1", "--ig-steps", "4",
                    "--ig-batch-sizes", "4", "--cases", "forward,gradient,gradient-native",
                    "--no-memory", "--json", str(out)], check=True, capture_output=True,
                   text=True, env={**os.environ, "ONNXATTR_CACHE": str(tmp_path / "cache")})
    (report,) = json.loads(out.read_text())["models"]
    assert report["model"] == "googlenet"
    assert [r["case"] for r in report["rows"]] == ["forward", "gradient", "gradient-native"]
    for row in report["rows"]:
        assert row["onnxattr_s"] > 0 and row["captum_s"] > 0
        assert row["relative_l2"] < 2e-2, row
    assert report["gradient_over_forward"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("side", ["onnxattr", "captum"])
def test_bench_child_reports_its_peak_memory(side, googlenet_path, googlenet_caffe_dir, tmp_path):
    if side == "captum":
        pytest.importorskip("captum")
    result = subprocess.run([sys.executable, str(BENCH), "--child", "googlenet", side, "gradient",
                             "--model", str(googlenet_path), "--caffe", str(googlenet_caffe_dir),
                             "--out", str(tmp_path)], check=True, capture_output=True, text=True,
                            env={**os.environ, "ONNXATTR_CACHE": str(tmp_path / "cache")})
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    # before_mb is taken with the model loaded: the gradient call allocates beyond it
    assert memory["peak_mb"] > memory["before_mb"] > 0
