"""Building d(score)/d(image) graphs with onnxruntime-training, and caching them on disk."""

import hashlib
import os
import re
from pathlib import Path

import onnx

from . import __version__
from .errors import OnnxAttrError
from .files import atomic_path
from .prepare import SCORE

_UNSUPPORTED = re.compile(r"not been registered: (\S+) for node (.*)")


def gradient_output(input_name):
    """Name of the builder's output holding d score / d `input_name`."""
    return f"{input_name}_grad"


def build_gradient_graph(scored, input_name):
    """The builder's graph for `scored` (a model with scalar output `score`).

    The result keeps every output of `scored` and adds `<input_name>_grad`.
    """
    try:
        import onnxruntime
        from onnxruntime.capi._pybind_state import GradientGraphBuilder
    except ImportError:
        raise OnnxAttrError("building gradient graphs needs onnxruntime-training "
                            "(pip install onnxruntime-training-cpu); stock onnxruntime can only "
                            "run compiled attribution models (onnxattr compile)") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        builder = GradientGraphBuilder(onnx.shape_inference.infer_shapes(scored).SerializeToString(), {SCORE}, {input_name}, SCORE,
                                       options)
        builder.build()
        gradient_graph = onnx.load_from_string(builder.get_model())
    except RuntimeError as err:
        raise OnnxAttrError(_builder_error(str(err))) from None
    outputs = {o.name for o in gradient_graph.graph.output}
    gradient_graph.graph.output.extend(o for o in scored.graph.output if o.name not in outputs)
    return gradient_graph


def _builder_error(message):
    unsupported = _UNSUPPORTED.search(message)
    if unsupported:
        op, node = unsupported.group(1), unsupported.group(2).strip() or "(unnamed)"
        return (f"the gradient builder cannot differentiate op {op} (node '{node}'); "
                "replace it in the model or file an issue")
    last_line = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    return f"the gradient builder failed: {last_line[-300:]}"


def default_cache_dir():
    """$ONNXATTR_CACHE, else ~/.cache/onnxattr."""
    return Path(os.environ.get("ONNXATTR_CACHE") or Path.home() / ".cache" / "onnxattr")


class GraphCache:
    """Built graphs on disk, keyed by the source model's content and the build options."""

    def __init__(self, directory=None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def path(self, model_digest, **options):
        key = "|".join([model_digest, __version__, *(f"{k}={options[k]}" for k in sorted(options))])
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"

    def get_or_build(self, build, model_digest, **options):
        """Load the graph for this key, or `build()` it and store it (atomically)."""
        path = self.path(model_digest, **options)
        if path.exists():
            try:
                return onnx.load(path)
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                path.unlink(missing_ok=True)
        graph = build()
        try:
            with atomic_path(path) as tmp:
                onnx.save(graph, tmp)
        except OSError:
            pass  # an unwritable cache only costs a rebuild next time
        return graph

