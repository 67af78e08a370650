"""Loading an ONNX image classifier and reading what it is: image input, class outputs, labels."""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxAttrError

LABELS_KEY = "onnxattr.labels"
CONTRACT_KEY = "onnxattr.input"
METHOD_KEY = "onnxattr.method"
SCORE_KEY = "onnxattr.score"


@dataclass
class ClassifierModel:
    """An ONNX classifier and the facts the engine needs about it."""

    proto: onnx.ModelProto
    digest: str  # sha256 of the serialized model: the cache key of everything built from it
    input_name: str
    channels: int
    height: int
    width: int
    num_classes: int
    prob_output: str | None  # graph output holding softmax probabilities, if any
    logits_output: str | None  # tensor holding the logits (graph output or softmax input), if any
    labels: list = field(default_factory=list)
    contract: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    # a compiled attribution model (onnxattr compile): {"method": ..., "score": ...}, else None
    compiled: dict | None = None

    @property
    def opset(self):
        """The model's default-domain (ai.onnx) opset version."""
        return default_opset(self.proto)

    @property
    def size(self):
        """(height, width) of the model's image input."""
        return (self.height, self.width)


def default_opset(proto):
    """The default-domain (ai.onnx) opset a ModelProto imports (0 if none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_model(path):
    """Read and check an ONNX classifier file; raise OnnxAttrError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise OnnxAttrError(f"model file not found: {path}")
    if path.is_dir():
        raise OnnxAttrError(f"model path is a directory, not an ONNX file: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise OnnxAttrError(f"cannot read model file {path}: {err.strerror}") from None
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise OnnxAttrError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    if not proto.graph.node:
        raise OnnxAttrError(f"{path} is not an ONNX model (no graph nodes)")
    return describe_model(proto, hashlib.sha256(data).hexdigest(), str(path))


def describe_model(proto, digest, name="model"):
    """Find the image input and the class outputs of `proto`."""
    metadata = {p.key: p.value for p in proto.metadata_props}
    if METHOD_KEY in metadata:
        return _describe_compiled(proto, digest, name, metadata)
    input_name, channels, height, width = _image_input(proto.graph, name)
    prob_output, logits_output, num_classes = _class_outputs(proto.graph, name)
    labels = _labels(metadata, num_classes, name)
    contract = json.loads(metadata[CONTRACT_KEY]) if CONTRACT_KEY in metadata else {}
    return ClassifierModel(proto, digest, input_name, channels, height, width, num_classes,
                           prob_output, logits_output, labels, contract, metadata)


def _describe_compiled(proto, digest, name, metadata):
    """A compiled attribution model: inputs image [N, C, H, W] and target [N], outputs prob or
    logits [N, K] and attribution [N, C, H, W] (onnxattr.lower.compile_model)."""
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    if set(inputs) != {"image", "target"} or "attribution" not in outputs or not (
            {"prob", "logits"} & set(outputs)):
        raise OnnxAttrError(f"{name} has {METHOD_KEY} metadata but not the inputs image, target "
                            "and outputs prob or logits, attribution of a compiled model")
    _, channels, height, width = _dims(inputs["image"])
    class_output = "prob" if "prob" in outputs else "logits"
    num_classes = _dims(outputs[class_output])[1]
    if not all(isinstance(d, int) and d > 0 for d in (channels, height, width, num_classes)):
        raise OnnxAttrError(f"{name}: compiled model without fixed C, H, W and class count")
    score = metadata.get(SCORE_KEY, "prob")
    contract = json.loads(metadata[CONTRACT_KEY]) if CONTRACT_KEY in metadata else {}
    return ClassifierModel(proto, digest, "image", channels, height, width, num_classes,
                           "prob" if class_output == "prob" else None,
                           "logits" if class_output == "logits" else None,
                           _labels(metadata, num_classes, name), contract, metadata,
                           {"method": metadata[METHOD_KEY], "score": score})


def _dims(value_info):
    """Dimensions of a tensor's declared shape: ints, or names/None for symbolic ones."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def _image_input(graph, name):
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    images = [i for i in inputs if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
              and len(_dims(i)) == 4]
    if len(images) != 1 or len(inputs) != 1:
        found = ", ".join(f"{i.name} {_dims(i)}" for i in inputs) or "none"
        raise OnnxAttrError(f"{name} is not an image classifier: it needs exactly one float "
                            f"input [N, C, H, W] (found inputs: {found})")
    _, channels, height, width = _dims(images[0])
    if not all(isinstance(d, int) and d > 0 for d in (channels, height, width)):
        raise OnnxAttrError(f"{name}: image input {images[0].name} needs fixed C, H, W "
                            f"(found {_dims(images[0])})")
    if channels != 3:
        raise OnnxAttrError(f"{name}: image input {images[0].name} has {channels} channels; "
                            "only RGB models (3 channels) are supported")
    return images[0].name, channels, height, width


def _class_outputs(graph, name):
    producers = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        dims = _dims(output)
        if len(dims) != 2 or not isinstance(dims[1], int) or dims[1] < 2:
            continue
        node = producers.get(output.name)
        if node is not None and node.op_type == "Softmax":
            return output.name, node.input[0], dims[1]
    for output in graph.output:
        dims = _dims(output)
        if len(dims) == 2 and isinstance(dims[1], int) and dims[1] >= 2:
            return None, output.name, dims[1]
    found = ", ".join(f"{o.name} {_dims(o)}" for o in graph.output) or "none"
    raise OnnxAttrError(f"{name} is not an image classifier: no softmax or logits output "
                        f"[N, classes] (found outputs: {found})")


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
