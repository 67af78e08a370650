"""onnxattr: gradient attribution maps for ONNX image classifiers, on ONNX Runtime.

The public API; every other module is internal.
"""

from ._version import __version__
from .compile import compile_model
from .errors import OnnxAttrError
from .explainer import Explainer, Explanation
from .figures import RenderOptions
from .report import run_audit
from .sanity import run_sanity

__all__ = ["Explainer", "Explanation", "RenderOptions", "run_audit", "run_sanity",
           "compile_model", "OnnxAttrError", "__version__"]
