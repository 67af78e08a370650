"""Loading an ONNX image classifier and reading what it is: image input, class outputs,
labels, pixel contract and batch size.

Models are read with their external data files (resolved against the model's own folder,
whatever the working directory), so a model saved with weights beside it loads everywhere.
"""

import functools
import hashlib
import json
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ..errors import OnnxAttrError
from .labels import read_labels
from .layout import channels_first_dims, parse_channel_order, parse_layout, resolve_layout
from .quantized import producer_through_qdq, refuse_integer_operators
from .weights import SharedWeights

LABELS_KEY = "onnxattr.labels"
CONTRACT_KEY = "onnxattr.input"
METHOD_KEY = "onnxattr.method"
SCORE_KEY = "onnxattr.score"
STANDARD_DOMAINS = ("", "ai.onnx")
PIXEL_RANGE = (0.0, 255.0)  # what every onnxattr graph takes: RGB pixel values 0..255
# The largest image input onnxattr reads, in pixels (H * W): 8192 x 8192. A run holds the image
# and its gradient many times over (float64 copies to render, batches of integrated gradients'
# path images, the network's activations), well over 100 bytes a pixel, so 2**26 pixels is
# already many GiB: a size beyond it is a broken export, refused at load rather than failing
# for memory in the middle of a run.
MAX_PIXELS = 2 ** 26


def default_opset(proto):
    """The default-domain (ai.onnx) opset a ModelProto imports (0 if none)."""
    return next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)


@dataclass(frozen=True)
class PixelContract:
    """What the model's image input expects, for RGB pixels p in 0..255: the channel order it
    reads (`channel_order`, RGB or BGR: the channels are reordered first), the value range it
    was trained on (`range`, such as 0..1, 0..255 or -1..1) and a per-channel normalisation
    applied before the model, input = (p / 255 * (high - low) + low - mean) / std, with `mean`
    and `std` in the model's channel order. `stated` says whether the model (its onnxattr.input
    metadata) or the user said so, or it is the default assumption."""

    range: tuple = PIXEL_RANGE
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    stated: bool = False
    channel_order: str = "RGB"

    @property
    def is_identity(self):
        return (tuple(self.range) == PIXEL_RANGE and not any(self.mean)
                and all(s == 1 for s in self.std) and self.channel_order == "RGB")

    def scale_shift(self, channels):
        """Per-channel (a, b) with model input = a * p + b, float64 [channels]."""
        low, high = self.range
        std = np.broadcast_to(np.asarray(self.std, np.float64), channels)
        mean = np.broadcast_to(np.asarray(self.mean, np.float64), channels)
        return (high - low) / 255.0 / std, (low - mean) / std

    def as_metadata(self):
        return {"channels": self.channel_order, "range": list(self.range),
                "mean": list(self.mean), "std": list(self.std)}

    def describe(self):
        low, high = self.range
        text = f"{self.channel_order} {low:g}..{high:g}"
        if any(self.mean) or any(s != 1 for s in self.std):
            text += (f", minus mean {', '.join(f'{m:g}' for m in self.mean)}, over std "
                     f"{', '.join(f'{s:g}' for s in self.std)}")
        return text


def pixel_contract(metadata_contract=None, pixel_range=None, mean=None, std=None,
                   channel_order=None):
    """The contract from the model's onnxattr.input metadata (a dict), overridden by what the
    user gives: `pixel_range` "0..1" / "0..255" / "-1..1" or a (low, high) pair, `mean` and
    `std` (one number or one per channel, in the model's range and channel order),
    `channel_order` "rgb" or "bgr" (the metadata's "channels"). Without either, RGB 0..255."""
    stated = {k: v for k, v in dict(metadata_contract or {}).items() if k != "layout"}
    given = any(v is not None for v in (pixel_range, mean, std, channel_order))
    order = parse_channel_order(channel_order, "--channel-order") or parse_channel_order(
        stated.get("channels", "RGB"), f"metadata {CONTRACT_KEY} \"channels\"")
    low, high = _finite("pixel range", parse_range(pixel_range) if pixel_range is not None
                        else stated.get("range", PIXEL_RANGE), "two")
    mean = _finite("mean", mean if mean is not None else stated.get("mean", 0.0), "one or three")
    std = _finite("std", std if std is not None else stated.get("std", 1.0), "one or three")
    if not high > low:
        raise OnnxAttrError(f"bad pixel range {low:g}..{high:g}: low < high")
    if min(std) <= 0:
        raise OnnxAttrError(f"std must be positive, got {', '.join(f'{s:g}' for s in std)}")
    return PixelContract((low, high), mean, std, stated=given or bool(stated),
                         channel_order=order)


def _finite(name, value, count):
    """`value` as a tuple of finite floats, `count` "two" (a range) or "one or three" (per
    channel: one number is used for the three channels); else an error naming `name`."""
    try:
        values = np.asarray(value, float).ravel()
    except (TypeError, ValueError):
        values = None
    sizes = (2,) if count == "two" else (1, 3)
    if values is None or len(values) not in sizes or not np.isfinite(values).all():
        raise OnnxAttrError(f"{name} must be {count} finite numbers, got {value!r}")
    return tuple(float(v) for v in np.broadcast_to(values, max(sizes)))


def parse_range(text, what="pixel range"):
    """"0..1" (or "0,1") -> (0.0, 1.0); a pair stays as it is; None stays None."""
    if not isinstance(text, str):
        return text
    try:
        values = tuple(float(part) for part in text.replace(",", "..").split(".."))
    except ValueError:
        values = ()
    if len(values) != 2 or not np.isfinite(values).all():
        raise OnnxAttrError(f"{what} must look like 0..1 or 0..255, got {text!r}")
    return values


def parse_numbers(text, what):
    """"0.485,0.456,0.406" (or one number) -> a tuple of floats; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise OnnxAttrError(f"{what} must be one number or three, comma-separated, got "
                            f"{text!r}") from None
    if len(values) not in (1, 3):
        raise OnnxAttrError(f"{what} must be one number or three, got {len(values)}")
    if not np.isfinite(values).all():
        raise OnnxAttrError(f"{what} must be finite numbers, got {text!r}")
    return values



@dataclass
class ClassifierModel:
    """An ONNX classifier and the facts the engine needs about it."""

    # with its external data read, its initializers of 16 KiB and more as references to
    # `weights` (onnxattr.io.weights): full_proto() has their data
    proto: onnx.ModelProto
    digest: str  # sha256 of the model file (and its external data): the key of all built from it
    input_name: str
    channels: int
    height: int
    width: int
    num_classes: int
    prob_output: str | None  # graph output holding softmax probabilities, if any
    logits_output: str | None  # tensor holding the logits (graph output or softmax input), if any
    labels: list = field(default_factory=list)
    contract: PixelContract = PixelContract()
    metadata: dict = field(default_factory=dict)
    # a compiled attribution model (onnxattr compile): {"method": ..., "score": ...}, else None
    compiled: dict | None = None
    batch: int | None = None  # the image input's fixed batch size; None when it is free
    # the image input's own layout: "NCHW", or "NHWC" (channels-last; channels, height and
    # width above are still C, H, W, and the prepared graph takes [N, C, H, W])
    layout: str = "NCHW"
    weights: SharedWeights | None = None  # None: made from `proto`, which then references them

    def __post_init__(self):
        if self.weights is None:
            self.weights, self.proto = SharedWeights.load(self.proto)

    def __setstate__(self, state):  # unpickled: its arrays lie elsewhere in this process
        self.__dict__.update(state)
        self.weights.repoint(self.proto)

    def full_proto(self):
        """A copy of the model with its weights' data in place of the references, for what
        reads weights (opset and float16 conversions, the training builder, compile)."""
        return self.weights.restore(self.proto)

    @property
    def opset(self):
        """The model's default-domain (ai.onnx) opset version."""
        return default_opset(self.proto)

    @property
    def has_labels(self):
        """Whether the model names its classes (else they are "class 0", "class 1", ...)."""
        return LABELS_KEY in self.metadata

    @property
    def size(self):
        """(height, width) of the model's image input."""
        return (self.height, self.width)

    def with_contract(self, pixel_range=None, mean=None, std=None, channel_order=None):
        """A copy whose pixel contract is overridden by what the user gives (None: keep)."""
        if pixel_range is None and mean is None and std is None and channel_order is None:
            return self
        if self.compiled:
            raise OnnxAttrError("a compiled attribution model takes RGB pixels 0..255 with its "
                                "contract built in; --pixel-range, --mean, --std and "
                                "--channel-order apply to source models")
        stated = json.loads(self.metadata[CONTRACT_KEY]) if CONTRACT_KEY in self.metadata else {}
        contract = pixel_contract(stated, pixel_range, mean, std, channel_order)
        return replace(self, contract=contract,
                       digest=f"{self.digest}|contract={contract.as_metadata()}")

    def with_labels(self, labels=None):
        """A copy whose classes are named by `labels` (a list, or a file: one per line, or a
        JSON list); None: keep."""
        if labels is None:
            return self
        labels = read_labels(labels)
        if not isinstance(labels, list) or len(labels) != self.num_classes:
            count = f"{len(labels)} names" if isinstance(labels, list) else "no list"
            raise OnnxAttrError(f"labels: {count} for the model's {self.num_classes} classes")
        labels = [str(label) for label in labels]
        return replace(self, labels=labels, metadata={**self.metadata,
                                                       LABELS_KEY: json.dumps(labels)})


def load_model(path, layout=None, output=None):
    """Read and check an ONNX classifier file; raise OnnxAttrError naming what is wrong.
    `layout` ("nchw" or "nhwc") and `output` (a graph output's name) as describe_model."""
    path = Path(path)
    if not path.exists():
        raise OnnxAttrError(f"model file not found: {path}")
    if path.is_dir():
        raise OnnxAttrError(f"model path is a directory, not an ONNX file: {path}")
    if not path.is_file():
        raise OnnxAttrError(f"model path is not a regular file ({_kind(path.stat().st_mode)}): "
                            f"{path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise OnnxAttrError(f"cannot read model file {path}: {err.strerror}") from None
    digest = hashlib.sha256(data)
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise OnnxAttrError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    del data  # the file's bytes go before the weights are copied into shared arrays
    if not proto.graph.node:
        raise OnnxAttrError(f"{path} is not an ONNX model (no graph nodes)")
    for file, extents in _external_data(path, proto).items():
        try:
            with open(file, "rb") as stream:
                for chunk in iter(functools.partial(stream.read, 1 << 24), b""):
                    digest.update(chunk)
                for tensor, offset, length in extents:
                    stream.seek(offset)
                    tensor.raw_data = stream.read(length)
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
        except OSError as err:
            raise OnnxAttrError(f"{path}: cannot read its external data file {file} "
                                f"({err.strerror or err})") from None
    return describe_model(proto, digest.hexdigest(), str(path), layout, output)


def _external_data(path, proto):
    """{file: [(tensor, offset, length)]} for the tensors of `proto` whose data is in external
    files, checked before a byte of them is read: each file is a regular file (not a FIFO that
    blocks, not a device that never ends) inside the model's folder once symlinks are resolved
    (the folder `path` is in, or the one it lives in when `path` is a symlink, as in a Hugging
    Face cache), and long enough for every tensor's offset + length."""
    roots = {path.parent.resolve(), path.resolve().parent}
    files, sizes = {}, {}
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if location not in sizes:
            sizes[location] = _data_file(path, roots, location)
        file, size = sizes[location]
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise OnnxAttrError(f"{path}: tensor {tensor.name} has a bad external data offset "
                                f"or length {info}") from None
        if min(offset, length) < 0 or offset + length > size:
            raise OnnxAttrError(f"{path}: external data file {location!r} has {size} bytes, "
                                f"but tensor {tensor.name} needs bytes {offset}..{offset + length}"
                                " (truncated, or another model's data)")
        files.setdefault(file, []).append((tensor, offset, length))
    return files


def _data_file(path, roots, location):
    """The resolved path and size of an external data file, checked without opening it."""
    where = f"{path}: external data file {location!r}"
    try:
        file = (path.parent / location).resolve()
        if Path(location).is_absolute() or not any(file.is_relative_to(r) for r in roots):
            raise OnnxAttrError(f"{where} is outside the model's folder {path.parent}: "
                                "onnxattr reads data files beside the model only")
        info = file.stat()  # stat opens nothing: a FIFO or device is never read
    except (OSError, RuntimeError, ValueError) as err:  # missing, a symlink loop, a NUL byte
        raise OnnxAttrError(f"{path}: cannot read its external data file {path.parent / location}"
                            f" ({getattr(err, 'strerror', None) or err}); keep it beside the "
                            "model") from None
    if not stat.S_ISREG(info.st_mode):
        raise OnnxAttrError(f"{where} is not a regular file ({_kind(info.st_mode)})")
    return file, info.st_size


def _kind(mode):
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other")


def _tensors(graph):
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _tensors(sub)


def describe_model(proto, digest, name="model", layout=None, output=None):
    """Find the image input and the class outputs of `proto`. `layout`: the image input's
    layout, "nchw" or "nhwc" (None: its onnxattr.input metadata's, else what its shape says,
    onnxattr.io.layout); `output`: the class output's name (None: the first that fits)."""
    metadata = {p.key: p.value for p in proto.metadata_props}
    if METHOD_KEY in metadata:
        return _describe_compiled(proto, digest, name, metadata)
    refuse_integer_operators(proto.graph, name)
    stated = _stated_contract(metadata, name) or {}
    layout = parse_layout(layout, "--layout") or parse_layout(
        stated.get("layout"), f"metadata {CONTRACT_KEY} \"layout\"")
    input_name, channels, height, width, batch, layout = _image_input(proto.graph, name, layout)
    declared_batch = next(_dims(i)[0] for i in proto.graph.input if i.name == input_name)
    prob_output, logits_output, num_classes = _class_outputs(proto.graph, name, declared_batch,
                                                             output)
    labels = _labels(metadata, num_classes, name)
    keys = [f"layout={layout}"] * (layout != "NCHW") + [f"output={output}"] * (output is not None)
    return ClassifierModel(proto, "|".join([digest, *keys]), input_name, channels, height, width,
                           num_classes, prob_output, logits_output, labels,
                           pixel_contract(stated), metadata, batch=batch, layout=layout)


def _stated_contract(metadata, name):
    if CONTRACT_KEY not in metadata:
        return None
    try:
        stated = json.loads(metadata[CONTRACT_KEY])
    except json.JSONDecodeError:
        raise OnnxAttrError(f"{name}: metadata {CONTRACT_KEY} is not JSON") from None
    if not isinstance(stated, dict):
        raise OnnxAttrError(f"{name}: metadata {CONTRACT_KEY} is not a JSON object")
    return stated


def _describe_compiled(proto, digest, name, metadata):
    """A compiled attribution model: inputs image [N, C, H, W] and target [N], outputs prob or
    logits [N, K] and attribution [N, C, H, W] (onnxattr.methods.compile.compile_model)."""
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    if set(inputs) != {"image", "target"} or "attribution" not in outputs or not (
            {"prob", "logits"} & set(outputs)):
        raise OnnxAttrError(f"{name} has {METHOD_KEY} metadata but not the inputs image, target "
                            "and outputs prob or logits, attribution of a compiled model")
    batch, channels, height, width = _dims(inputs["image"])
    class_output = "prob" if "prob" in outputs else "logits"
    num_classes = _dims(outputs[class_output])[1]
    if not all(isinstance(d, int) and d > 0 for d in (channels, height, width, num_classes)):
        raise OnnxAttrError(f"{name}: compiled model without fixed C, H, W and class count")
    _check_size(name, inputs["image"])
    score = metadata.get(SCORE_KEY, "prob")
    return ClassifierModel(proto, digest, "image", channels, height, width, num_classes,
                           "prob" if class_output == "prob" else None,
                           "logits" if class_output == "logits" else None,
                           _labels(metadata, num_classes, name),
                           pixel_contract(_stated_contract(metadata, name)), metadata,
                           {"method": metadata[METHOD_KEY], "score": score},
                           batch if isinstance(batch, int) else None)


def _dims(value_info):
    """Dimensions of a tensor's declared shape: ints, or names/None for symbolic ones."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _type_name(value_info):
    return onnx.TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()


# image input types: float16/bfloat16 models are cast to float32 and integer pixels declared
# float32 in preparation (onnxattr.graph.precision)
IMAGE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


def _image_input(graph, name, layout=None):
    """(name, C, H, W, fixed batch or None, layout) of the graph's one image input, in
    `layout` (None: what its shape says)."""
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(_dims(inputs[0])) != 4 or \
            inputs[0].type.tensor_type.elem_type not in IMAGE_TYPES:
        found = ", ".join(f"{i.name} {_type_name(i)} {_dims(i)}" for i in inputs) or "none"
        raise OnnxAttrError(f"{name} is not an image classifier onnxattr can read: it needs "
                            "exactly one float32, float16, bfloat16, uint8 or int8 input [N, C, H, "
                            f"W] or [N, H, W, C] (found inputs: {found})" + _float16_hint(inputs))
    image = inputs[0]
    layout = resolve_layout(_dims(image), layout, f"{name}: image input {image.name}")
    dims = channels_first_dims(_dims(image), layout)
    batch, channels, height, width = dims
    if not all(isinstance(d, int) and d > 0 for d in (channels, height, width)):
        raise OnnxAttrError(f"{name}: image input {image.name} needs fixed C, H, W "
                            f"(found {_dims(image)}, {layout})")
    if channels != 3:
        other = "NHWC" if layout == "NCHW" else "NCHW"
        flipped = channels_first_dims(_dims(image), other)
        hint = (f"; read as {other} it has 3: give --layout {other.lower()}"
                if flipped[1] == 3 else "; only RGB models (3 channels) are supported")
        raise OnnxAttrError(f"{name}: image input {image.name} {_dims(image)} read as {layout} "
                            f"has {channels} channels{hint}")
    _check_size(name, image, dims)
    return image.name, channels, height, width, batch if isinstance(batch, int) else None, layout


def _check_size(name, image, dims=None):
    """Refuse an image input [N, C, H, W] (C, H, W known positive; `dims` in that order, None:
    the input's own) of a size no run can have."""
    batch, _, height, width = dims or _dims(image)
    if height * width > MAX_PIXELS:
        raise OnnxAttrError(f"{name}: image input {image.name} is {height}x{width} pixels: more "
                            f"than onnxattr's limit of {MAX_PIXELS} (8192x8192)")
    if isinstance(batch, int) and batch < 1:
        raise OnnxAttrError(f"{name}: image input {image.name} declares a batch of {batch}: no "
                            "image fits (export it with batch 1, or a free batch dimension)")


def _float16_hint(inputs):
    if any(i.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE for i in inputs):
        return "; float64 models are not supported: convert the model to float32"
    return ""


def _class_outputs(graph, name, batch, output=None):
    """(softmax output or None, logits tensor, class count): the first output [N, classes] whose
    N can be the image input's batch `batch` (its declared first dimension), preferring one a
    Softmax produces; `output` given: that graph output. An output such as a [32, 32] map of a
    model with batch 1 is no class output."""
    def is_classes(output):
        dims = _dims(output)
        return (len(dims) == 2 and isinstance(dims[1], int) and dims[1] >= 2
                and (dims[0] in (None, batch) or isinstance(dims[0], str)
                     or (dims[0] == 1 and not isinstance(batch, int))))

    producers = {out: node for node in graph.node for out in node.output}
    candidates = [o for o in graph.output if is_classes(o)]
    if output is not None:
        chosen = [o for o in graph.output if o.name == output]
        found = ", ".join(f"{o.name} {_dims(o)}" for o in graph.output)
        if not chosen:
            raise OnnxAttrError(f"{name} has no output '{output}' (outputs: {found})")
        if chosen[0] not in candidates:
            raise OnnxAttrError(f"{name}: output {output} {_dims(chosen[0])} is not a class "
                                f"output [N, classes] with N the image's batch {batch}")
        candidates = chosen
    for output in candidates:
        node = producer_through_qdq(producers, output.name)
        if node is not None and node.op_type == "Softmax":
            return output.name, node.input[0], _dims(output)[1]
    if candidates:
        return None, candidates[0].name, _dims(candidates[0])[1]
    found = ", ".join(f"{o.name} {_dims(o)}" for o in graph.output) or "none"
    raise OnnxAttrError(f"{name} is not an image classifier: no softmax or logits output "
                        f"[N, classes] with N the image's batch {batch} (found outputs: {found})")


def _labels(metadata, num_classes, name):
    if LABELS_KEY not in metadata:
        return [f"class {i}" for i in range(num_classes)]
    try:
        labels = json.loads(metadata[LABELS_KEY])
    except json.JSONDecodeError:
        raise OnnxAttrError(f"{name}: metadata {LABELS_KEY} is not a JSON list") from None
    if not isinstance(labels, list) or len(labels) != num_classes:
        raise OnnxAttrError(f"{name}: metadata {LABELS_KEY} must list {num_classes} labels")
    return [str(label) for label in labels]
