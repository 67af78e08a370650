"""ONNX Runtime sessions on CPU or CUDA, and batched runs of a graph."""

import numpy as np

from .errors import OnnxAttrError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxAttrError("onnxruntime is not installed (pip install onnxruntime-training-cpu, "
                            "or onnxruntime / onnxruntime-gpu for compiled models)") from None
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def require_provider(device):
    """The execution provider for `device`, or an OnnxAttrError if this onnxruntime lacks it."""
    if device not in PROVIDERS:
        raise OnnxAttrError(f"unknown device '{device}' (choose {' or '.join(PROVIDERS)})")
    ort = _onnxruntime()
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise OnnxAttrError(f"device '{device}' needs {provider}, which this onnxruntime "
                            f"({ort.__version__}) does not have; available: "
                            f"{', '.join(ort.get_available_providers())}")
    return provider


def make_session(model, device="cpu", threads=None):
    """An InferenceSession for `model` (ModelProto) on `device`; CUDA never silently falls back."""
    provider = require_provider(device)
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = [provider] + (["CPUExecutionProvider"] if device != "cpu" else [])
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types per build
        raise OnnxAttrError(f"onnxruntime cannot load the graph: {str(err).strip().splitlines()[-1]}"
                            ) from None
    if provider not in session.get_providers():
        raise OnnxAttrError(f"{provider} failed to load (CUDA or cuDNN libraries missing?); "
                            "refusing to run on CPU instead")
    return session


def run_batched(session, feeds, outputs, batch_size=None):
    """Run `session` on `feeds` (arrays sharing batch axis 0) in chunks; concatenate `outputs`."""
    total = len(next(iter(feeds.values())))
    step = batch_size or total
    chunks = [session.run(outputs, {k: v[i:i + step] for k, v in feeds.items()})
              for i in range(0, total, step)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(outputs))]
