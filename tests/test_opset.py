"""Models at opsets newer than the training build runs (22, 23) explain through both builders,
converted down in preparation (onnxattr.graph.opset); an op with no opset-21 form is refused in
one line naming it."""

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxattr import Explainer, OnnxAttrError
from onnxattr.graph.runtime import onnxruntime

from small_models import SIZE, classifier, concat_batchnorm, save
from tolerance import rel_l2

OLD_RUNTIME = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) < (1, 22)


def at_opset(model, opset, ir_version):
    model.opset_import[0].version, model.ir_version = opset, ir_version
    return model


@pytest.mark.parametrize("opset, ir_version", [(22, 10), (23, 11)])
def test_a_newer_opset_explains_as_the_same_model_at_17(tmp_path, builder, opset, ir_version):
    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    maps = [Explainer(save(model, tmp_path / f"{i}.onnx"), builder=builder,
                      cache_dir=tmp_path / "cache").explain(image, "gradient", target=1,
                                                                         score="logit").attribution
            for i, model in enumerate([concat_batchnorm(), at_opset(concat_batchnorm(), opset,
                                                                    ir_version)])]
    assert np.abs(maps[0]).max() > 0
    assert rel_l2(maps[1], maps[0]) <= 1e-6  # the same graph once converted: float32 rounding


def rms_norm_model():
    """Flatten -> Abs -> Gemm -> Softmax, the Abs then made RMSNormalization (new at opset 23;
    the small classifiers are checked at opset 17), at opset 23."""
    nodes = [helper.make_node("Flatten", ["image"], ["f0"], name="flatten"),
             helper.make_node("Abs", ["f0"], ["f"], name="rms")]
    model = classifier(nodes, {"__features__": 3 * SIZE * SIZE}, "f")
    model.graph.node[1].op_type = "RMSNormalization"
    return at_opset(model, 23, 11)


@pytest.mark.skipif(not OLD_RUNTIME, reason="this onnxruntime runs opset 23 as it is")
def test_an_op_without_an_opset_21_form_is_named(tmp_path):
    with pytest.raises(OnnxAttrError, match=r"opset 23, .*its op RMSNormalization has no "
                                            r"opset-21 form"):
        Explainer(save(rms_norm_model(), tmp_path / "rms.onnx"), cache_dir=tmp_path / "c")


@pytest.fixture(scope="module")
def resnet18_opset_22(tmp_path_factory):
    """The zoo's tiny ResNet-18, exported by torch's dynamo exporter at opset 22."""
    pytest.importorskip("torchvision")
    pytest.importorskip("onnxscript")
    import zoo_models as zoo

    module = zoo.build("resnet18", "tiny", seed=0)
    return module, zoo.export(module, tmp_path_factory.mktemp("opset22") / "resnet18.onnx",
                              "dynamo", opset=22)


@pytest.mark.slow
def test_resnet18_at_opset_22_matches_float64_torch(resnet18_opset_22, builder, tmp_path):
    import zoo_models as zoo

    module, path = resnet18_opset_22
    assert onnx.load(path).opset_import[0].version == 22
    pixels = zoo.random_pixels(module, count=2, seed=0)
    targets = zoo.reference_forward(module, pixels).argmax(axis=1)
    want = zoo.reference_gradient(module, pixels, targets)
    got = zoo.onnxattr_gradient(path, pixels, targets, builder=builder, cache_dir=tmp_path)
    assert max(zoo.relative_l2(g, w) for g, w in zip(got, want)) <= 1e-2  # the zoo's bound
