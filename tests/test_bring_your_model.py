"""docs/bring-your-model.md: each framework's export command (examples/export/) on a small
model with random weights, then onnxattr on the exported file. The torch exports are checked
against float64 torch (the pixel contract flags or metadata the page gives are the right ones);
the others are explained end to end (tests/test_keras.py checks tf2onnx's numbers against
TensorFlow). Keras and Flax run in their own environments (conftest.py::framework_python)."""

import importlib.util
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FRAMEWORKS
from test_cli import run_cli

from onnxattr import Explainer

from tolerance import rel_l2

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "export"
IMAGENET = ["--pixel-range", "0..1", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


def example(name):
    """examples/export/NAME.py as a module (its main(argv) is the command, run in this process)."""
    spec = importlib.util.spec_from_file_location(f"export_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(python, name, *args):
    """The command `PYTHON examples/export/NAME.py ARGS` in another environment."""
    done = subprocess.run([str(python), str(EXAMPLES / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def opset(path):
    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def explain_through_the_cli(monkeypatch, capsys, tmp_path, model, *flags):
    """`onnxattr explain photo --model MODEL FLAGS --method gradient --method grad-cam`: both
    maps written; returns the CLI's stderr."""
    from small_models import random_photo

    photo = random_photo(tmp_path / "photo.png")
    monkeypatch.setenv("ONNXATTR_CACHE", str(tmp_path / "c"))
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, *flags,
                           "--method", "gradient", "--method", "grad-cam", "--out", tmp_path / "o")
    assert code in (0, None), err
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"photo_gradient.png",
                                                            "photo_grad-cam.png"}
    return err


def assert_matches_torch(explainer, net, mean, std):
    """The explainer's gradient of the probability against float64 torch of `net` on
    (pixels / 255 - mean) / std."""
    import torch

    h, w = explainer.classifier.size
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = torch.tensor(pixels.transpose(2, 0, 1)[None], dtype=torch.float64, requires_grad=True)
    scale = [torch.tensor(v, dtype=torch.float64).reshape(1, 3, 1, 1) for v in (mean, std)]
    prob = torch.softmax(net.double()((x / 255 - scale[0]) / scale[1]), dim=1)[0]
    target = int(prob.argmax())
    (want,) = torch.autograd.grad(prob[target], x)
    got = explainer.explain(pixels, "gradient", target=target).attribution
    assert rel_l2(got, want[0].numpy()) < 1e-3  # float32 against float64: measured ~1e-6


def export_torchvision(path, *flags):
    """examples/export/torchvision_model.py's ResNet-18, random weights (seed 0), 64x64; returns
    the same network in torch."""
    import torch
    import torchvision

    torch.manual_seed(0)
    example("torchvision_model").main(["--arch", "resnet18", "--weights", "none", "--size", "64",
                                       *flags, "--output", str(path)])
    torch.manual_seed(0)
    return torchvision.models.get_model("resnet18", weights=None).eval()


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """The page's plain torchvision export (torchscript), once for this file's tests."""
    pytest.importorskip("torchvision")
    path = tmp_path_factory.mktemp("torchvision") / "resnet18.onnx"
    return export_torchvision(path), path


@pytest.mark.parametrize("exporter", ["torchscript",
                                      pytest.param("dynamo", marks=pytest.mark.slow)])
def test_torchvision_export_with_the_imagenet_flags(exporter, resnet18, tmp_path, monkeypatch,
                                                    capsys):
    net, path = resnet18
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        path = tmp_path / "resnet18-dynamo.onnx"
        net = export_torchvision(path, "--exporter", "dynamo")
    assert opset(path) == 17 if exporter == "torchscript" else opset(path) >= 18
    explain_through_the_cli(monkeypatch, capsys, tmp_path, path, *IMAGENET)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    explainer = Explainer(path, cache_dir=tmp_path / "c", pixel_range="0..1", mean=mean, std=std)
    assert_matches_torch(explainer, net, mean, std)


def test_timm_export_states_its_contract(tmp_path, monkeypatch, capsys):
    """timm's tiny test ConvNeXt, random weights: no flags, the metadata says it all."""
    import torch

    timm = pytest.importorskip("timm")
    path = tmp_path / "convnext.onnx"
    torch.manual_seed(0)
    example("timm_model").main(["--arch", "test_convnext", "--pretrained", "none",
                                "--output", str(path)])
    torch.manual_seed(0)
    net = timm.create_model("test_convnext", pretrained=False).eval()
    explain_through_the_cli(monkeypatch, capsys, tmp_path, path)
    config = timm.data.resolve_data_config({}, model=net)
    assert_matches_torch(Explainer(path, cache_dir=tmp_path / "c"), net, config["mean"],
                         config["std"])


def test_float16_conversion(resnet18, tmp_path, monkeypatch, capsys):
    _, path = resnet18
    half = tmp_path / "resnet18-float16.onnx"
    example("float16").main([str(path), str(half)])
    model = onnx.load(half)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    explain_through_the_cli(monkeypatch, capsys, tmp_path, half, *IMAGENET)


def test_int8_quantization(resnet18, tmp_path, monkeypatch, capsys):
    """The quantizer writes a QDQ model and onnxattr explains it (the int8 backward's own
    tests, tests/test_quantized.py, check its numbers)."""
    _, path = resnet18
    int8 = tmp_path / "resnet18-int8.onnx"
    example("quantize").main([str(path), str(int8), "--images", str(REPO / "samples"), *IMAGENET])
    ops = {node.op_type for node in onnx.load(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    monkeypatch.setenv("ONNXATTR_CACHE", str(tmp_path / "c"))
    code, _, err = run_cli(monkeypatch, capsys, "explain", REPO / "samples" / "chelsea.png",
                           "--model", int8, *IMAGENET, "--out", tmp_path / "o")
    assert code in (0, None), err
    assert (tmp_path / "o" / "chelsea_gradient.png").is_file()


@pytest.mark.slow
def test_keras_export_with_tf2onnx_defaults(framework_python, tmp_path, monkeypatch, capsys):
    """Keras MobileNetV2 (random weights, 64x64) through tf2onnx's defaults: channels-last,
    explained with its 'tf' preprocessing flag."""
    path = tmp_path / "mobilenetv2.onnx"
    run_example(framework_python("tf"), "keras_model", "--arch", "MobileNetV2", "--weights",
                "none", "--size", 64, "--output", path)
    assert Explainer(path, cache_dir=tmp_path / "c").classifier.layout == "NHWC"
    explain_through_the_cli(monkeypatch, capsys, tmp_path, path, "--pixel-range", "-1..1")


@pytest.mark.slow
def test_flax_export_with_jax2onnx_defaults(framework_python, tmp_path, monkeypatch, capsys):
    """The page's Flax CNN through jax2onnx's defaults: channels-last, opset 23."""
    path = tmp_path / "flax_cnn.onnx"
    run_example(framework_python("jax"), "flax_model", "--output", path)
    assert opset(path) == 23
    assert Explainer(path, cache_dir=tmp_path / "c").classifier.layout == "NHWC"
    explain_through_the_cli(monkeypatch, capsys, tmp_path, path)


def test_the_page_installs_what_the_tests_install():
    """Each `.venv-NAME/bin/pip install ...` on the page names the packages of FRAMEWORKS[NAME]."""
    page = (REPO / "docs" / "bring-your-model.md").read_text()
    installs = dict(re.findall(r"^\.venv-(\w+)/bin/pip install (.+)$", page, re.M))
    assert {name: packages.split() for name, packages in installs.items()} == FRAMEWORKS
