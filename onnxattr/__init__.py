"""onnxattr: gradient attribution maps for ONNX image classifiers, on ONNX Runtime."""

__version__ = "0.1.0"

from .errors import OnnxAttrError  # noqa: E402
from .explainer import Explainer, Explanation  # noqa: E402

__all__ = ["Explainer", "Explanation", "OnnxAttrError", "__version__"]
