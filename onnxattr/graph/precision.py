"""Deployed numeric formats, adapted once in preparation so that every builder and method sees a
float32 graph that takes float32 pixels.

- float16 and bfloat16 models are cast to float32 as a whole (initializers, Constant values,
  Cast targets, declared types, in subgraphs too): the forward and the backward then run in
  float32 on the model's own (exactly representable) weights. This is a deliberate choice over
  a float16 forward with a float32 backward: one graph for both, no float16 kernels needed on
  CPU, and a gradient at float32's error; the price is that the forward differs from the
  model's own float16 forward by float16's rounding of its activations (measured in
  docs/bring-your-model.md).
- An image input of uint8 or int8 whose only readers are Casts to a float type (the cast inside
  the graph) is declared float32: the Casts then pass float pixels through.
"""

import onnx
from onnx import TensorProto, numpy_helper

from ..errors import OnnxAttrError
from .toolkit import attribute

HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
INTEGER_PIXELS = (TensorProto.UINT8, TensorProto.INT8)
FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, *HALF)
_TYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype",
                    "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                    "RandomUniformLike": "dtype"}


def to_float32(model, image):
    """Adapt `model` (in place) so that it computes in float32 from a float32 input `image`."""
    graph = model.graph
    declared = next(i for i in graph.input if i.name == image).type.tensor_type
    if declared.elem_type in INTEGER_PIXELS:
        _float_pixels(graph, image, declared)
    if _uses_half(graph):
        _graph_to_float32(graph)


def _float_pixels(graph, image, declared):
    """Declare an integer image input float32 when it is only cast to a float type."""
    for node in graph.node:
        if image in node.input and not (
                node.op_type == "Cast" and attribute(node, "to") in FLOATS):
            kind = TensorProto.DataType.Name(declared.elem_type).lower()
            raise OnnxAttrError(f"the {kind} image input '{image}' is read by {node.op_type} "
                                f"node '{node.name}', not only cast to a float type: onnxattr "
                                "cannot differentiate with respect to integer pixels")
    declared.elem_type = TensorProto.FLOAT


def _uses_half(graph):
    values = (*graph.input, *graph.output, *graph.value_info)
    return (any(t.data_type in HALF for t in graph.initializer)
            or any(v.type.tensor_type.elem_type in HALF for v in values)
            or any(n.op_type == "Cast" and attribute(n, "to") in HALF for n in graph.node))


def _graph_to_float32(graph):
    """Every float16/bfloat16 tensor, type and Cast target of `graph` (and its subgraphs) made
    float32, in place."""
    for tensor in graph.initializer:
        _tensor_to_float32(tensor)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in HALF:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _tensor_to_float32(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                _graph_to_float32(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _graph_to_float32(sub)
            elif a.name == _TYPE_ATTRIBUTES.get(node.op_type) and a.i in HALF:
                a.i = TensorProto.FLOAT


def _tensor_to_float32(tensor):
    if tensor.data_type in HALF:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"),
                                                tensor.name))

