"""The tiny classifier zoo (tests/zoo_models.py): every architecture outside testers ran, small
and random-init, exported by both torch exporters, against float64 torch autograd.

The table of what works today is the xfail list below: each entry is an (architecture,
exporter) pair where onnxruntime-training's gradient builder refuses the model, and the test
insists that the refusal is a one-line OnnxAttrError (strict: a pair that starts working, or
fails any other way, turns the run red).
"""

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from onnxattr import OnnxAttrError

import zoo_models as zoo  # noqa: E402

TOLERANCE = 1e-2  # relative L2 of float32 onnxattr against float64 torch, per image

KNOWN_FAILURES = {}  # (architecture, exporter, builder): why it is refused


def _cases(with_known_failures):
    return list(_each_case(with_known_failures))


def _each_case(with_known_failures):
    for exporter in zoo.EXPORTERS:
        for arch in zoo.ARCHITECTURES:
            marks = [pytest.mark.slow] if exporter == "dynamo" else []
            yield pytest.param(arch, exporter, marks=marks, id=f"{arch}-{exporter}")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """get(arch, exporter) -> (module, path): each tiny model built and exported once per
    session, into one session temporary folder."""
    folder = tmp_path_factory.mktemp("zoo")
    built, exported = {}, {}

    def get(arch, exporter):
        if exporter == "dynamo":
            pytest.importorskip("onnxscript")
        if arch not in built:
            built[arch] = zoo.build(arch, "tiny", seed=0)
        if (arch, exporter) not in exported:
            exported[arch, exporter] = zoo.export(built[arch], folder / f"{arch}-{exporter}.onnx",
                                                  exporter)
        return built[arch], exported[arch, exporter]

    return get


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    """A graph cache of the zoo's own, so no earlier run's graphs are reused."""
    return tmp_path_factory.mktemp("zoo_cache")


@pytest.mark.parametrize("arch, exporter", _cases(with_known_failures=False))
def test_export_contract(arch, exporter, tiny_zoo):
    """One self-contained file: image [N, 3, H, W] in, prob [N, K] out, the exporter's opset,
    IR version <= 10, no model-local functions."""
    import onnx

    module, path = tiny_zoo(arch, exporter)
    model = onnx.load(path, load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert model.ir_version <= zoo.MAX_IR_VERSION and not model.functions
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == zoo.OPSETS[exporter]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in model.graph.input] == [
        ("image", ["N", 3, *zoo.input_size(module)])]
    assert [(v.name, dims(v)) for v in model.graph.output] == [("prob", ["N", zoo.TINY_CLASSES])]


@pytest.mark.parametrize("arch, exporter", _cases(with_known_failures=True))
def test_gradient_matches_torch(arch, exporter, builder, tiny_zoo, zoo_cache):
    """onnxattr's plain gradient of the top-1 probability equals float64 torch autograd on two
    random images (one batch), through each builder."""
    module, path = tiny_zoo(arch, exporter)
    pixels = zoo.random_pixels(module, count=2, seed=0)
    prob = zoo.reference_forward(module, pixels)
    targets = prob.argmax(axis=1)
    # the zoo's calibrated classifier layer keeps the top class well above 1/K
    assert (prob.max(axis=1) > 2.0 / prob.shape[1]).all(), prob.max(axis=1)
    expected = zoo.reference_gradient(module, pixels, targets)
    try:
        actual = zoo.onnxattr_gradient(path, pixels, targets, builder=builder,
                                       cache_dir=zoo_cache)
    except OnnxAttrError as err:
        assert "\n" not in str(err).strip(), f"a multi-line error: {err}"
        raise
    errors = [zoo.relative_l2(a, e) for a, e in zip(actual, expected)]
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("arch", ["efficientnet_b0", "regnet_y_400mf", "shufflenet_v2_x1_0",
                                  "mobilenet_v3_small", "convnext_tiny"])
def test_compile(arch, tiny_zoo, zoo_cache, tmp_path):
    """Models that could not compile (no lowering rule for SigmoidGrad; ConvGrad without a
    static spatial shape; HardSwish, LayerNorm) compile ("auto": onnxruntime-training's graph
    lowered where every op has a rule, else the native graph) and give float64 torch's
    gradient."""
    from onnxattr import Explainer, compile_model

    module, path = tiny_zoo(arch, "torchscript")
    compiled = tmp_path / "compiled.onnx"
    compile_model(path, "gradient", output=compiled, cache_dir=zoo_cache)
    pixels = zoo.random_pixels(module, count=2, seed=1)
    targets = zoo.reference_forward(module, pixels).argmax(axis=1)
    got = Explainer(compiled).engine.gradient(pixels, targets)[0]
    want = zoo.reference_gradient(module, pixels, targets)
    assert max(zoo.relative_l2(g, w) for g, w in zip(got, want)) <= TOLERANCE
