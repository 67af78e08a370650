"""Reading models as outside users bring them: external data, a fixed batch size, a stated or
assumed pixel contract, shared (deduplicated) weights, and models onnxattr cannot read, which
get one line that says why."""

import builtins
import io
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxattr import Explainer, OnnxAttrError, compile_model
from onnxattr.errors import OnnxAttrNote
from onnxattr.graph.runtime import onnxruntime
from onnxattr.io.model import load_model

import small_models
from tolerance import rel_l2

RNG = np.random.default_rng(0)
PIXELS = RNG.uniform(0, 255, (3, 3, 8, 8)).astype(np.float32)


def labelled(model, contract=None):
    props = {"onnxattr.labels": json.dumps(small_models.LABELS)}
    if contract is not None:
        props["onnxattr.input"] = json.dumps(contract)
    helper.set_model_props(model, props)
    return model


# --- external data -------------------------------------------------------------------------------


def test_external_data_loads_from_any_working_directory(tmp_path, monkeypatch):
    model = labelled(small_models.conv_relu_maxpool_lrn(), {"range": [0, 255]})
    inline_path = small_models.save(model, tmp_path / "inline.onnx")
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.weights",
              size_threshold=0)  # (this converts `model` in place)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    explainer = Explainer(folder / "m.onnx", cache_dir=tmp_path / "cache")
    inline = Explainer(inline_path, cache_dir=tmp_path / "cache2")
    np.testing.assert_allclose(explainer.engine.forward(PIXELS)[0],
                               inline.engine.forward(PIXELS)[0], rtol=1e-6)
    got = explainer.engine.gradient(PIXELS, [0, 1, 2])[0]
    assert rel_l2(got, inline.engine.gradient(PIXELS, [0, 1, 2])[0]) < 1e-6
    compiled = compile_model(folder / "m.onnx", "gradient", output=tmp_path / "c.onnx",
                             cache_dir=tmp_path / "cache")
    onnx.save(compiled, folder / "compiled.onnx", save_as_external_data=True,
              location="compiled.weights", size_threshold=0)
    runner = Explainer(folder / "compiled.onnx")
    assert rel_l2(runner.engine.gradient(PIXELS, [0, 1, 2])[0], got) < 1e-5


def test_missing_external_data_file_is_named(tmp_path):
    model = labelled(small_models.conv_relu_maxpool_lrn())
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.weights",
              size_threshold=0)
    (tmp_path / "m.weights").unlink()
    with pytest.raises(OnnxAttrError, match="external data file .*m.weights"):
        load_model(tmp_path / "m.onnx")


def test_external_data_counts_in_the_cache_key(tmp_path):
    """Two models that differ only in their external weights never share a cached graph."""
    digests = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        onnx.save(small_models.conv_relu_maxpool_lrn(seed), folder / "m.onnx",
                  save_as_external_data=True, location="w", size_threshold=0)
        digests.append(load_model(folder / "m.onnx").digest)
    assert digests[0] != digests[1]


def external_model(folder, location="m.weights"):
    """A small classifier saved in `folder` as m.onnx with its weights in m.weights, then
    pointed at `location` for them."""
    folder.mkdir(exist_ok=True)
    onnx.save(labelled(small_models.conv_relu_maxpool_lrn()), folder / "m.onnx",
              save_as_external_data=True, location="m.weights", size_threshold=0)
    relocate(folder / "m.onnx", location)
    return folder / "m.onnx"


def relocate(path, location):
    """Point the external data of the model at `path` to `location`."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(location)
    onnx.save(model, path)


def refused(path, problem):
    """load_model refuses `path` with one line matching `problem` (in 10 s: a FIFO that is
    opened blocks forever)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(load_model, path)
        try:
            error = future.exception(timeout=10)
        except concurrent.futures.TimeoutError:
            os.close(os.open(path.parent / "pipe", os.O_WRONLY | os.O_NONBLOCK))  # unblock it
            raise AssertionError(f"load_model({path}) hangs") from None
    assert isinstance(error, OnnxAttrError), error
    assert "\n" not in str(error) and str(path) in str(error), error
    assert __import__("re").search(problem, str(error)), error


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink", "/dev/zero",
                                   "symlink to /dev/zero", "fifo", "directory", "empty"])
def test_external_data_is_checked_before_it_is_read(tmp_path, monkeypatch, where):
    """Only regular files inside the model's folder are read: not /etc/passwd, not /dev/zero
    (which never ends), not a FIFO (which blocks forever), not a file a symlink leads out to."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.zeros(1000, np.float32).tobytes())
    folder = tmp_path / "models"
    location, problem = {
        "absolute": (outside, "outside the model's folder"),
        "parent": ("../outside.bin", "outside the model's folder"),
        "symlink": ("link.bin", "outside the model's folder"),
        "/dev/zero": ("/dev/zero", "outside the model's folder"),
        "symlink to /dev/zero": ("zero.bin", "outside the model's folder"),
        "fifo": ("pipe", "not a regular file"),
        "directory": ("sub", "not a regular file"),
        "empty": ("", "not a regular file"),
    }[where]
    path = external_model(folder, location)
    (folder / "link.bin").symlink_to(outside)
    (folder / "zero.bin").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe")
    (folder / "sub").mkdir()
    opened = []

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)
    real_open = io.open
    monkeypatch.setattr(io, "open", spy)  # (pathlib's)
    monkeypatch.setattr(builtins, "open", spy)
    refused(path, f"external data file '{location}' .*{problem}")
    assert opened == [str(path)]


def test_external_data_is_checked_against_every_tensor_offset_and_length(tmp_path):
    path = external_model(tmp_path / "models")
    weights = path.parent / "m.weights"
    weights.write_bytes(weights.read_bytes()[:-10])  # the last tensor runs past the end
    refused(path, r"'m.weights' .*\d+ bytes.* tensor head_b needs bytes \d+\.\.\d+")


def test_external_data_inside_the_folder_loads(tmp_path):
    path = external_model(tmp_path / "models")
    want = load_model(small_models.save(labelled(small_models.conv_relu_maxpool_lrn()),
                                        tmp_path / "inline.onnx")).full_proto().graph.initializer
    (path.parent / "sub").mkdir()
    (path.parent / "m.weights").rename(path.parent / "sub" / "w")
    (path.parent / "link").symlink_to("sub/w")  # a symlink that stays inside is followed
    for location in ("sub/w", "link", "./sub/../link"):
        relocate(path, location)
        got = load_model(path).full_proto().graph.initializer
        assert [t.name for t in got] == [t.name for t in want]
        for g, w in zip(got, want):
            assert not g.external_data
            np.testing.assert_array_equal(numpy_helper.to_array(g), numpy_helper.to_array(w))


def test_symlinked_model_reads_data_beside_its_real_file(tmp_path):
    """A Hugging Face cache: snapshots/<rev>/m.onnx and m.weights are symlinks into blobs/."""
    blobs = tmp_path / "blobs"
    external_model(blobs)
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    for name in ("m.onnx", "m.weights"):
        (snapshot / name).symlink_to(f"../../blobs/{name}")
    assert load_model(snapshot / "m.onnx").digest == load_model(blobs / "m.onnx").digest


def test_model_path_that_is_not_a_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    refused(tmp_path / "pipe", "not a regular file")


# --- a fixed batch size ----------------------------------------------------------------------------


def fixed_batch_model():
    """A batch-1 export whose Reshape has the batch baked in: [1, 3, 8, 8] -> [1, 3, 64]. Fed a
    batch of N, it silently averages over all N images (rows mix) instead of failing."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="batch_baked_in"),
             helper.make_node("ReduceMean", ["flat"], ["mean"], name="mean", axes=[2], keepdims=0),
             helper.make_node("Gemm", ["mean", "head_w"], ["logits"], name="head", transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1)]
    inits = {"w": rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.05,
             "shape": np.array([1, 3, -1], np.int64),
             "head_w": rng.standard_normal((5, 3)).astype(np.float32) * 0.2}
    graph = helper.make_graph(
        nodes, "fixed", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return labelled(model, {"range": [0, 255]})


@pytest.fixture
def fixed_batch(tmp_path):
    path = small_models.save(fixed_batch_model(), tmp_path / "fixed.onnx")
    return path, Explainer(path, cache_dir=tmp_path / "cache")


def test_fixed_batch_model_runs_row_by_row(fixed_batch, builder, tmp_path):
    path, _ = fixed_batch
    explainer = Explainer(path, cache_dir=tmp_path / "cache", builder=builder)
    assert explainer.classifier.batch == 1
    images = [p.transpose(1, 2, 0).round().astype(np.uint8) for p in PIXELS]
    batch = explainer.explain(images, "gradient", target=[0, 1, 2])
    for image, target, result in zip(images, [0, 1, 2], batch):
        alone = explainer.explain(image, "gradient", target=target)
        np.testing.assert_array_equal(result.attribution, alone.attribution)
    ig = explainer.explain(images[:2], "integrated-gradients", steps=5, batch_size=4)
    for image, result in zip(images, ig):
        alone = explainer.explain(image, "integrated-gradients", steps=5, batch_size=1)
        assert rel_l2(result.attribution, alone.attribution) < 1e-6


def test_compiled_fixed_batch_model_keeps_its_batch(fixed_batch, tmp_path):
    path, explainer = fixed_batch
    compiled_path = tmp_path / "compiled.onnx"
    compile_model(path, "gradient", output=compiled_path, cache_dir=tmp_path / "cache")
    compiled = load_model(compiled_path)
    assert compiled.batch == 1
    session = onnxruntime.InferenceSession(str(compiled_path))
    with pytest.raises(Exception, match="dimension|Got: 3 Expected: 1"):  # refused, never mixed
        session.run(["attribution"], {"image": PIXELS, "target": np.array([0, 1, 2])})
    runner = Explainer(compiled_path)
    rows = runner.engine.gradient(PIXELS, [0, 1, 2])[0]
    for row, pixels, target in zip(rows, PIXELS, [0, 1, 2]):
        alone = explainer.engine.gradient(pixels[None], [target])[0][0]
        assert rel_l2(row, alone) < 1e-6
    ig = runner.explain([p.transpose(1, 2, 0).round().astype(np.uint8) for p in PIXELS[:2]],
                        "integrated-gradients", steps=4)
    assert all(np.isfinite(r.attribution).all() for r in ig)


# --- the pixel contract ----------------------------------------------------------------------------


def normalised_model():
    """The small classifier behind torchvision's normalisation: it expects (x/255 - mean)/std."""
    return small_models.conv_relu_maxpool_lrn(seed=4)


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_declared_contract_is_prepended_so_gradients_are_per_pixel(tmp_path):
    model = labelled(normalised_model())
    path = small_models.save(model, tmp_path / "norm.onnx")
    explainer = Explainer(path, cache_dir=tmp_path / "cache", pixel_range="0..1", mean=MEAN,
                          std=STD)
    scale = 1 / 255 / np.array(STD).reshape(1, 3, 1, 1)
    model_input = (PIXELS / 255 - np.array(MEAN).reshape(1, 3, 1, 1)) / np.array(
        STD).reshape(1, 3, 1, 1)
    raw = Explainer(path, cache_dir=tmp_path / "cache2")  # fed as is: the model's own input
    np.testing.assert_allclose(explainer.engine.forward(PIXELS)[0],
                               raw.engine.forward(model_input.astype(np.float32))[0], rtol=1e-5)
    got = explainer.engine.gradient(PIXELS, [0, 1, 2])[0]
    want = raw.engine.gradient(model_input.astype(np.float32), [0, 1, 2])[0] * scale
    assert rel_l2(got, want) < 1e-5
    assert explainer.classifier.digest != raw.classifier.digest  # its own cached graphs


def test_contract_from_metadata(tmp_path):
    model = labelled(normalised_model(), {"range": [0, 1], "mean": list(MEAN), "std": list(STD)})
    stated = Explainer(small_models.save(model, tmp_path / "m.onnx"), cache_dir=tmp_path / "c")
    given = Explainer(small_models.save(labelled(normalised_model()), tmp_path / "n.onnx"),
                      cache_dir=tmp_path / "d", pixel_range="0..1", mean=MEAN, std=STD)
    np.testing.assert_allclose(stated.engine.gradient(PIXELS, [1, 1, 1])[0],
                               given.engine.gradient(PIXELS, [1, 1, 1])[0], rtol=1e-6)


def test_unstated_contract_is_assumed_and_said(tmp_path):
    path = small_models.save(labelled(normalised_model()), tmp_path / "m.onnx")
    explainer = Explainer(path, cache_dir=tmp_path / "c")
    with pytest.warns(OnnxAttrNote, match="states no pixel contract.*assumed it takes RGB 0..255"):
        explainer.classify(PIXELS[0].transpose(1, 2, 0).astype(np.uint8))


@pytest.mark.parametrize("options, problem", [
    (dict(pixel_range="0..x"), "pixel range must look like 0..1"),
    (dict(pixel_range="1..0"), "low < high"),
    (dict(std=(0.2, 0.0, 0.2)), "std must be positive"),
    (dict(mean=(1, 2)), r"mean must be one or three finite numbers, got \(1, 2\)"),
    (dict(std=float("nan")), "std must be one or three finite numbers, got nan"),
    (dict(mean=(0, "x", 0)), "mean must be one or three finite numbers"),
])
def test_bad_contract_is_refused(tmp_path, options, problem):
    path = small_models.save(labelled(normalised_model()), tmp_path / "m.onnx")
    with pytest.raises(OnnxAttrError, match=problem):
        Explainer(path, cache_dir=tmp_path / "c", **options)


# --- shared weights, models that are not for us ----------------------------------------------------


def test_batchnorm_parameters_through_identity(tmp_path, builder):
    """torch's exporter deduplicates equal tensors (DenseNet at random init: BatchNorm weight ==
    running_var) and feeds the copies through Identity nodes."""
    model = small_models.concat_batchnorm()
    graph = model.graph
    bn = next(n for n in graph.node if n.name == "bn_b")
    graph.node.insert(0, helper.make_node("Identity", [bn.input[4]], ["shared_var"],
                                          name="dedup"))
    bn.input[1] = "shared_var"  # gamma := var, as in the export
    path = small_models.save(labelled(model, {"range": [0, 255]}), tmp_path / "m.onnx")
    explainer = Explainer(path, cache_dir=tmp_path / "c", builder=builder)
    gradient = explainer.engine.gradient(PIXELS, [0, 1, 2])[0]
    reference = small_models.reference_evaluator(onnx.load(path))
    eps, index = 1e-3, (1, 2, 3, 4)

    def score(x):
        return reference.run(["prob"], {"image": x})[0][1, 1]
    x = PIXELS.astype(np.float64)
    step = np.zeros_like(x)
    step[index] = eps
    assert gradient[index] == pytest.approx((score(x + step) - score(x - step)) / (2 * eps),
                                            rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("elem_type, shape, problem", [
    (TensorProto.DOUBLE, [1, 3, 8, 8], "float64 models are not supported"),
    (TensorProto.FLOAT, [1, 3, 8, 3], "could be channels-first [N, C, H, W] or channels-last "
                                      "[N, H, W, C]: give --layout nchw or --layout nhwc"),
    (TensorProto.FLOAT, [1, 8, 8, 8], "read as NCHW has 8 channels; only RGB models"),
    (TensorProto.FLOAT, [1, 3, 1000000, 1000000],
     "1000000x1000000 pixels: more than onnxattr's limit of 67108864"),
    (TensorProto.FLOAT, [0, 3, 8, 8], "declares a batch of 0"),
])
def test_unreadable_inputs_say_why(tmp_path, elem_type, shape, problem):
    model = small_models.conv_relu_maxpool_lrn()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("image", elem_type, shape))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxAttrError) as error:
        load_model(path)
    assert problem in str(error.value) and "\n" not in str(error.value)


def test_onnxattr_does_not_import_torch(tmp_path):
    """The training build imports torch when torch is installed (about 15 s and a CUDA warning
    on stderr); onnxattr keeps it out."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, onnxattr, onnxattr.app.cli; "
                           "print('torch' in sys.modules)"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "default"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False" and done.stderr == ""


def map_model(batch):
    """image [batch, 3, 32, 32] -> ReduceSum over channels -> a [32, 32] map (batch 1) or
    [batch, 32, 32] -> Reshape to the declared output."""
    nodes = [helper.make_node("ReduceSum", ["image", "axes"], ["summed"], keepdims=0),
             helper.make_node("Reshape", ["summed", "shape"], ["map"])]
    graph = helper.make_graph(
        nodes, "map", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                     [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, [32, 32])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes"),
         numpy_helper.from_array(np.array([32, 32], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", [1, "N"])
def test_a_map_output_is_not_taken_for_classes(tmp_path, batch):
    """A [32, 32] output of a model whose batch is 1 (or free) is a map, not 32 classes."""
    path = tmp_path / "map.onnx"
    onnx.save(map_model(batch), path)
    with pytest.raises(OnnxAttrError, match=r"not an image classifier.*map \[32, 32\]"):
        load_model(path)


def test_class_output_follows_the_image_batch(tmp_path):
    """[N, classes] with the image's own batch dimension is a class output, fixed or free."""
    for batch in (1, 4, "N"):
        model = small_models.conv_relu_maxpool_lrn()
        model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
        model.graph.output[0].type.tensor_type.shape.dim[0].Clear()
        for value in (model.graph.input[0], model.graph.output[0]):
            dim = value.type.tensor_type.shape.dim[0]
            if batch == "N":
                dim.dim_param = batch
            else:
                dim.dim_value = batch
        path = tmp_path / f"b{batch}.onnx"
        onnx.save(model, path)
        assert load_model(path).num_classes == 5


# --- tensor names onnxattr's own graphs use --------------------------------------------------------


def renamed(model, old, new):
    """`model` with its tensor `old` called `new` (a graph output too, if it is one)."""
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for output in model.graph.output:
        output.name = new if output.name == old else output.name
    return model


@pytest.fixture(scope="module")
def names_cache(tmp_path_factory):
    """One graph cache for the cases below: the unrenamed models' graphs are built once."""
    return tmp_path_factory.mktemp("names_cache")


@pytest.mark.parametrize("softmax, old, new", [
    (False, "logits", "prob"),  # logits only, under the name of the Softmax onnxattr appends
    (True, "prob", "onehot"),  # the score head's input
    (True, "logits", "image_grad"),  # the image gradient
    (True, "d", "p_grad"),  # the gradient of p (Grad-CAM's default layer; the training builder's name)
])
def test_tensor_names_onnxattr_uses_are_free_in_the_model(tmp_path, names_cache, builder, softmax,
                                                          old, new):
    """A model may name its tensors as onnxattr names the outputs it adds: same results."""
    images = [p.transpose(1, 2, 0).round().astype(np.uint8) for p in PIXELS[:2]]
    results = []
    for model in (small_models.concat_batchnorm(softmax=softmax),
                  renamed(small_models.concat_batchnorm(softmax=softmax), old, new)):
        path = small_models.save(labelled(model, {"range": [0, 255]}), tmp_path / f"{new}.onnx")
        explainer = Explainer(path, cache_dir=names_cache, builder=builder)
        results.append([explainer.explain(images, method, target=[1, 3])
                        for method in ("gradient", "grad-cam")])
    for original, same in zip(*results):
        for a, b in zip(original, same):
            np.testing.assert_array_equal(a.attribution, b.attribution)
