"""Deployed numeric formats (onnxattr.graph.precision): float16 and bfloat16 models explained in
float32 on their own weights; uint8 image inputs cast inside the graph."""

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_gradient import central_differences

from onnxattr import Explainer, OnnxAttrError

import small_models
from tolerance import rel_l2

HALF = {"float16": (TensorProto.FLOAT16, np.float16),
        "bfloat16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}


def as_half(model, kind, declared=True):
    """A copy of a float32 model in float16 or bfloat16: weights, input and outputs; with
    `declared` False, the weights rounded so but kept float32 (the float64 reference's model)."""
    elem_type, dtype = HALF[kind]
    copy = helper.make_model(model.graph, opset_imports=model.opset_import)
    copy.ir_version = model.ir_version
    graph = copy.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            rounded = numpy_helper.to_array(tensor).astype(dtype)
            tensor.CopyFrom(numpy_helper.from_array(
                rounded if declared else rounded.astype(np.float32), tensor.name))
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.elem_type = elem_type if declared else TensorProto.FLOAT
    return copy


@pytest.mark.parametrize("kind", HALF)
def test_a_half_precision_model_explains_in_float32(tmp_path, builder, kind):
    """The gradient of the float16 (bfloat16) model, computed in float32, against float64
    central differences: on the model's own weights at float32's error (as test_gradient), and
    for float16 within 5e-2 of the float32 model it was made from (the weights' rounding)."""
    model = small_models.concat_batchnorm()
    explainer = Explainer(small_models.save(as_half(model, kind), tmp_path / "half.onnx"),
                          cache_dir=tmp_path / "cache", builder=builder)
    pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    targets = np.array([1, 4])
    gradient, _, _ = explainer.engine.gradient(pixels, targets)
    own = central_differences(as_half(model, kind, declared=False), pixels, targets, "prob")
    assert rel_l2(gradient, own) < 1e-4
    if kind == "float16":
        assert rel_l2(gradient, central_differences(model, pixels, targets, "prob")) <= 5e-2


def uint8_input(model):
    """`model` taking uint8 pixels, cast to float32 inside the graph."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["image_float" if i == "image" else i for i in node.input]
    graph.node.insert(0, helper.make_node("Cast", ["image"], ["image_float"], name="to_float",
                                          to=TensorProto.FLOAT))
    graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    return model


def test_uint8_pixels_cast_inside_the_graph_explain_as_float_pixels(tmp_path, builder):
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    maps = [Explainer(small_models.save(model, tmp_path / f"{i}.onnx"), builder=builder,
                      cache_dir=tmp_path / "cache").explain(image, "gradient", target=1,
                                                            score="logit").attribution
            for i, model in enumerate([small_models.concat_batchnorm(),
                                       uint8_input(small_models.concat_batchnorm())])]
    assert np.abs(maps[0]).max() > 0 and np.array_equal(*maps)


def test_uint8_pixels_read_by_other_ops_are_one_line(tmp_path):
    model = small_models.concat_batchnorm()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    with pytest.raises(OnnxAttrError, match="uint8 image input 'image' is read by Conv node"):
        Explainer(small_models.save(model, tmp_path / "m.onnx"), cache_dir=tmp_path / "c")
