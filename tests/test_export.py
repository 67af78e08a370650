"""GoogLeNet export (onnxattr.io.caffe, scripts/export_googlenet.py): reference predictions,
agreement with float64 PyTorch, dynamic batch, metadata, the torchvision path, CLI errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from PIL import Image

onnxruntime.set_default_logger_severity(3)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "export_googlenet.py"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def caffe_crop(path):
    """Caffe-style preprocessing: shorter side to 256 (bilinear), centre 224 crop.

    Returns float32 [1,3,224,224], RGB, 0..255: the exported model's input contract.
    """
    image = Image.open(path).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize([round(side * scale) for side in image.size], Image.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    crop = image.crop((left, top, left + 224, top + 224))
    return np.asarray(crop, dtype=np.float32).transpose(2, 0, 1)[None].copy()


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def metadata(model):
    return {prop.key: prop.value for prop in model.metadata_props}


def random_pixels(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, 224, 224)).astype(np.float32)


@pytest.fixture(scope="module")
def session(googlenet_path):
    return onnxruntime.InferenceSession(str(googlenet_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def images(shared_dir):
    return {name: caffe_crop(shared_dir / "images" / f"{name}.png")
            for name in ("chelsea", "coffee")}


@pytest.mark.parametrize("name, expected", [
    ("chelsea", {"Egyptian cat": 0.495, "tiger cat": 0.268, "tabby": 0.121}),
    ("coffee", {"espresso": 0.901}),
])
def test_reproduces_reference_predictions(session, googlenet_path, images, name, expected):
    labels = json.loads(metadata(onnx.load(googlenet_path))["onnxattr.labels"])
    prob = session.run(["prob"], {"image": images[name]})[0][0]
    top = np.argsort(prob)[::-1][: len(expected)]
    assert [labels[i] for i in top] == list(expected)
    np.testing.assert_allclose(prob[top], list(expected.values()), atol=0.02)


def test_matches_float64_torch_reference(session, torch_reference, images):
    torch = pytest.importorskip("torch")
    x = np.concatenate([images["chelsea"], images["coffee"], random_pixels(2)])
    logits, prob = session.run(["logits", "prob"], {"image": x})
    with torch.no_grad():
        reference = torch.from_numpy(x.astype(np.float64))
        ref_prob = torch_reference(reference).numpy()
        ref_logits = torch_reference(reference, score="logit").numpy()
    assert np.abs(prob - ref_prob).max() < 1e-4
    assert np.abs(logits - ref_logits).max() < 1e-3 * np.abs(ref_logits).max()


def test_batch_dimension_is_dynamic(session, googlenet_path, images):
    batch_dim = onnx.load(googlenet_path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "N"
    batch = np.concatenate([images["chelsea"], images["coffee"]])
    prob = session.run(["prob"], {"image": batch})[0]
    singles = [session.run(["prob"], {"image": image})[0][0] for image in batch[:, None]]
    np.testing.assert_allclose(prob, singles, atol=1e-6)


def test_graph_structure(googlenet_path):
    model = onnx.load(googlenet_path)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits", "prob"]
    names = [node.name for node in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert "loss3/classifier" in names and "conv1/7x7_s2" in names
    assert not any(node.op_type == "Dropout" for node in model.graph.node)
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    pool5 = next(v for v in inferred if v.name == "pool5/7x7_s1").type.tensor_type.shape.dim
    assert [d.dim_value for d in pool5[1:]] == [1024, 1, 1]


def test_metadata(googlenet_path):
    props = metadata(onnx.load(googlenet_path))
    labels = json.loads(props["onnxattr.labels"])
    assert len(labels) == 1000
    assert (labels[0], labels[281], labels[285], labels[967]) == (
        "tench", "tabby", "Egyptian cat", "espresso")
    contract = json.loads(props["onnxattr.input"])
    assert {k: v for k, v in contract.items() if k != "preprocessing"} == {
        "name": "image", "layout": "NCHW", "channels": "RGB", "range": [0, 255],
        "height": 224, "width": 224}
    assert "mean" in contract["preprocessing"]
    assert props["onnxattr.source"] == "BVLC GoogLeNet (Caffe)"


@pytest.mark.torchvision
@pytest.mark.slow
def test_torchvision_export(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                       transform_input=True)
    # Fresh BatchNorm statistics (mean 0, var 1) make a random net's output input-independent;
    # measure them on one random batch so the comparison below exercises the whole network.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(8, 3, 224, 224))
    net.eval()
    torch.save(net.state_dict(), tmp_path / "googlenet.pth")

    result = run_script("--torchvision", "--weights", tmp_path / "googlenet.pth",
                        "--output", tmp_path / "googlenet.onnx")
    assert result.returncode == 0, result.stderr

    x = random_pixels(2, seed=1)
    model = onnx.load(tmp_path / "googlenet.onnx")
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    logits, prob = session.run(["logits", "prob"], {"image": x})
    with torch.no_grad():
        ref_logits = net(torch.from_numpy((x / 255 - IMAGENET_MEAN) / IMAGENET_STD)).numpy()
    ref_prob = torch.softmax(torch.from_numpy(ref_logits), dim=1).numpy()
    assert ref_prob.max() > 0.01 and np.abs(ref_logits[0] - ref_logits[1]).max() > 0.1
    assert np.abs(prob - ref_prob).max() < 1e-4
    assert np.abs(logits - ref_logits).max() < 1e-3 * np.abs(ref_logits).max()

    assert model.ir_version == 8
    props = metadata(model)
    assert len(json.loads(props["onnxattr.labels"])) == 1000
    assert json.loads(props["onnxattr.input"])["range"] == [0, 255]
    assert props["onnxattr.source"] == "torchvision GoogLeNet"


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(fragment in lines[0] for fragment in fragments)


def test_cli_caffe_export(tmp_path, googlenet_caffe_dir, googlenet_path):
    """The README's first command's export: the script writes the same model as the fixture."""
    result = run_script("--caffe", googlenet_caffe_dir, "--output", tmp_path / "googlenet.onnx")
    assert result.returncode == 0, result.stderr
    assert onnx.load(tmp_path / "googlenet.onnx") == onnx.load(googlenet_path)


def test_cli_missing_caffe_dir(tmp_path):
    result = run_script("--caffe", tmp_path / "absent", "--output", tmp_path / "g.onnx")
    assert_one_line_error(result, "not found", "absent")
    assert not (tmp_path / "g.onnx").exists()


def test_cli_incomplete_caffe_dir(tmp_path, googlenet_caffe_dir):
    for name in ("deploy.prototxt", "synset_words.txt"):
        shutil.copy(googlenet_caffe_dir / name, tmp_path / name)
    result = run_script("--caffe", tmp_path, "--output", tmp_path / "g.onnx")
    assert_one_line_error(result, "missing weight file", "conv1/7x7_s2_filter.bin")
    assert not any(tmp_path.glob("*.onnx"))


@pytest.mark.torchvision
def test_cli_missing_torchvision_weights(tmp_path):
    pytest.importorskip("torchvision")
    result = run_script("--torchvision", "--weights", tmp_path / "absent.pth",
                        "--output", tmp_path / "g.onnx")
    assert_one_line_error(result, "absent.pth")
