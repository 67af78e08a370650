"""Grad-CAM, guided Grad-CAM and occlusion sensitivity: against float64 PyTorch (GoogLeNet,
ResNet-18), against a plain loop over masked images, and their errors, flags and outputs."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper
from test_cli import assert_one_line_error, run_cli

from onnxattr import Explainer, OnnxAttrError, compile_model
from onnxattr.app.cli_flags import options_per_method
from onnxattr.app.report import run_audit
from onnxattr.app.sanity import run_sanity
from onnxattr.graph.builders import BUILDERS
from onnxattr.io.image import load_pixels
from onnxattr.methods.cam import upsample
from onnxattr.methods.figures import RenderOptions

import small_models

PHOTO = Path(__file__).resolve().parents[1] / "samples" / "chelsea.png"
GOOGLENET_LAYER = "inception_5b/output"


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def torch_grad_cam(forward, module, pixels, target, pre_hook=False, reshape=None):
    """Grad-CAM in float64 torch: the activation at `module`'s output (or, with `pre_hook`, its
    input), both it and its gradient made [N, K, h, w] by `reshape` (pytorch-grad-cam's
    reshape_transform) if given, alpha = the gradient's spatial mean, ReLU(sum alpha A),
    upsampled bilinearly with half-pixel centres. Returns (map [h, w], upsampled [H, W])."""
    import torch

    captured = {}

    def keep(tensor):
        tensor.retain_grad()
        captured["activation"] = tensor

    if pre_hook:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, output: keep(output))
    try:
        x = torch.tensor(pixels, dtype=torch.float64)
        forward(x)[0, target].backward()
    finally:
        handle.remove()
    activation, gradient = captured["activation"], captured["activation"].grad
    if reshape is not None:
        activation, gradient = reshape(activation), reshape(gradient)
    alpha = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * activation).sum(dim=1, keepdim=True))
    up = torch.nn.functional.interpolate(cam, size=pixels.shape[2:], mode="bilinear",
                                         align_corners=False)
    return cam[0, 0].detach().numpy(), up[0, 0].detach().numpy()


def assert_grad_cam_matches(result, expected_cam, expected_up, case):
    cam_error = relative(result.cam, expected_cam)
    map_correlation = correlation(result.attribution.sum(axis=0), expected_up)
    print(f"{case} at {result.layer}: cam max error / max {cam_error:.1e}, upsampled maps' "
          f"1 - correlation {1 - map_correlation:.1e}")
    assert cam_error < 1e-4
    assert map_correlation >= 0.99
    # the attribution is the upsampled map / C in every channel
    np.testing.assert_allclose(result.attribution.sum(axis=0), expected_up,
                               atol=1e-4 * np.abs(expected_up).max())


# --- GoogLeNet -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("layer_cache")


@pytest.mark.parametrize("score", ["logit", "prob"])
def test_grad_cam_matches_torch_on_googlenet(googlenet_path, torch_reference, builder, score,
                                             cache_dir):
    explainer = Explainer(googlenet_path, builder=builder, cache_dir=cache_dir)
    result = explainer.explain(PHOTO, method="grad-cam", score=score)
    assert result.layer == GOOGLENET_LAYER and result.cam.shape == (7, 7)
    assert result.title == f"Grad-CAM ({result.label})"
    assert explainer.engine.builders_used[("vanilla", score, GOOGLENET_LAYER)] == builder
    pixels = load_pixels(PHOTO, (224, 224))[None]
    cam, up = torch_grad_cam(lambda x: torch_reference(x, score=score),
                             torch_reference.ops["pool5/7x7_s1"], pixels, result.class_index,
                             pre_hook=True)
    assert_grad_cam_matches(result, cam, up, f"GoogLeNet, {builder}, {score}")


def test_guided_grad_cam_is_guided_backprop_times_the_upsampled_map(googlenet):
    guided_cam = googlenet.explain(PHOTO, method="guided-grad-cam")
    cam = googlenet.explain(PHOTO, method="grad-cam")
    guided = googlenet.explain(PHOTO, method="guided-backprop")
    np.testing.assert_array_equal(guided_cam.cam, cam.cam)
    expected = guided.attribution * upsample(cam.cam[None], (224, 224))[0]
    np.testing.assert_array_equal(guided_cam.attribution, expected.astype(np.float32))
    assert guided_cam.title == f"Guided Grad-CAM ({guided_cam.label})"


# --- ResNet-18 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """A seeded random torchvision ResNet-18 taking RGB 0..255 (ImageNet normalisation inside,
    classifier scaled up so the softmax is not uniform), exported to ONNX: (path, torch
    module in float64)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")

    class NormalisedResNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet18(weights=None)
            with torch.no_grad():
                self.net.fc.weight.mul_(5.0)  # top-1 probability 0.51 on the sample photo
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))

        def logits(self, image):
            return self.net((image / 255.0 - self.mean) / self.std)

        def forward(self, image):
            return torch.softmax(self.logits(image), dim=1)

    torch.manual_seed(0)
    model = NormalisedResNet().eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["image"],
                      output_names=["prob"], dynamic_axes={"image": {0: "N"}, "prob": {0: "N"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(path)
    helper.set_model_props(proto, {"onnxattr.input": json.dumps({"range": [0, 255]})})
    onnx.save(proto, path)
    return path, model.double()


@pytest.mark.parametrize("score", ["logit", "prob"])
def test_grad_cam_matches_torch_on_resnet18(resnet18, builder, score, cache_dir):
    path, model = resnet18
    explainer = Explainer(path, builder=builder, cache_dir=cache_dir)
    result = explainer.explain(PHOTO, method="grad-cam", score=score)
    assert result.score > 0.01  # not a uniform softmax: the probability's gradient is not ~0
    forward = model.logits if score == "logit" else model
    pixels = load_pixels(PHOTO, (224, 224))[None]
    cam, up = torch_grad_cam(forward, model.net.layer4, pixels, result.class_index)
    assert result.cam.shape == (7, 7)
    producer = next(n for n in onnx.load(path).graph.node if result.layer in n.output)
    consumer = next(n for n in onnx.load(path).graph.node if result.layer in n.input)
    assert (producer.op_type, consumer.op_type) == ("Relu", "GlobalAveragePool")
    assert_grad_cam_matches(result, cam, up, f"ResNet-18, {builder}, {score}")


# --- a ViT-like model: token sequences --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """(path, the float64 torch module, the ONNX name of its norm1 output [N, 1 + 4*3, 8])."""
    from tiny_vit import export_tiny_vit

    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    net, norm1 = export_tiny_vit(path)
    proto = onnx.load(path)
    helper.set_model_props(proto, {"onnxattr.input": json.dumps({"range": [0, 255]})})
    onnx.save(proto, path)
    return path, net.double(), norm1


def vit_reshape_transform(tensor):
    """pytorch-grad-cam's reshape_transform for ViTs (its tutorial's, at our grid): drop the
    class token, tokens row by row to [N, C, h, w]."""
    from tiny_vit import PATCH, SIZE

    grid = tensor[:, 1:].reshape(tensor.size(0), SIZE[0] // PATCH, SIZE[1] // PATCH,
                                 tensor.size(2))
    return grid.permute(0, 3, 1, 2)


def test_grad_cam_reads_a_token_sequence_as_its_grid(tiny_vit, builder, tmp_path):
    """A named token sequence [N, 1 + h*w, C] is read as its h x w grid (class token dropped),
    as pytorch-grad-cam's reshape_transform: the map matches float64 torch on a non-square
    grid; a sequence of another length is refused."""
    path, net, norm1 = tiny_vit
    explainer = Explainer(path, builder=builder, cache_dir=tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (16, 12, 3), np.uint8)
    result = explainer.explain(image, method="grad-cam", layer=norm1)
    assert result.cam.shape == (4, 3)
    pixels = image.transpose(2, 0, 1)[None].astype(np.float64)
    cam, up = torch_grad_cam(net, net.norm1, pixels, result.class_index,
                             reshape=vit_reshape_transform)
    assert_grad_cam_matches(result, cam, up, f"tiny ViT, {builder}")
    with pytest.raises(OnnxAttrError, match=r"has shape \[\w+, 8, 12\], not .* tokens \["):
        explainer.engine.resolve_layer("/Reshape_output_0")  # the patch embedding flattened:
        # [N, 8 channels, 12 cells], no token sequence


# --- occlusion ---------------------------------------------------------------------------------


def occlusion_loop(model, pixels, targets, mask, stride, value, score):
    """Occlusion by a plain loop: each image, each mask position, one masked image run alone
    on onnxruntime; per pixel the mean score drop of the positions covering it."""
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                                                None))
    session = onnxruntime.InferenceSession(reference.SerializeToString())
    output = "prob" if score == "prob" else "logits"

    def target_score(image, target):
        return float(session.run([output], {"image": image[None]})[0][0, target])

    def starts(side):
        found = [0]
        while found[-1] + mask < side:
            found.append(found[-1] + stride)
        return found

    _, channels, height, width = pixels.shape
    result = np.zeros(pixels.shape[:1] + (height, width))
    for n, (image, target) in enumerate(zip(pixels, targets)):
        fill = image.mean(axis=(1, 2)) if value == "mean" else np.full(channels, float(value))
        original = target_score(image, target)
        total, count = np.zeros((height, width)), np.zeros((height, width))
        for top in starts(height):
            for left in starts(width):
                masked = image.copy()
                for c in range(channels):
                    masked[c, top:top + mask, left:left + mask] = fill[c]
                total[top:top + mask, left:left + mask] += original - target_score(masked, target)
                count[top:top + mask, left:left + mask] += 1
        result[n] = total / count
    return result


@pytest.fixture
def odd_model(tmp_path):
    """A small classifier on 9 x 7 images (sides not multiples of the strides tested)."""
    model = small_models.conv_relu_global_pool((9, 7))
    helper.set_model_props(model, {"onnxattr.labels": json.dumps(small_models.LABELS),
                                   "onnxattr.input": json.dumps({"range": [0, 255]})})
    return model, small_models.save(model, tmp_path / "odd.onnx")


@pytest.mark.parametrize("mask, stride, value", [(3, 2, "mean"), (3, 3, 17.5), (4, 3, "mean"),
                                                 (2, 1, "0")])
@pytest.mark.parametrize("score", ["prob", "logit"])
def test_occlusion_equals_a_loop_over_masked_images(odd_model, tmp_path, monkeypatch, mask,
                                                    stride, value, score):
    model, path = odd_model

    def no_gradient(*args, **kwargs):
        raise AssertionError("occlusion built a gradient graph")
    for name in BUILDERS:
        monkeypatch.setitem(BUILDERS, name, no_gradient)
    explainer = Explainer(path, cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (9, 7, 3), dtype=np.uint8) for _ in range(2)]
    shares = []
    results = explainer.explain(images, method="occlusion", target=[1, 3], score=score,
                                batch_size=4, mask_size=mask, stride=stride, mask_value=value,
                                progress=shares.append)
    expected = occlusion_loop(model, explainer.pixels(images), [1, 3], mask, stride, value, score)
    for result, want in zip(results, expected):
        assert result.attribution.shape == (3, 9, 7)
        np.testing.assert_array_equal(result.attribution, result.attribution[:1].repeat(3, 0))
        np.testing.assert_allclose(result.attribution.sum(axis=0), want, rtol=1e-5,
                                   atol=1e-6 * max(1.0, np.abs(want).max()))
        assert (result.mask_size, result.stride) == (mask, stride)
    assert shares == sorted(shares) and shares[-1] == 1.0


def test_occlusion_defaults_follow_matlab(odd_model, tmp_path):
    _, path = odd_model
    result = Explainer(path, cache_dir=tmp_path).explain(PHOTO, method="occlusion")
    # mask 20% of the shorter side (7) rounded up, stride half of it rounded up
    assert (result.mask_size, result.stride, result.positions) == (2, 1, 8 * 6)
    assert result.render_defaults == {"style": "overlay", "sign": "all"}


# --- errors and options ------------------------------------------------------------------------


@pytest.mark.parametrize("options, fragments", [
    ({"layer": "nope"}, ["layer 'nope' is not a tensor of the model", "r2 [N, 6, 5, 4]"]),
    ({"layer": "f"}, ["layer 'f' has shape [N, 6], not [N, K, h, w]", "nearest the output"]),
    ({"layer": "w1"}, ["layer 'w1' is an input or a weight", "r1"]),
    ({"layer": 3}, ["layer must be a tensor name"]),
])
def test_bad_layers_are_one_line_errors(odd_model, tmp_path, options, fragments):
    _, path = odd_model
    explainer = Explainer(path, cache_dir=tmp_path)
    for method in ("grad-cam", "guided-grad-cam"):
        with pytest.raises(OnnxAttrError) as error:
            explainer.explain(PHOTO, method=method, **options)
        assert "\n" not in str(error.value)
        for fragment in fragments:
            assert fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("options, fragment", [
    ({"mask_size": 0}, "mask_size must be a whole number from 1 to 7"),
    ({"mask_size": 8}, "mask_size must be a whole number from 1 to 7"),
    ({"mask_size": 2.5}, "mask_size must be"),
    ({"mask_size": True}, "mask_size must be"),
    ({"mask_size": 3, "stride": 4}, "stride must be a whole number from 1 to the mask size 3"),
    ({"stride": 0}, "stride must be"),
    ({"mask_value": "blue"}, "mask_value must be 'mean' or a pixel value"),
    ({"mask_value": float("nan")}, "mask_value must be"),
    ({"layer": "r1"}, "takes no option layer"),
])
def test_bad_occlusion_options_are_one_line_errors(odd_model, tmp_path, options, fragment):
    _, path = odd_model
    with pytest.raises(OnnxAttrError, match=fragment) as error:
        Explainer(path, cache_dir=tmp_path).explain(PHOTO, method="occlusion", **options)
    assert "\n" not in str(error.value)


def test_a_named_layer_is_used_and_cached_by_name(odd_model, tmp_path, builder):
    _, path = odd_model
    explainer = Explainer(path, cache_dir=tmp_path / "cache", builder=builder)
    default = explainer.explain(PHOTO, method="grad-cam")
    named = explainer.explain(PHOTO, method="grad-cam", layer="r1")
    assert (default.layer, default.cam.shape) == ("r2", (5, 4))
    assert (named.layer, named.cam.shape) == ("r1", (9, 7))
    assert len(list((tmp_path / "cache").glob("*.graph"))) == 2  # one graph per layer


def test_cli_method_flags_reach_only_their_methods():
    given = {"layer": "r1", "mask_size": 2, "stride": 1, "mask_value": "mean", "smooth": None}
    given = {k: v for k, v in given.items() if v is not None}
    per_method = options_per_method(["grad-cam", "guided-grad-cam", "occlusion", "gradient"],
                                    given)
    assert per_method["grad-cam"] == per_method["guided-grad-cam"] == {"layer": "r1"}
    assert per_method["occlusion"] == {"mask_size": 2, "stride": 1, "mask_value": "mean"}
    assert per_method["gradient"] == {}


@pytest.mark.parametrize("flags, fragment", [
    (["--method", "gradient", "--layer", "r1"], "--layer does not apply to gradient"),
    (["--method", "grad-cam", "--mask-size", "2"], "--mask-size does not apply to grad-cam"),
    (["--method", "occlusion", "--mask-size", "9"], "mask_size must be a whole number"),
    (["--method", "grad-cam", "--layer", "nope"], "layer 'nope' is not a tensor"),
])
def test_cli_refuses_misplaced_and_bad_flags(odd_model, tmp_path, monkeypatch, capsys, flags,
                                             fragment):
    _, path = odd_model
    code, _, err = run_cli(monkeypatch, capsys, "explain", PHOTO, "--model", path, "--out",
                           tmp_path / "out", *flags)
    assert_one_line_error(code, err, fragment)


def test_cli_explains_with_the_three_methods(odd_model, tmp_path, monkeypatch, capsys):
    _, path = odd_model
    monkeypatch.setenv("ONNXATTR_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(monkeypatch, capsys, "explain", PHOTO, "--model", path, "--out",
                             tmp_path / "out", "--method", "grad-cam,guided-grad-cam,occlusion",
                             "--layer", "r1", "--mask-size", "3", "--stride", "2",
                             "--mask-value", "0", "--save-raw", "--panel")
    assert code == 0, err
    assert f"{PHOTO}: grad-cam at layer r1 (9x7)" in out
    assert f"{PHOTO}: guided-grad-cam at layer r1 (9x7)" in out
    names = {p.name for p in (tmp_path / "out").iterdir()}
    for method in ("grad-cam", "guided-grad-cam", "occlusion"):
        assert {f"chelsea_{method}.png", f"chelsea_{method}.npy"} <= names
        assert np.load(tmp_path / "out" / f"chelsea_{method}.npy").shape == (3, 9, 7)


def test_grad_cam_is_an_overlay_unless_a_style_is_given(odd_model, tmp_path):
    _, path = odd_model
    result = Explainer(path, cache_dir=tmp_path).explain(PHOTO, method="grad-cam")
    assert RenderOptions().for_result(result).style == "overlay"
    assert RenderOptions(style="map").for_result(result).style == "map"
    gradient = Explainer(path, cache_dir=tmp_path).explain(PHOTO, method="gradient")
    assert RenderOptions().for_result(gradient).style == "map"
    overlay = RenderOptions(style="overlay").render(result)
    np.testing.assert_array_equal(result.render(), overlay)
    assert not np.array_equal(result.render(style="map"), overlay)


# --- compiled models, sanity, audit --------------------------------------------------------------


def test_compiled_model_refuses_layer_methods_and_runs_occlusion(odd_model, tmp_path):
    _, path = odd_model
    compiled = tmp_path / "compiled.onnx"
    compile_model(path, "gradient", "prob", compiled, cache_dir=tmp_path / "cache")
    explainer = Explainer(compiled)
    for method in ("grad-cam", "guided-grad-cam"):
        with pytest.raises(OnnxAttrError, match="compiled attribution model .* need the "
                                                "source model"):
            explainer.explain(PHOTO, method=method)
    source = Explainer(path, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(explainer.explain(PHOTO, method="occlusion").attribution,
                               source.explain(PHOTO, method="occlusion").attribution,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(OnnxAttrError, match="compiled for score 'prob' and has no logits"):
        explainer.explain(PHOTO, method="occlusion", score="logit")


def test_sanity_runs_layer_methods_and_occlusion_on_randomized_models(tmp_path):
    path = small_models.save(small_models.conv_relu_global_pool((16, 12)), tmp_path / "m.onnx")
    result = run_sanity(path, PHOTO, ["grad-cam", "occlusion"], mode="cascading",
                        cache_dir=tmp_path / "cache")
    assert [layer.name for layer in result.layers] == ["head", "conv2", "conv1"]
    for method in ("grad-cam", "occlusion"):
        maps = result.maps["cascading"][method]
        assert len(maps) == 3
        assert not np.allclose(maps[-1], result.original[method])


def test_audit_records_the_layer(odd_model, tmp_path):
    _, path = odd_model
    summary = run_audit(Explainer(path, cache_dir=tmp_path / "cache"), [PHOTO],
                        ["grad-cam", "occlusion"], tmp_path / "audit")
    records = summary["images"][0]["methods"]
    assert records["grad-cam"]["layer"] == "r2" and "cam" not in records["grad-cam"]
    assert records["occlusion"]["mask_size"] == 2
    header = (tmp_path / "audit" / "summary.csv").read_text().splitlines()[0]
    assert "grad-cam_layer" in header and "occlusion_layer" not in header


def test_a_conv_output_before_batchnorm_keeps_its_value_on_both_builders(tmp_path):
    """onnxruntime-training's forward fixes fold BatchNormalization into the Conv before it,
    which would change what the Conv's output holds; a layer there is kept unfolded."""
    model = small_models.concat_batchnorm()
    path = small_models.save(model, tmp_path / "m.onnx")
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)
    results = {}
    for builder in ("onnxruntime", "native"):
        engine = Explainer(path, cache_dir=tmp_path / builder, builder=builder).engine
        results[builder] = engine.layer_gradient(pixels, [1, 2], "b0", "logit")
    for ours, theirs in zip(results["onnxruntime"], results["native"]):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
