"""Control flow (If) in a model: an If whose condition is a constant or static shapes is folded
before differentiation; another If between the image and the score is refused in one line by
both builders, never a crash (onnxruntime-training's GradientGraphBuilder, and onnxruntime's own
graph optimizer on a Conv read inside a branch, abort the process on such graphs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxattr import Explainer, OnnxAttrError

from small_models import SIZE, _weights, classifier, random_photo, save

CONDITIONS = {
    "constant": [],
    "shape": [helper.make_node("Shape", ["image"], ["shape"], name="shape"),
              helper.make_node("Gather", ["shape", "one"], ["channels"], name="channels"),
              helper.make_node("Equal", ["channels", "three"], ["cond"], name="is_rgb")],
    "pixels": [helper.make_node("ReduceSum", ["image"], ["total"], name="total", keepdims=0),
               helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive")],
}


def if_model(condition, reads="r1"):
    """image -> Conv -> Relu -> If (then: Abs, else: Neg, both of the outer tensor `reads`) ->
    Flatten -> Gemm -> Softmax; the condition (true) is a constant, a static shape's test or
    sum(image) > 0. With `reads` "c1" there is no Relu: the branches read the Conv's output,
    which nothing else reads."""
    rng = np.random.default_rng(0)

    def branch(op, name):
        out = f"{name}_out"
        return helper.make_graph([helper.make_node(op, [reads], [out], name=name)], name, [],
                                 [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1",
                              pads=[1, 1, 1, 1]),
             *([helper.make_node("Relu", ["c1"], ["r1"], name="relu1")] if reads == "r1" else []),
             *CONDITIONS[condition],
             helper.make_node("If", ["cond"], ["a"], name="branch",
                              then_branch=branch("Abs", "then"), else_branch=branch("Neg", "else")),
             helper.make_node("Flatten", ["a"], ["f"], name="flatten")]
    inits = {"w1": _weights(rng, 4, 3, 3, 3, scale=0.003), "b1": _weights(rng, 4),
             "__features__": 4 * SIZE * SIZE, "cond": np.array(True), "zero": np.float32(0),
             "one": np.int64(1), "three": np.int64(3)}
    if condition != "constant":
        del inits["cond"]
    return classifier(nodes, inits, "f")


def without_if():
    """if_model with its If replaced by the then branch's Abs."""
    model = if_model("constant")
    nodes = [n for n in model.graph.node if n.op_type != "If"]
    nodes.insert(2, helper.make_node("Abs", ["r1"], ["a"], name="then"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


IF_LINE = "through control flow (If node 'branch'), which onnxattr cannot differentiate"


def explain_cli(tmp_path, model, command="explain", *flags):
    return subprocess.run(
        [sys.executable, "-m", "onnxattr", command, random_photo(tmp_path / "photo.png"),
         "--model", save(model, tmp_path / "if.onnx"), "--out", tmp_path / "out", *flags],
        capture_output=True, text=True, env={**os.environ, "ONNXATTR_CACHE": str(tmp_path / "c")})


@pytest.mark.parametrize("reads", ["r1", "c1"])
def test_if_on_the_pixels_is_one_line_through_the_cli(tmp_path, reads):
    result = explain_cli(tmp_path, if_model("pixels", reads))
    assert result.returncode == 1, result.stderr  # not -6 (SIGABRT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and IF_LINE in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_audit_of_an_if_model_keeps_what_can_run(tmp_path):
    """The If reads a Conv output (onnxruntime's fusions aborted on that): the audit writes its
    summary, occlusion (forward passes only) done, the gradient's one error recorded."""
    result = explain_cli(tmp_path, if_model("pixels", "c1"), "audit", "--methods",
                         "gradient,occlusion")
    assert result.returncode in (0, 1), result.stderr
    entry = json.loads((tmp_path / "out" / "summary.json").read_text())["images"][0]
    assert entry["methods"]["occlusion"]["status"] == "done", entry
    assert IF_LINE in entry["methods"]["gradient"]["error"], entry


def test_both_builders_refuse_control_flow_on_the_pixels(tmp_path, builder):
    explainer = Explainer(save(if_model("pixels"), tmp_path / "if.onnx"), builder=builder,
                          cache_dir=tmp_path / "cache")
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(OnnxAttrError, match=r"'score' depends on 'image' " + IF_LINE.replace(
            "(", r"\(").replace(")", r"\)")):
        explainer.explain(image, "gradient")


@pytest.mark.parametrize("condition", ["constant", "shape"])
def test_a_static_if_is_folded_before_differentiation(tmp_path, builder, condition):
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    maps = [Explainer(save(model, tmp_path / f"{i}.onnx"), builder=builder,
                      cache_dir=tmp_path / "cache").explain(image, "gradient", target=2).attribution
            for i, model in enumerate([if_model(condition), without_if()])]
    assert np.array_equal(*maps)


def test_a_crash_of_the_training_builder_is_one_error():
    """The If model without the control-flow check: the GradientGraphBuilder aborts, in its
    child process, and this process gets one OnnxAttrError."""
    from onnxattr.graph.prepare import TRAINING_FIXES, add_score_head, prepare_forward
    from onnxattr.graph.training import _run_builder
    from onnxattr.io.model import describe_model

    scored = add_score_head(prepare_forward(describe_model(if_model("pixels"), "digest"),
                                            TRAINING_FIXES))
    with pytest.raises(OnnxAttrError, match=r"gradient builder crashed \(SIGABRT\)"):
        _run_builder(scored.SerializeToString(), "image", "score")
