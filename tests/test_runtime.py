"""Sessions and batched runs (onnxattr.runtime), CPU-only: CUDA's options as they are passed
(TF32 off unless asked, cuDNN's heuristic algorithm search), fixed batches and padded chunks."""

import numpy as np
import pytest

from onnxattr import Explainer, OnnxAttrError, runtime

import small_models


class FakeSession:
    """Records the shapes it is run on; returns each feed's rows times 2."""

    def __init__(self):
        self.shapes = []

    def run(self, outputs, feeds):
        x = feeds["x"]
        self.shapes.append(x.shape)
        return [x * 2]


@pytest.fixture
def with_cuda(monkeypatch):
    """This onnxruntime, pretending to have the CUDA provider."""
    providers = [*runtime.onnxruntime.get_available_providers(), "CUDAExecutionProvider"]
    monkeypatch.setattr(runtime.onnxruntime, "get_available_providers", lambda: providers)


def test_cuda_is_float32_exact_unless_tf32_is_asked_for(with_cuda):
    (cuda, options), cpu = runtime.provider_options("cuda")
    assert cuda == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert options["use_tf32"] == "0"
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"  # no search per new input shape
    assert runtime.provider_options("cuda", "tf32")[0][1]["use_tf32"] == "1"
    assert runtime.provider_options("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(OnnxAttrError, match="unknown precision 'half'"):
        runtime.provider_options("cuda", "half")


def test_sessions_get_the_cuda_options(with_cuda, monkeypatch, tmp_path):
    seen = {}

    class Session:
        def __init__(self, model, options, providers):
            seen["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(runtime.onnxruntime, "InferenceSession", Session)
    runtime.make_session(small_models.conv_relu_maxpool_lrn(), "cuda")
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"use_tf32": "0",
                                                              "cudnn_conv_algo_search": "HEURISTIC"})
    runtime.make_session(small_models.conv_relu_maxpool_lrn(), "cuda", precision="tf32")
    assert seen["providers"][0][1]["use_tf32"] == "1"


def test_explainer_takes_the_precision(with_cuda, tmp_path):
    path = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "m.onnx")
    assert Explainer(path, device="cuda", precision="tf32").engine.precision == "tf32"
    with pytest.raises(OnnxAttrError, match="unknown precision"):
        Explainer(path, device="cuda", precision="fp8")


def test_fixed_batch_runs_exact_chunks_and_pads_the_last():
    session = FakeSession()
    x = np.arange(5, dtype=np.float32).reshape(5, 1)
    (out,) = runtime.run_batched(session, {"x": x}, ["y"], batch_size=4, fixed_batch=2)
    assert session.shapes == [(2, 1), (2, 1), (2, 1)]
    np.testing.assert_array_equal(out, x * 2)


def test_pad_last_keeps_one_shape_per_session():
    session = FakeSession()
    x = np.arange(7, dtype=np.float32).reshape(7, 1)
    (out,) = runtime.run_batched(session, {"x": x}, ["y"], batch_size=3, pad_last=True)
    assert session.shapes == [(3, 1)] * 3
    np.testing.assert_array_equal(out, x * 2)
    session = FakeSession()
    runtime.run_batched(session, {"x": x}, ["y"], batch_size=3)
    assert session.shapes == [(3, 1), (3, 1), (1, 1)]


def test_gpu_check_says_when_there_is_no_cuda(tmp_path):
    """scripts/gpu_check.py (the GPU benchmark) runs here up to the provider check: exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    if "CUDAExecutionProvider" in runtime.onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "CUDAExecutionProvider not available" in done.stderr
