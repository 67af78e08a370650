"""Control flow (If) between the image and the score: refused in one line by both builders, never
a crash (onnxruntime-training's GradientGraphBuilder aborts the process on such graphs)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxattr import Explainer, OnnxAttrError

from small_models import SIZE, _weights, classifier, random_photo, save


def if_model(constant_condition):
    """image -> Conv -> Relu -> If (then: Abs, else: Neg, both of the outer Relu's output) ->
    Flatten -> Gemm -> Softmax; the condition is a constant or sum(image) > 0."""
    rng = np.random.default_rng(0)

    def branch(op, name):
        out = f"{name}_out"
        return helper.make_graph([helper.make_node(op, ["r1"], [out], name=name)], name, [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    condition = [] if constant_condition else [
        helper.make_node("ReduceSum", ["image"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive")]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             *condition,
             helper.make_node("If", ["cond"], ["a"], name="branch",
                              then_branch=branch("Abs", "then"), else_branch=branch("Neg", "else")),
             helper.make_node("Flatten", ["a"], ["f"], name="flatten")]
    inits = {"w1": _weights(rng, 4, 3, 3, 3, scale=0.003), "b1": _weights(rng, 4),
             "__features__": 4 * SIZE * SIZE,
             **({"cond": np.array(True)} if constant_condition else {"zero": np.float32(0)})}
    return classifier(nodes, inits, "f")


IF_LINE = "through control flow (If node 'branch'), which onnxattr cannot differentiate"


@pytest.mark.parametrize("constant_condition", [False, True])
def test_if_between_image_and_score_is_one_line_through_the_cli(tmp_path, constant_condition):
    model = save(if_model(constant_condition), tmp_path / "if.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "onnxattr", "explain", random_photo(tmp_path / "photo.png"),
         "--model", model, "--out", tmp_path / "out"], capture_output=True, text=True,
        env={**os.environ, "ONNXATTR_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 1, result.stderr  # not -6 (SIGABRT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and IF_LINE in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_both_builders_refuse_control_flow(tmp_path, builder):
    explainer = Explainer(save(if_model(True), tmp_path / "if.onnx"), builder=builder,
                          cache_dir=tmp_path / "cache")
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(OnnxAttrError, match=r"'score' depends on 'image' " + IF_LINE.replace(
            "(", r"\(").replace(")", r"\)")):
        explainer.explain(image, "gradient")


def test_a_crash_of_the_training_builder_is_one_error():
    """The If model without the control-flow check: the GradientGraphBuilder aborts, in its
    child process, and this process gets one OnnxAttrError."""
    from onnxattr.graph.prepare import TRAINING_FIXES, add_score_head, prepare_forward
    from onnxattr.graph.training import _run_builder
    from onnxattr.io.model import describe_model

    scored = add_score_head(prepare_forward(describe_model(if_model(True), "digest"),
                                            TRAINING_FIXES))
    with pytest.raises(OnnxAttrError, match=r"gradient builder crashed \(SIGABRT\)"):
        _run_builder(scored.SerializeToString(), "image", "score")
