"""The table of vector-Jacobian rules, one per forward op type, and what a rule sees.

A rule is one function registered with `@vjp("OpType")`: it receives a `Vjp` (the node, its
output cotangents, shapes, dtypes, constants and emit helpers) and returns the cotangents of the
node's inputs, a list aligned with `node.input` (None where it has none; a single name stands
for input 0). `inputs=` names the input positions that carry a gradient; the others (shapes,
axes, weights, a Where's condition) never do, and the reverse pass refuses a graph where the
differentiated tensor reaches one of them. `integer_outputs=True` lets the gradient through the
node's integer outputs (QuantizeLinear's: their cotangents are float, see quantize.py).

    @vjp("Exp")
    def exp(g):
        '''y = exp(x):  dx = dy * y'''
        return g.op("Mul", g.dy(), g.y())
"""

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import OnnxAttrError
from ..toolkit import attribute


@dataclass(frozen=True)
class Rule:
    op_type: str
    function: object
    inputs: tuple | None  # input positions that carry a gradient; None: all of them
    integer_outputs: bool = False  # whether its integer outputs carry a (float) cotangent


VJP_RULES = {}


def vjp(*op_types, inputs=(0,), integer_outputs=False):
    """Register the decorated function as the vector-Jacobian rule of `op_types`; `inputs` are
    the differentiable input positions (None for all, as in Sum or Concat); `integer_outputs`:
    whether the walk goes on through the node's integer outputs."""
    def register(function):
        for op_type in op_types:
            if op_type in VJP_RULES:
                raise ValueError(f"two vector-Jacobian rules for {op_type}")
            VJP_RULES[op_type] = Rule(op_type, function, None if inputs is None else tuple(inputs),
                                      integer_outputs)
        return function
    return register


def differentiable_inputs(rule, node):
    """Positions of `node`'s inputs that `rule` gives a gradient."""
    positions = range(len(node.input)) if rule.inputs is None else rule.inputs
    return [i for i in positions if i < len(node.input) and node.input[i]]


class Vjp:
    """What a rule sees of one node: its inputs and outputs, their cotangents, static facts
    about them, and helpers that emit standard ops through the pass's Emitter.

    Cotangents have the shape and dtype of the tensor they belong to. Constants made with
    `scalar`/`const` take the dtype of the forward tensor they combine with, so a float64 graph
    stays float64.
    """

    def __init__(self, walk, node, cotangents, wanted):
        self.walk = walk
        self.em = walk.em
        self.node = node
        self._cotangents = cotangents
        self._wanted = wanted

    # --- the node ---------------------------------------------------------------------------

    @property
    def opset(self):
        """The default-domain opset the graph (forward and backward) is written at."""
        return self.walk.opset

    def attr(self, name, default=None):
        return attribute(self.node, name, default)

    def x(self, i=0):
        """Name of input `i` ("" when the optional input is absent)."""
        return self.node.input[i] if i < len(self.node.input) else ""

    def y(self, i=0):
        """Name of output `i`."""
        return self.node.output[i] if i < len(self.node.output) else ""

    def dy(self, i=0):
        """The cotangent of output `i`, or None when nothing downstream uses that output."""
        return self._cotangents[i] if i < len(self._cotangents) else None

    def dy_or_zeros(self, i):
        """The cotangent of output `i`, zeros of its shape when it has none."""
        return self.dy(i) or self.zeros_like(self.y(i))

    def wants(self, i):
        """Whether input `i` needs a cotangent (it lies on the path to the differentiated
        tensor)."""
        return i in self._wanted

    def error(self, what):
        """An OnnxAttrError naming this node."""
        return OnnxAttrError(f"the native gradient builder cannot differentiate "
                             f"{self.node.op_type} node '{self.node.name}': {what}")

    # --- facts about forward tensors --------------------------------------------------------

    def dtype(self, name):
        return np.dtype(self.em.dtype(name))

    def shape(self, name):
        """Inferred dims: int, a dimension's name (str) where only that is known, or None."""
        return self.walk.editor.symbolic_shape(name)

    def rank(self, name):
        shape = self.shape(name)
        if shape is None:
            raise self.error(f"the rank of tensor '{name}' is unknown")
        return len(shape)

    def static_shape(self, name, axes=None):
        """The shape of `name` as ints (all dims, or only `axes`), or an error naming what."""
        shape = self.shape(name)
        dims = shape if shape is None or axes is None else [shape[a] for a in axes]
        if dims is None or any(not isinstance(d, int) for d in dims):
            which = "" if axes is None else f" (axes {list(axes)})"
            raise self.error(f"tensor '{name}' has no static shape{which}: {shape}")
        return list(dims)

    def static_dims(self, name):
        """The shape of `name` if every dim is a known int, else None."""
        shape = self.shape(name)
        if shape is None or any(not isinstance(d, int) for d in shape):
            return None
        return list(shape)

    def value(self, name):
        """The numpy value of a constant tensor (initializer, Constant, through Identity), or
        None."""
        return self.em.value(name) if name else None

    def constant(self, name, what):
        """The value of input tensor `name`, which the rule needs constant."""
        value = self.value(name)
        if value is None:
            raise self.error(f"its {what} ('{name}') is not a constant")
        return value

    # --- emitting -----------------------------------------------------------------------------

    def op(self, op_type, *inputs, **attrs):
        return self.em.op(op_type, *inputs, **attrs)

    def scalar(self, value, like):
        """A scalar constant with the dtype of tensor `like`."""
        return self.em.const(np.array(value, self.dtype(like)))

    def const(self, array, like=None, what="const"):
        """A constant, in the dtype of tensor `like` when given."""
        array = np.asarray(array)
        if like is not None:
            array = array.astype(self.dtype(like))
        return self.em.const(array, what)

    def ints(self, values):
        """An int64 1-D constant."""
        return self.em.const(np.asarray(values, np.int64).reshape(-1))

    def shape_of(self, name):
        """The runtime shape of `name` as an int64 tensor (a constant when static)."""
        dims = self.static_dims(name)
        if dims is not None:
            return self.ints(dims)
        return self.op("Shape", name)

    def zeros_like(self, name):
        return self.op("ConstantOfShape", self.op("Shape", name),
                       value=numpy_helper.from_array(np.zeros(1, self.dtype(name))))

    def reshape_like(self, value, name):
        """`value` reshaped to the shape of tensor `name` (allowzero: that shape is literal)."""
        return self.op("Reshape", value, self.shape_of(name), allowzero=1)

    def cast_like(self, value, name):
        return self.op("Cast", value, to=helper.np_dtype_to_tensor_dtype(self.dtype(name)))

    def reduce_sum(self, value, axes, keepdims=1):
        """ReduceSum over `axes` (a list; empty reduces nothing)."""
        if not len(axes):
            return value
        return self.op("ReduceSum", value, self.ints(axes), keepdims=keepdims)

    def reduce(self, op_type, value, axes, keepdims=1):
        """ReduceMean/ReduceMax/... over `axes` in the form the target opset takes."""
        if op_type == "ReduceSum":
            return self.reduce_sum(value, axes, keepdims)
        if self.opset >= 18:
            return self.op(op_type, value, self.ints(axes), keepdims=keepdims)
        return self.op(op_type, value, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, value, axes):
        return self.op("Unsqueeze", value, self.ints(axes))

    def relu_rule(self, dy, active):
        """The configured ReLU backward rule (vanilla, guided, zeiler-fergus) of a rectifier
        whose active cells are the bool tensor `active`."""
        return self.walk.apply_relu_rule(dy, active)

    def unbroadcast(self, grad, target, grad_shape=None, target_shape=None):
        """`grad` (the shape of this node's output, or `grad_shape`) summed down to the shape of
        tensor `target` (or `target_shape`) over the axes numpy broadcasting stretched: static
        ReduceSum/Squeeze where the inferred shapes decide it, else at run time from
        Shape(target)."""
        out = grad_shape if grad_shape is not None else self.shape(self.y())
        into = target_shape if target_shape is not None else self.shape(target)
        if out is not None and into is not None:
            plan = _static_reduction(out, into)
            if plan is not None:
                keep_axes, lead = plan
                if not keep_axes:
                    return self.reduce_sum(grad, list(range(lead)), keepdims=0)
                grad = self.reduce_sum(grad, list(range(lead)) + keep_axes, keepdims=1)
                if lead:
                    grad = self.op("Squeeze", grad, self.ints(list(range(lead))))
                return grad
        if into is None:
            raise self.error(f"the rank of tensor '{target}' is unknown")
        # dynamic: reduce every axis where target's (left-padded) shape differs from grad's
        grad_dims = self.op("Shape", grad)
        target_dims = self.op("Shape", target)
        rank = len(out) if out is not None else None
        if rank is None:
            raise self.error(f"the rank of the gradient of '{target}' is unknown")
        if rank > len(into):
            target_dims = self.op("Concat", self.ints([1] * (rank - len(into))), target_dims,
                                  axis=0)
        differs = self.op("Not", self.op("Equal", target_dims, grad_dims))
        axes = self.op("Reshape", self.op("NonZero", differs), self.ints([-1]))
        summed = self.op("ReduceSum", grad, axes, keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", summed, self.op("Shape", target))


def _static_reduction(out, into):
    """(axes to sum keeping them, leading axes to drop) taking a gradient of shape `out` to
    shape `into`, or None when the inferred shapes cannot decide it."""
    lead = len(out) - len(into)
    if lead < 0:
        return None
    axes = []
    for i, (o, t) in enumerate(zip(out[lead:], into)):
        if t == 1:
            if o != 1:
                axes.append(lead + i)
        elif t == o and t is not None:
            continue
        elif isinstance(t, int) and o is None:
            continue  # t > 1: broadcasting could only have kept it
        elif isinstance(t, int) and isinstance(o, str):
            continue
        else:
            return None
    return axes, lead


FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64)} | {
    helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)}
