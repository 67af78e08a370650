"""examples/tour.py, run as a user runs it, top to bottom, on a small labelled classifier."""

import os
import subprocess
import sys
from pathlib import Path

TOUR = Path(__file__).resolve().parents[1] / "examples" / "tour.py"


def test_tour_runs_top_to_bottom(small_classifier):
    tmp_path, model, photo = small_classifier
    done = subprocess.run([sys.executable, str(TOUR), str(model), str(photo), "--out",
                           str(tmp_path / "tour")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ONNXATTR_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "tour").iterdir()) == [
        "gradient.onnx", "gradient.png", "methods.png"]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("class ") and "apple" in done.stdout  # the model's labels
    assert any(line.startswith("occlusion ") for line in lines)
    faithfulness = [line for line in lines if "deletion AUC" in line]
    assert [line.split(" deletion")[0].strip() for line in faithfulness] == [
        "gradient", "random", "gradient (inverted)", "guided-backprop", "random",
        "guided-backprop (inverted)"], faithfulness
    # the compiled model in onnxruntime alone gives the explainer's gradient
    difference = float(lines[-1].rsplit(" ", 1)[1])
    assert lines[-1].startswith("compiled model:") and difference <= 1e-6


def test_tour_says_a_missing_model_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(TOUR), str(tmp_path / "absent.onnx"), "--out",
                           str(tmp_path / "tour")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: model file not found: {tmp_path / 'absent.onnx'}"]
