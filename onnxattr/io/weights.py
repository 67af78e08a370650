"""One copy of a model's weights per process, whatever the number of graphs and sessions.

Every graph onnxattr runs (the forward graph, one gradient graph per ReLU rule, score and
layer) carries the model's initializers, and every onnxruntime session made from a graph kept
its own copy of them, plus a prepacked copy of each Gemm and MatMul weight: VGG11-BN (531 MB)
peaked at 13.6 GB for gradient, guided backprop and integrated gradients. `SharedWeights`
holds the model's large initializers once, as arrays that onnxruntime reads in place
(SessionOptions.add_initializer); `strip` replaces them in a graph by references to those
arrays (onnxruntime's in-memory external data, `MEMORY_TAG`), so a graph kept for its sessions
is a few kilobytes. The loaded model itself (onnxattr.io.model.ClassifierModel) keeps such
references only: what reads weights restores them (`restore`, `array`). Only an initializer
equal to the model's (same name, type, shape and bytes) is shared: a weight a forward fix
rewrote keeps its own data.

Sessions made with shared weights have prepacking off (its copies are per session);
onnxruntime's NCHWc layout still keeps a reordered copy of each Conv weight per session.
Measured in docs/scale.md (scripts/bench_memory.py).
"""

import functools
import os
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxAttrError

MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"  # onnxruntime: external data at a memory address (offset)
MIN_SHARED_BYTES = 16 * 1024  # smaller initializers stay in the graphs


class SharedWeights:
    """The initializers of `proto` of at least MIN_SHARED_BYTES, held once as arrays."""

    def __init__(self, proto):
        self.arrays = {}
        for tensor in proto.graph.initializer:
            if tensor.data_location == onnx.TensorProto.DEFAULT and _nbytes(tensor) >= \
                    MIN_SHARED_BYTES:
                self.arrays[tensor.name] = np.ascontiguousarray(numpy_helper.to_array(tensor))
        self._values = None

    def __getstate__(self):  # pickled without the OrtValues, made again where unpickled
        return {**self.__dict__, "_values": None}

    def ort_values(self, ort):
        """{name: OrtValue over the array} (made once; onnxruntime `ort`'s OrtValue)."""
        if self._values is None:
            self._values = {name: ort.OrtValue.ortvalue_from_numpy(array)
                            for name, array in self.arrays.items()}
        return self._values

    def strip(self, model):
        """(a copy of `model` whose initializers equal to shared ones reference them, the names
        of the initializers that do); `model` itself when it has nothing more to strip. The
        copy is made without the shared data: a protobuf message frees nothing before it goes
        (a copied tensor whose data is cleared keeps its bytes)."""
        kinds = [self._kind(tensor) for tensor in model.graph.initializer]
        names = [t.name for t, kind in zip(model.graph.initializer, kinds) if kind]
        if "equal" not in kinds:
            return model, names
        equal = {t.name for t, kind in zip(model.graph.initializer, kinds) if kind == "equal"}
        return self._referencing(model, equal), names

    @classmethod
    def load(cls, proto):
        """(the SharedWeights of `proto`, a copy of `proto` that references them): the process
        then holds the weights once, once `proto` goes (onnxattr.io.model.ClassifierModel). The
        arrays are made from `proto`, so no initializer is compared with its array."""
        weights = cls(proto)
        return weights, weights._referencing(proto, set(weights.arrays))

    def _referencing(self, model, names):
        """A copy of `model` whose initializers named in `names` (each equal to its shared
        array) reference the shared arrays."""
        return _with_initializers(model, lambda tensor: self._reference(tensor)
                                  if tensor.name in names else None)

    def _reference(self, tensor):
        """`tensor` (name, type, shape) as a reference to its shared array."""
        array = self.arrays[tensor.name]
        return onnx.TensorProto(
            name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
            data_location=onnx.TensorProto.EXTERNAL, external_data=[
                onnx.StringStringEntryProto(key=key, value=str(value)) for key, value in (
                    ("location", MEMORY_TAG), ("offset", array.ctypes.data),
                    ("length", array.nbytes))])

    def restore(self, model):
        """A copy of `model` with the shared data back in place of its references (for what
        reads weights, and an onnxruntime that refuses references: see loads_references)."""
        return _with_initializers(model, lambda tensor: numpy_helper.from_array(
            self.arrays[tensor.name], tensor.name) if self._kind(tensor) == "reference" else None)

    def array(self, tensor):
        """The values of initializer `tensor`: its shared array when it references one (the
        array itself: read only), else its own data."""
        referenced = tensor.data_location == onnx.TensorProto.EXTERNAL and \
            self._kind(tensor) == "reference"
        return self.arrays[tensor.name] if referenced else numpy_helper.to_array(tensor)

    def repoint(self, model):
        """`model` (changed in place) with its references to shared data pointed at this
        process's arrays: a graph from the cache was written by another process, a swapped
        one (onnxattr.graph.randomize) built on another model's arrays. A reference to no
        shared array of its name, shape and type is an OnnxAttrError."""
        for tensor in model.graph.initializer:
            entries = {e.key: e for e in tensor.external_data}
            if tensor.data_location != onnx.TensorProto.EXTERNAL or \
                    entries.get("location", onnx.StringStringEntryProto()).value != MEMORY_TAG:
                continue
            array = self.arrays.get(tensor.name)
            if array is None or tuple(tensor.dims) != array.shape or \
                    onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) != array.dtype or \
                    not {"offset", "length"} <= entries.keys():
                raise OnnxAttrError(f"a graph references weights '{tensor.name}' that the model "
                                    "does not have")
            entries["offset"].value, entries["length"].value = str(array.ctypes.data), str(
                array.nbytes)
        return model

    def _kind(self, tensor):
        """"equal" for an initializer with a shared one's data, "reference" for one that
        references it already, else None."""
        array = self.arrays.get(tensor.name)
        if array is None:
            return None
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            return "reference" if info == {"location": MEMORY_TAG, "offset": str(
                array.ctypes.data), "length": str(array.nbytes)} else None
        if tuple(tensor.dims) != array.shape or \
                onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) != array.dtype:
            return None
        return "equal" if np.array_equal(numpy_helper.to_array(tensor), array) else None


@functools.cache
def loads_references(ort):
    """Whether onnxruntime `ort` loads a graph file whose initializers reference memory
    (1.19 does; 1.32 refuses a model protobuf with such a marker)."""
    source = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [MIN_SHARED_BYTES // 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(MIN_SHARED_BYTES // 4, np.float32), "w")]))
    probe = SharedWeights(source)
    model, _ = probe.strip(source)
    model.ir_version, model.opset_import[0].version = 8, 13
    options = ort.SessionOptions()
    options.add_initializer("w", probe.ort_values(ort)["w"])
    with tempfile.TemporaryDirectory(prefix="onnxattr-") as folder:
        path = os.path.join(folder, "probe.onnx")
        onnx.save(model, path)
        try:
            ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own exception types per build
            return False
    return True


def without_data(model, min_bytes=MIN_SHARED_BYTES):
    """A copy of `model` whose initializers of `min_bytes` and more keep their name, type and
    shape but not their data (marked external, location "omitted"): enough for shape
    inference, which would otherwise pass the whole model through several copies."""
    def shape_only(tensor):
        if tensor.data_location == onnx.TensorProto.DEFAULT and _nbytes(tensor) >= min_bytes:
            return onnx.TensorProto(
                name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                data_location=onnx.TensorProto.EXTERNAL,
                external_data=[onnx.StringStringEntryProto(key="location", value="omitted")])
        return None

    return _with_initializers(model, shape_only)


def _with_initializers(model, replacement):
    """A copy of `model` with each initializer replaced by `replacement(tensor)` where that
    gives one, the others copied as they are. The graph is copied field by field without its
    initializers, so no weight is copied only to be dropped (a protobuf message frees nothing
    before it goes: a copied tensor whose data is cleared keeps its bytes)."""
    copy = _copy_fields(model, onnx.ModelProto(), skip="graph")
    graph = _copy_fields(model.graph, copy.graph, skip="initializer")
    for tensor in model.graph.initializer:
        new = replacement(tensor)
        graph.initializer.append(tensor if new is None else new)
    return copy


def _copy_fields(source, target, skip):
    """Copy every field of protobuf message `source` but `skip` into `target`; returns it."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    return target


def _nbytes(tensor):
    """Bytes of a tensor's data (0 for a type numpy cannot hold)."""
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError):
        return 0
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
