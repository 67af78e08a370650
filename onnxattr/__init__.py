"""onnxattr: gradient attribution maps for ONNX image classifiers, on ONNX Runtime.

The public API; every other module is internal.
"""

from ._version import __version__
from .app.report import run_audit
from .app.sanity import run_sanity
from .errors import OnnxAttrError
from .methods.compile import compile_model
from .methods.explainer import Explainer, Explanation
from .methods.figures import RenderOptions

__all__ = ["Explainer", "Explanation", "RenderOptions", "run_audit", "run_sanity",
           "compile_model", "OnnxAttrError", "__version__"]
