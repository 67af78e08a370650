"""The graph toolkit every pass stands on: one ONNX graph under edit, its producers and
consumers, constants, attributes, a topological order, shape inference and pruning.

Passes (forward fixes, the native reverse pass, the ReLU rule rewrite, the lowering of training
ops, weight randomization) build new node lists with `GraphEditor` and install them with
`GraphEditor.set_nodes`, which keeps the producer/consumer index current.
"""

import heapq

import numpy as np
import onnx
import onnx.version_converter
from onnx import helper, numpy_helper

from ..errors import OnnxAttrError
from ..io.model import STANDARD_DOMAINS, default_opset
from ..io.weights import without_data
from .control_flow import reads
from .runtime import make_session, onnxruntime

MAX_IR_VERSION = 10  # the newest IR version every runtime we target loads (ORT-training 1.19.2)
# The oldest default-domain opset of the graphs onnxattr writes: ScatterElements with reduction
# "add" needs 16, ReduceSum's axes input 13; every stock runtime runs 17.
MIN_OPSET = 17
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


def at_least_opset(model, opset=MIN_OPSET):
    """`model`, converted to default-domain `opset` when it uses an older one (a new copy)."""
    if (default_opset(model) or opset) >= opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise OnnxAttrError(f"cannot convert the model from opset {default_opset(model)} to "
                            f"{opset}: {message}") from None


def copy_model(model):
    """A deep copy of a ModelProto."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def attributes(node):
    """{name: python value} of a node's attributes (strings decoded)."""
    return {a.name: _text(helper.get_attribute_value(a)) for a in node.attribute}


def attribute(node, name, default=None):
    """One attribute's python value (strings decoded), or `default` when the node lacks it."""
    for a in node.attribute:
        if a.name == name:
            return _text(helper.get_attribute_value(a))
    return default


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def is_standard(node):
    """Whether `node` is a standard ONNX op (an ai.onnx op with a schema in onnx)."""
    return node.domain in STANDARD_DOMAINS and onnx.defs.has(node.op_type)


def topological_order(nodes):
    """`nodes` in a topological order, ties broken by their order in the list (a sorted graph
    comes back unchanged). Raises OnnxAttrError on a cycle."""
    nodes = list(nodes)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)
    consumers = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        sources = {producer[t] for t in reads(node) if t in producer} - {i}
        waiting[i] = len(sources)
        for j in sources:
            consumers[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in consumers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise OnnxAttrError("the model graph has a cycle")
    return order


def ancestors_nearest_first(graph, output):
    """The nodes that feed tensor `output`, in a topological order reversed: its producer
    first, then back towards the inputs."""
    producers = {out: node for node in graph.node for out in node.output if out}
    needed, stack = {}, [output]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed[id(node)] = node
            stack.extend(node.input)
    order = topological_order(node for node in graph.node if id(node) in needed)
    return order[::-1]


def infer_shapes(model, symbolic=False):
    """({tensor name: [int or None per dimension]}, {tensor name: numpy dtype}) from onnx shape
    inference (with constant propagation through Shape/Gather/Concat, so the dynamic reshapes
    of exported models resolve), initializers included. Tensors inference knows nothing of are
    absent. With `symbolic`, a dimension inference names but cannot size is its name (a str,
    such as the batch "N") instead of None."""
    try:  # the weights' values play no part: inference on a copy without them
        inferred = onnx.shape_inference.infer_shapes(without_data(model), data_prop=True)
    except Exception:  # inference is best effort: a rule that needs a shape says so itself
        inferred = model
    graph = inferred.graph
    values = [v for v in (*graph.value_info, *graph.input, *graph.output)
              if v.type.HasField("tensor_type")]
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else
                       (d.dim_param or None) if symbolic else None
                       for d in v.type.tensor_type.shape.dim]
              for v in values if v.type.tensor_type.HasField("shape")}
    types = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
             for v in values if v.type.tensor_type.elem_type}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    types.update({t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in graph.initializer})
    computed = [o for node in graph.node for o in node.output if o]
    if any(name not in shapes or any(not isinstance(d, int) for d in shapes[name][1:])
           for name in computed):
        for name, observed in observed_shapes(model).items():
            known = shapes.get(name)
            if known is None or len(known) != len(observed):
                known = [None] * len(observed)
            # a size seen in both runs is static; one that followed the batch keeps its name
            shapes[name] = [seen if seen is not None else named
                            for seen, named in zip(observed, known)]
    return shapes, types


def observed_shapes(model):
    """{tensor name: [int, or None for a dimension that follows the batch]} of every tensor the
    model computes, by running it (onnxruntime, zeros at batch 1 and at batch 2). The fallback
    for what shape inference cannot follow, such as the channel shuffle of torch's ShuffleNet
    export (H and W read off Shape and passed through a Div); {} when the model cannot run."""
    if onnxruntime is None:
        return {}
    probe = copy_model(model)
    listed = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in listed:
                probe.graph.output.add().name = name
                listed.add(name)
    names = [o.name for o in probe.graph.output]
    _zeros_for_references(probe.graph)
    runs = []
    try:
        session = make_session(probe)
        for batch in (1, 2):
            feeds = {i.name: np.zeros([d if isinstance(d, int) else batch for d in i.shape],
                                      _numpy_type(i.type)) for i in session.get_inputs()}
            runs.append(session.run(names, feeds))
    except Exception:  # best effort, as inference is: a rule that needs a shape says so
        return {}
    return {name: [a if a == b else None for a, b in zip(one.shape, two.shape)]
            for name, one, two in zip(names, *runs)
            if isinstance(one, np.ndarray) and one.ndim == two.ndim}


def _zeros_for_references(graph):
    """Each initializer whose data lives elsewhere (references to the shared weights,
    onnxattr/io/weights.py, which a probe session cannot read) made a ConstantOfShape of zeros
    of its shape and type, in place: the shapes observed do not depend on the weights' values."""
    for tensor in [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]:
        graph.initializer.remove(tensor)
        dims = numpy_helper.from_array(np.array(tensor.dims, np.int64), f"{tensor.name}/dims")
        graph.initializer.append(dims)
        graph.node.insert(0, helper.make_node(
            "ConstantOfShape", [dims.name], [tensor.name],
            value=helper.make_tensor("value", tensor.data_type, [1], [0])))


def _numpy_type(ort_type):
    """numpy dtype of an onnxruntime input type string such as "tensor(float)"."""
    return {"tensor(float)": np.float32, "tensor(double)": np.float64,
            "tensor(int64)": np.int64, "tensor(int32)": np.int32,
            "tensor(bool)": np.bool_}.get(ort_type, np.float32)


def prune(model):
    """Remove nodes, initializers and inputs that no graph output depends on (in place)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)


class GraphEditor:
    """One graph under edit: unique names, constants, new nodes, producers and consumers,
    constant values and inferred shapes.

    `model` is a ModelProto (shape inference then reads its opsets) or a GraphProto.
    """

    def __init__(self, model, opset_imports=None):
        if isinstance(model, onnx.ModelProto):
            self.graph = model.graph
            opset_imports = opset_imports or model.opset_import
        else:
            self.graph = model
        self.opset_imports = list(opset_imports or [helper.make_opsetid("", 17)])
        graph = self.graph
        self._names = {n for node in graph.node for n in (*node.input, *node.output, node.name)}
        self._names |= {t.name for t in graph.initializer} | {v.name for v in graph.input}
        self._initializers = None
        self._index = None
        self._inferred = None

    # --- names, constants, nodes ---------------------------------------------------------------

    def unique(self, base):
        """A tensor or node name not yet used in the graph."""
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def constant(self, base, array):
        """Add an initializer holding `array`; return its name."""
        name = self.unique(base)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.graph.initializer.append(tensor)
        if self._initializers is not None:
            self._initializers[name] = tensor
        return name

    def node(self, op_type, inputs, outputs, base, **attrs):
        """A new node with a unique name (not yet placed in the graph)."""
        return helper.make_node(op_type, inputs, outputs, name=self.unique(base), **attrs)

    def set_nodes(self, nodes):
        """Replace the graph's node list (and forget the index built on the old one)."""
        nodes = list(nodes)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._index = None
        self._inferred = None

    # --- producers, consumers, values ----------------------------------------------------------

    def _build_index(self):
        producers, consumers = {}, {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    producers[out] = node
            for name in dict.fromkeys(node.input):
                if name:
                    consumers.setdefault(name, []).append(node)
        self._index = producers, consumers

    def producer(self, name):
        """The node that outputs tensor `name`, or None (graph inputs, initializers)."""
        if self._index is None:
            self._build_index()
        return self._index[0].get(name)

    def consumers(self, name):
        """The nodes that read tensor `name`, in graph order."""
        if self._index is None:
            self._build_index()
        return list(self._index[1].get(name, []))

    def is_output(self, name):
        return any(o.name == name for o in self.graph.output)

    def initializer(self, name):
        """The TensorProto of initializer `name`, or None."""
        if self._initializers is None:
            self._initializers = {t.name: t for t in self.graph.initializer}
        return self._initializers.get(name)

    def value(self, name):
        """The numpy value of a constant tensor: an initializer, a Constant node's output, or
        either passed through Identity nodes (as torch's exporter writes shared weights);
        None when `name` is not constant."""
        seen = set()
        while name not in seen:
            seen.add(name)
            tensor = self.initializer(name)
            if tensor is not None:
                return numpy_helper.to_array(tensor)
            node = self.producer(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                return _constant_value(node)
            if node.op_type != "Identity":
                return None
            name = node.input[0]
        return None

    def is_constant(self, name):
        return self.value(name) is not None

    # --- shapes --------------------------------------------------------------------------------

    @property
    def opset(self):
        """The default-domain (ai.onnx) opset the graph's ops are read at."""
        return next((o.version for o in self.opset_imports if o.domain in STANDARD_DOMAINS), 0)

    def _inference(self):
        if self._inferred is None:
            model = helper.make_model(self.graph, opset_imports=self.opset_imports)
            model.ir_version = MAX_IR_VERSION
            symbolic, types = infer_shapes(model, symbolic=True)
            shapes = {name: [d if isinstance(d, int) else None for d in shape]
                      for name, shape in symbolic.items()}
            self._inferred = shapes, types, symbolic
        return self._inferred

    def symbolic_shape(self, name):
        """Like `inferred_shape`, with named dimensions (such as a batch "N") as their name: two
        tensors whose dimensions carry one name have the same size there."""
        return self._inference()[2].get(name)

    def inferred_shape(self, name):
        """The shape of tensor `name` from shape inference: an int, or None where unknown, per
        dimension; None when inference knows nothing of the tensor."""
        return self._inference()[0].get(name)

    def dtype(self, name, default=np.float32):
        """The numpy dtype of tensor `name` (`default` when inference does not know it)."""
        return self._inference()[1].get(name, default)

    def rank(self, name):
        """The rank of tensor `name`, or None when unknown."""
        shape = self.inferred_shape(name)
        return None if shape is None else len(shape)

    def shape(self, name, node=None):
        """The static shape of tensor `name` (the batch may be symbolic), or an OnnxAttrError
        naming the tensor and, when given, the node that needs it."""
        shape = self.inferred_shape(name)
        if not shape or any(d is None for d in shape[1:]):
            where = f" for {node.op_type} node '{node.name}'" if node is not None else ""
            raise OnnxAttrError(f"cannot infer a static shape for tensor '{name}'{where}")
        return shape

    def forget_shapes(self):
        """Drop inferred shapes (after nodes were added that change what inference knows)."""
        self._inferred = None


def _constant_value(node):
    """The value of a Constant node, whichever attribute holds it."""
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    value = helper.get_attribute_value(a)
    if a.name == "value_float":
        return np.array(value, np.float32)
    if a.name == "value_floats":
        return np.array(value, np.float32)
    if a.name in ("value_int", "value_ints"):
        return np.array(value, np.int64)
    raise OnnxAttrError(f"Constant node '{node.name}' with attribute {a.name} is not supported")


class Emitter:
    """Writes the nodes of one pass: fresh names, shared small constants, and `op`, which adds a
    node and returns its output name. Rules of the native reverse pass, the lowering of training
    ops and the shared backward forms all emit through one of these.
    """

    def __init__(self, editor, prefix=""):
        self.editor = editor
        self.prefix = prefix
        self.nodes = []
        self._constants = {}
        self._dtypes = {}

    def tmp(self, what):
        """A fresh tensor name."""
        return self.editor.unique(f"{self.prefix}{what}")

    def const(self, array, what="const"):
        """An initializer for a constant, shared between all uses of the same value and dtype."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.editor.constant(f"{self.prefix}{what}", array)
            self._dtypes[self._constants[key]] = array.dtype
        return self._constants[key]

    def op(self, op_type, *inputs, outputs=1, name=None, **attrs):
        """Add an `op_type` node reading `inputs`; return its output name (a list of names when
        `outputs` is a number above 1 or a list of names to write). The outputs' dtypes are
        recorded where the op and its inputs tell them (see `dtype`)."""
        if isinstance(outputs, int):
            names = [self.tmp(f"{op_type}") for _ in range(outputs)]
        else:
            names = list(outputs)
        base = name or f"{self.prefix}{op_type}"
        self.nodes.append(self.editor.node(op_type, list(inputs), names, base, **attrs))
        dtype = _output_dtype(op_type, inputs, attrs, self._known_dtype)
        if dtype is not None:
            for out in names if op_type == "Split" else names[:1]:
                self._dtypes[out] = dtype
        return names[0] if outputs == 1 else names

    def _known_dtype(self, name):
        if name in self._dtypes:
            return self._dtypes[name]
        return self.editor.dtype(name, default=None)

    def constant_names(self):
        """The names of the shared constants this emitter made."""
        return set(self._constants.values())

    def shape(self, name, node=None):
        return self.editor.shape(name, node)

    def inferred_shape(self, name):
        return self.editor.inferred_shape(name)

    def value(self, name):
        return self.editor.value(name)

    def declare(self, name, dtype):
        """Record the dtype of a tensor this pass wrote (inference only knows the graph's own
        tensors); `dtype` answers it from then on. Returns `name`."""
        self._dtypes[name] = np.dtype(dtype)
        return name

    def dtype(self, name):
        """The dtype of tensor `name`: as declared, else from inference (float32 if unknown)."""
        if name in self._dtypes:
            return self._dtypes[name]
        return self.editor.dtype(name)


# Output dtypes of emitted ops, for Emitter.dtype: the ops whose first output has the dtype of
# one input (its position), and those with a fixed output dtype.
_SAME_DTYPE_AS = dict.fromkeys(
    "Abs Acos Add AveragePool BatchNormalization Ceil Clip Concat Conv ConvTranspose CumSum "
    "DepthToSpace Div Einsum Elu Erf Exp Expand Flatten Floor Gather GatherElements Gelu Gemm "
    "GlobalAveragePool GlobalMaxPool HardSigmoid HardSwish Identity InstanceNormalization "
    "LayerNormalization LeakyRelu Log LogSoftmax LRN MatMul Max MaxPool Mean Min Mul Neg Pad "
    "Pow PRelu Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
    "ReduceSumSquare Relu Reshape Resize ScatterElements ScatterND Sigmoid Sign Slice Softmax "
    "Softplus SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile Transpose Unsqueeze".split(), 0)
_SAME_DTYPE_AS["Where"] = 1
_FIXED_DTYPE = {**dict.fromkeys(("Shape", "Size", "ArgMax", "ArgMin", "NonZero"), np.int64),
                **dict.fromkeys(("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual",
                                 "Not", "And", "Or", "Xor", "IsNaN", "IsInf"), np.bool_)}


def _output_dtype(op_type, inputs, attrs, known):
    if op_type in _FIXED_DTYPE:
        return np.dtype(_FIXED_DTYPE[op_type])
    if op_type == "Cast" and "to" in attrs:
        return np.dtype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op_type == "ConstantOfShape":
        value = attrs.get("value")
        return np.dtype(np.float32) if value is None else numpy_helper.to_array(value).dtype
    position = _SAME_DTYPE_AS.get(op_type)
    if position is not None and position < len(inputs) and inputs[position]:
        return known(inputs[position])
    return None
