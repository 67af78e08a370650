"""The native gradient builder: reverse-mode differentiation of ONNX graphs in standard ops.

`build_native_gradient(model, wrt, relu_rule, output)` adds d(output)/d(wrt) to a model. Each
forward op type has one vector-Jacobian rule in `VJP_RULES`, registered with `@vjp` in the
module of its family; a new op is one function and one registration.
"""

from . import elementwise, linear, normalization, pooling, quantize, reductions, shapes  # noqa: F401
from .core import build_native_gradient
from .registry import VJP_RULES, Vjp, vjp

__all__ = ["build_native_gradient", "VJP_RULES", "Vjp", "vjp"]
