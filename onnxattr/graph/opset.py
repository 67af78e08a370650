"""The opset a prepared graph is written at: one that every runtime onnxattr supports can run
and the training builder can differentiate.

onnxruntime-training 1.19.2, the only runtime on Python <= 3.12 with the training build, runs
default-domain opsets up to 21 and IR versions up to 10; exporters now write 22 (torch) and 23
(jax2onnx). Opsets 22 and 23 changed almost no op's meaning: opset 22 added bfloat16 to the
float ops, opset 23 the 4-bit types to the shape and cast ops (ONNX 1.17 and 1.18 release
notes), and added new ops (Attention, RMSNormalization, RotaryEmbedding). So a newer model is
converted down to opset 21 (onnx.version_converter, whose adapters refuse an op that has no
earlier form) and stamped IR 10; an op that cannot go down is refused in one line naming it
when the runtime is too old to run the model as it is.
"""

import re

import onnx
import onnx.version_converter

from ..errors import OnnxAttrError
from ..io.model import default_opset
from .runtime import onnxruntime
from .toolkit import MAX_IR_VERSION, MIN_OPSET, at_least_opset

MAX_OPSET = 21  # the newest default-domain opset onnxruntime-training 1.19.2 runs
# the first stock onnxruntime that runs opset 23 (its release notes: ONNX 1.18 support)
RUNTIME_FOR_OPSET_23 = (1, 22)
_NO_PREVIOUS = re.compile(r"No Previous Version of (\w+)")


def fit_opset(model):
    """`model` at a default-domain opset from 17 (toolkit.MIN_OPSET) to 21 and IR <= 10 (a new
    copy when it changes); a model at a newer opset that cannot be converted down stays as it
    is when this onnxruntime runs it, else an OnnxAttrError naming the op."""
    model = at_least_opset(model)
    opset = default_opset(model)
    if opset > onnx.defs.onnx_opset_version():
        raise OnnxAttrError(f"the model uses opset {opset}, newer than any this onnx "
                            f"{onnx.__version__} knows (at most {onnx.defs.onnx_opset_version()}): "
                            "a damaged file, or re-export it at an opset onnx has released")
    if opset and opset > MAX_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MAX_OPSET)
        except Exception as err:  # noqa: BLE001 - onnx raises RuntimeError or its own types
            if _runtime_version() >= RUNTIME_FOR_OPSET_23:
                return model
            raise OnnxAttrError(_refusal(opset, err)) from None
    if model.ir_version > MAX_IR_VERSION:
        converted = onnx.ModelProto()
        converted.CopyFrom(model)
        converted.ir_version = MAX_IR_VERSION
        model = converted
    return model


def converts(model):
    """Whether fit_opset converts `model` with onnx's version converter (which reads its
    weights: a model whose weights are references is restored first)."""
    opset = default_opset(model)
    return 0 < opset < MIN_OPSET or opset > MAX_OPSET


def _runtime_version():
    version = getattr(onnxruntime, "__version__", "0.0")
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _refusal(opset, err):
    """One line on why a model at `opset` cannot run here."""
    message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    op = _NO_PREVIOUS.search(message)
    why = f"its op {op.group(1)} has no opset-{MAX_OPSET} form" if op else message
    version = getattr(onnxruntime, "__version__", "(none)")
    return (f"the model uses opset {opset}, which onnxruntime {version} cannot "
            f"run, and it cannot be converted to opset {MAX_OPSET}: {why} (install onnxruntime "
            ">= 1.22 for the native builder, or re-export the model at opset 21)")
