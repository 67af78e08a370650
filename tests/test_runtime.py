"""Sessions and batched runs (onnxattr.graph.runtime), CPU-only: CUDA's options as they are passed
(TF32 off unless asked, cuDNN's heuristic algorithm search), fixed batches and padded chunks."""

import numpy as np
import pytest

from onnxattr import Explainer, OnnxAttrError
from onnxattr.graph import runtime

import small_models


class FakeSession:
    """Records the shapes it is run on; returns each feed's rows times 2."""

    def __init__(self, threads=None):
        self.threads = threads
        self.shapes = []

    def run(self, outputs, feeds):
        x = feeds["x"]
        self.shapes.append(x.shape)
        return [x * 2]


def fake_pool(monkeypatch, threads=2, workers=None, device="cpu", fixed_batch=None):
    """A SessionPool of FakeSessions; `made` lists them in the order they were made."""
    made = []

    def make_session(model, device, threads, precision, weights=None):
        made.append(FakeSession(threads))
        return made[-1]
    monkeypatch.setattr(runtime, "make_session", make_session)
    return runtime.SessionPool(None, device, threads, workers=workers,
                               fixed_batch=fixed_batch), made


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
        def __init__(self, model, options, providers, disabled_optimizers=()):
            seen["providers"] = providers

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(runtime.onnxruntime, "InferenceSession", Session)
    runtime.make_session(small_models.conv_relu_maxpool_lrn(), "cuda")
    assert seen["providers"][0] == ("CUDAExecutionProvider", {"use_tf32": "0",
                                                              "cudnn_conv_algo_search": "HEURISTIC"})
    runtime.make_session(small_models.conv_relu_maxpool_lrn(), "cuda", precision="tf32")
    assert seen["providers"][0][1]["use_tf32"] == "1"


def test_explainer_takes_the_precision(with_cuda, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "make_session", lambda *args, **kwargs: None)  # the CUDA is pretended
    path = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "m.onnx")
    assert Explainer(path, device="cuda", precision="tf32").engine.precision == "tf32"
    with pytest.raises(OnnxAttrError, match="unknown precision"):
        Explainer(path, device="cuda", precision="fp8")


def test_fixed_batch_runs_exact_chunks_and_pads_the_last(monkeypatch):
    pool, made = fake_pool(monkeypatch, workers=1, fixed_batch=2)
    x = np.arange(5, dtype=np.float32).reshape(5, 1)
    (out,) = pool.run({"x": x}, ["y"], batch_size=4)
    assert made[0].shapes == [(2, 1), (2, 1), (2, 1)] and len(made) == 1
    np.testing.assert_array_equal(out, x * 2)


def test_cuda_pads_the_last_chunk_to_keep_one_shape_per_session(monkeypatch):
    pool, made = fake_pool(monkeypatch, device="cuda")
    x = np.arange(7, dtype=np.float32).reshape(7, 1)
    (out,) = pool.run({"x": x}, ["y"], batch_size=3)
    assert made[0].shapes == [(3, 1)] * 3 and len(made) == 1
    np.testing.assert_array_equal(out, x * 2)
    pool, made = fake_pool(monkeypatch, workers=1)
    pool.run({"x": x}, ["y"], batch_size=3)  # CPU: no padding, chunks of even size
    assert made[0].shapes == [(2, 1), (3, 1), (2, 1)]


def test_workers_share_the_threads_and_split_each_batch(monkeypatch):
    """Two workers run the halves of a batch at once, in order; a single chunk, or a run too
    short to start the workers' sessions, runs on the session with all the threads; sessions
    are made only when needed."""
    pool, made = fake_pool(monkeypatch, threads=4, workers=2)
    x = np.arange(11, dtype=np.float32).reshape(11, 1)
    pool.run({"x": x[:1]}, ["y"])
    (out,) = pool.run({"x": x[:7]}, ["y"], batch_size=4)  # under 4 rows per worker
    np.testing.assert_array_equal(out, x[:7] * 2)
    assert [s.threads for s in made] == [4] and made[0].shapes == [(1, 1), (4, 1), (3, 1)]
    (out,) = pool.run({"x": x}, ["y"], batch_size=8)
    np.testing.assert_array_equal(out, x * 2)
    whole, first, second = made
    assert (first.threads, second.threads) == (2, 2) and len(whole.shapes) == 3
    assert first.shapes == [(4, 1), (4, 1)] and second.shapes == [(3, 1)]
    (out,) = pool.run({"x": x[:6]}, ["y"])  # the workers exist: any run of 2+ rows uses them
    assert len(made) == 3 and first.shapes[-1] == second.shapes[-1] == (3, 1)
    np.testing.assert_array_equal(out, x[:6] * 2)
    pool, made = fake_pool(monkeypatch, threads=4, workers=2)
    pool.run({"x": x}, ["y"], batch_size=8)
    assert [s.threads for s in made] == [2, 2]  # no session with all the threads unused


@pytest.mark.parametrize("option", [{"workers": 0}, {"workers": "2"}, {"threads": -1},
                                    {"threads": True}, {"workers": 1.5}])
def test_thread_and_worker_counts_are_checked(option, tmp_path):
    path = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "m.onnx")
    with pytest.raises(OnnxAttrError, match="must be a whole number of at least 1"):
        Explainer(path, **option)


def test_default_workers():
    assert runtime.default_workers("cpu", 2) == 2 and runtime.default_workers("cpu", 8) == 2
    assert runtime.default_workers("cpu", 1) == 1 and runtime.default_workers("cuda", 8) == 1


def test_workers_give_the_same_gradients_as_one_session(tmp_path):
    path = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "m.onnx")
    pixels = np.random.default_rng(5).uniform(0, 255, (10, 3, 8, 8)).astype(np.float32)
    targets = np.arange(10) % 3
    gradients = {}
    for workers in (1, 2):
        engine = Explainer(path, cache_dir=tmp_path, threads=2, workers=workers).engine
        gradients[workers] = engine.gradient(pixels, targets, batch_size=8)[0]
        (pool,) = engine._gradient_sessions.values()
        assert len(pool._parts) == (2 if workers == 2 else 0)  # 10 rows: 3, 4, 3 on 2 lanes
    np.testing.assert_allclose(gradients[1], gradients[2], rtol=1e-5, atol=1e-8)


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


@pytest.mark.parametrize("total,most", [(50, 16), (1, 16), (16, 16), (17, 16), (81, 16), (7, 1)])
def test_even_chunks_are_the_fewest_and_differ_by_at_most_one_row(total, most):
    bounds = runtime.even_chunks(total, most)
    sizes = [end - start for start, end in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert len(bounds) == -(-total // most) and max(sizes) <= most and max(sizes) - min(sizes) <= 1
