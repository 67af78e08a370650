"""Every vector-Jacobian rule of the native gradient builder (onnxattr.graph.autodiff) against central
finite differences: each op alone in a tiny float64 graph, score = sum(op output * fixed random
weights) so every output element matters, the native gradient evaluated with onnx's reference
evaluator (spec-true LRN); then the float32 graph on onnxruntime against the float64 gradient.

Inputs keep away from kinks (ReLU and Clip thresholds, pooling ties, |x| near 0).
"""

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as ReferenceConvTranspose

from onnxattr.graph.autodiff import VJP_RULES, build_native_gradient

from small_models import LRN

onnxruntime.set_default_logger_severity(3)

FD_STEP = 1e-6
FD_TOLERANCE = 1e-6  # relative L2, float64 native gradient vs central differences
ORT_TOLERANCE = 1e-4  # relative L2, float32 native gradient on onnxruntime vs float64


# --- spec-true reference kernels where onnx 1.23's reference evaluator is not ---------------------

class Erf(OpRun):
    """erf in the input's precision (the reference computes it in float32, and Gelu with it)."""

    op_domain = ""

    def _run(self, x):
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class Gelu(OpRun):
    """Gelu in the input's precision (the reference expands it with its float32 erf)."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
            return (0.5 * x * (1 + np.tanh(inner)),)
        return (0.5 * x * (1 + np.vectorize(math.erf, otypes=[x.dtype])(x / math.sqrt(2))),)


class Pad(OpRun):
    """Pad with negative (cropping) pads in constant mode, which the reference refuses."""

    op_domain = ""

    def _run(self, x, pads, value=None, axes=None, mode="constant"):
        rank = x.ndim
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        begin, end = [0] * rank, [0] * rank
        for k, a in enumerate(axes):
            begin[a], end[a] = int(pads[k]), int(pads[k + len(axes)])
        crop = tuple(slice(max(-b, 0), x.shape[i] - max(-e, 0))
                     for i, (b, e) in enumerate(zip(begin, end)))
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
        if mode == "constant":
            fill = 0 if value is None or np.size(value) == 0 else np.asarray(value).reshape(-1)[0]
            return (np.pad(x[crop], widths, constant_values=fill),)
        return (np.pad(x[crop], widths, mode={"edge": "edge", "reflect": "reflect",
                                              "wrap": "wrap"}[mode]),)


class MaxPool(OpRun):
    """MaxPool with flat NCHW Indices of the first maximum in scan order, as onnxruntime gives
    them (the reference's Indices are offset where the pool has pads)."""

    op_domain = ""

    def _run(self, x, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None,
             pads=None, storage_order=0, strides=None):
        rank = len(kernel_shape)
        strides = strides or [1] * rank
        dilations = dilations or [1] * rank
        size = list(x.shape[2:])
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0] * 2 * rank
            for i, (n, k, s, d) in enumerate(zip(size, kernel_shape, strides, dilations)):
                total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
                small, large = total // 2, total - total // 2
                pads[i], pads[i + rank] = ((small, large) if auto_pad == "SAME_UPPER"
                                           else (large, small))
        pads = pads or [0] * 2 * rank
        out = []
        for i, (n, k, s, d) in enumerate(zip(size, kernel_shape, strides, dilations)):
            room = n + pads[i] + pads[i + rank] - ((k - 1) * d + 1)
            count = (-(-room // s) if ceil_mode else room // s) + 1
            if ceil_mode and (count - 1) * s >= n + pads[i]:
                count -= 1
            out.append(count)
        y = np.zeros((*x.shape[:2], *out), x.dtype)
        indices = np.zeros(y.shape, np.int64)
        for n, c in np.ndindex(*x.shape[:2]):
            for window in np.ndindex(*out):
                best, where = None, None
                for cell in np.ndindex(*kernel_shape):
                    at = [w * s - pads[i] + o * d for i, (w, s, o, d) in enumerate(
                        zip(window, strides, cell, dilations))]
                    if all(0 <= a < m for a, m in zip(at, size)):
                        value = x[(n, c, *at)]
                        if best is None or value > best:
                            best, where = value, at
                y[(n, c, *window)] = best
                indices[(n, c, *window)] = np.ravel_multi_index((n, c, *where), x.shape)
        return y, indices


class _OpsetSoftmax(OpRun):
    """Softmax/LogSoftmax with the semantics of the model's opset: before 13, over every axis
    from `axis` on (the reference applies opset 13's to every opset)."""

    op_domain = ""
    log = False

    def _run(self, x, axis=None):
        opset = self.run_params["opsets"][""]
        axes = (axis % x.ndim,) if opset >= 13 else tuple(range(axis % x.ndim, x.ndim))
        shifted = x - x.max(axis=axes, keepdims=True)
        total = np.exp(shifted).sum(axis=axes, keepdims=True)
        return (shifted - np.log(total) if self.log else np.exp(shifted) / total,)


class Softmax(_OpsetSoftmax):
    pass


class LogSoftmax(_OpsetSoftmax):
    log = True


class ConvTranspose(ReferenceConvTranspose):
    """The reference ConvTranspose, one group at a time (it supports group 1 only)."""

    op_domain = ""

    def _run(self, x, w, b=None, group=None, **attrs):
        group = group or 1
        if group == 1:
            return super()._run(x, w, b, group=1, **attrs)
        xs, ws = np.split(x, group, axis=1), np.split(w, group, axis=0)
        bs = np.split(b, group) if b is not None else [None] * group
        return (np.concatenate([super(ConvTranspose, self)._run(xi, wi, bi, group=1, **attrs)[0]
                                for xi, wi, bi in zip(xs, ws, bs)], axis=1),)


REFERENCE_OPS = [LRN, Erf, Gelu, Pad, Softmax, LogSoftmax, ConvTranspose, MaxPool]


def reference(model):
    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS)


@dataclass
class Rand:
    """A random graph input: `kind` says how values keep away from kinks."""
    shape: tuple
    kind: str = "signed"  # signed: |x| in [0.2, 1]; positive: [0.5, 1.5]; spread: [-1, 1] grid
    dims: tuple | None = None  # declared shape (may name dims), default `shape`
    differentiate: bool = True


@dataclass
class Case:
    nodes: list
    inputs: dict  # name -> Rand
    initializers: dict = field(default_factory=dict)
    outputs: tuple = ("y",)  # outputs the score reads
    opset: int = 17
    runtime: bool = True  # also run the float32 graph on onnxruntime


def sample(rand, rng):
    shape = rand.shape
    if rand.kind == "positive":
        return rng.uniform(0.5, 1.5, shape)
    if rand.kind == "distinct":  # well separated values: no near-ties in max pooling
        count = int(np.prod(shape))
        return (rng.permutation(count).reshape(shape) - count / 2) / count * 4 + \
            rng.uniform(-0.1, 0.1, shape) / count
    if isinstance(rand.kind, tuple):  # ("avoid", points, low, high): keep 0.1 away
        _, points, low, high = rand.kind
        values = rng.uniform(low, high, shape)
        for p in points:
            near = np.abs(values - p) < 0.1
            values[near] = p + np.where(values[near] >= p, 1, -1) * (0.1 + np.abs(
                values[near] - p))
        return values
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 1.0, shape)


def op(op_type, *inputs, opset=17, outputs=1, used=(0,), **attrs):
    """A Case of one `op_type` node: inputs are Rand (graph inputs x, z, u, ...), arrays
    (initializers) or "" (absent)."""
    names, graph_inputs, initializers = [], {}, {}
    letters = iter("xzuvw")
    for i, value in enumerate(inputs):
        if isinstance(value, Rand):
            name = next(letters)
            graph_inputs[name] = value
        elif isinstance(value, str):
            name = value
        else:
            name = f"c{i}"
            initializers[name] = np.asarray(value)
        names.append(name)
    out_names = ["y"] + [f"y{i}" for i in range(1, outputs)]
    node = helper.make_node(op_type, names, out_names, name=f"the_{op_type.lower()}", **attrs)
    return Case([node], graph_inputs, initializers, tuple(out_names[i] for i in used), opset)


def float_type(dtype):
    return TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT


def build_model(case, dtype):
    """(model with score, feeds) in `dtype`; the score weights are fixed per case."""
    feeds = {n: np.asarray(sample(r, np.random.default_rng(zlib.crc32(f"{n}{r.shape}".encode()))),
                           dtype) for n, r in case.inputs.items()}
    inits = [numpy_helper.from_array(v.astype(dtype) if v.dtype == np.float64 else v, k)
             for k, v in case.initializers.items()]
    graph = helper.make_graph(
        case.nodes, "case",
        [helper.make_tensor_value_info(n, float_type(dtype), list(r.dims or r.shape))
         for n, r in case.inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in case.outputs],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8 if case.opset < 19 else 9
    values = reference(model).run(list(case.outputs), feeds)
    score_nodes, terms = [], []
    weights_rng = np.random.default_rng(1234)
    for out, value in zip(case.outputs, values):
        w = f"{out}_weights"
        graph.initializer.append(numpy_helper.from_array(
            weights_rng.uniform(0.5, 1.5, value.shape).astype(value.dtype), w))
        score_nodes += [helper.make_node("Mul", [out, w], [f"{out}_weighted"]),
                        helper.make_node("ReduceSum", [f"{out}_weighted"], [f"{out}_total"],
                                         keepdims=0)]
        terms.append(f"{out}_total")
    score_nodes.append(helper.make_node("Sum", terms, ["score"]))
    graph.node.extend(score_nodes)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("score", float_type(dtype), []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8 if case.opset < 19 else 9
    return model, feeds


def central_differences(model, feeds, wrt):
    evaluator = reference(model)
    x = feeds[wrt]
    result = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        values = []
        for sign in (1, -1):
            shifted = x.copy()
            shifted[index] += sign * FD_STEP
            values.append(evaluator.run(["score"], {**feeds, wrt: shifted})[0])
        result[index] = (values[0] - values[1]) / (2 * FD_STEP)
    return result


def rel_l2(got, want):
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def check(case):
    model64, feeds64 = build_model(case, np.float64)
    model32, feeds32 = build_model(case, np.float32)
    for wrt, rand in case.inputs.items():
        if not rand.differentiate:
            continue
        gradient_model = build_native_gradient(model64, wrt)
        onnx.checker.check_model(gradient_model)
        assert all(n.domain in ("", "ai.onnx") for n in gradient_model.graph.node)
        got = reference(gradient_model).run([f"{wrt}_grad"], feeds64)[0]
        want = central_differences(model64, feeds64, wrt)
        assert got.shape == want.shape and got.dtype == np.float64
        assert np.abs(want).max() > 0, "the score does not depend on the input"
        error = rel_l2(got, want)
        assert error <= FD_TOLERANCE, f"d score / d {wrt}: relative L2 {error:.2e}"
        if case.runtime:
            gradient32 = build_native_gradient(model32, wrt)
            session = onnxruntime.InferenceSession(gradient32.SerializeToString(),
                                                   providers=["CPUExecutionProvider"])
            got32 = session.run([f"{wrt}_grad"], feeds32)[0]
            assert got32.dtype == np.float32
            error32 = rel_l2(got32.astype(np.float64), got)
            assert error32 <= ORT_TOLERANCE, f"float32 on onnxruntime: {error32:.2e}"


S = Rand  # shorthand in the table
P = lambda *shape: Rand(shape, "positive")  # noqa: E731
D = lambda *shape: Rand(shape, "distinct")  # noqa: E731
i64 = lambda *values: np.array(values, np.int64)  # noqa: E731
f64 = lambda *values: np.array(values, np.float64)  # noqa: E731
f32 = lambda *values: np.array(values, np.float32)  # noqa: E731 (Resize scales are float32)
W = lambda *shape: np.random.default_rng(sum(shape)).uniform(-1, 1, shape)  # noqa: E731


def conv(x_shape, w_shape, bias=False, **attrs):
    inputs = [Rand(x_shape), W(*w_shape)] + ([W(w_shape[0])] if bias else [])
    return op("Conv", *inputs, **attrs)


def where_from_x():
    nodes = [helper.make_node("Greater", ["x", "zero"], ["c"]),
             helper.make_node("Where", ["c", "x", "z"], ["y"], name="the_where")]
    return Case(nodes, {"x": Rand((2, 3)), "z": Rand((3,))}, {"zero": np.array(0.0)})


def no_runtime(case):
    case.runtime = False
    return case


def symbolic(case, **dims):
    for name, declared in dims.items():
        case.inputs[name].dims = declared
    return case


CASES = {
    # --- arithmetic and broadcasting ---
    "Add same shape": op("Add", S((2, 3, 4)), S((2, 3, 4))),
    "Add broadcast [3,1]": op("Add", S((2, 3, 4)), S((3, 1))),
    "Add broadcast both ways": op("Add", S((2, 1, 4)), S((1, 3, 1))),
    "Add scalar": op("Add", S((3, 4)), S(())),
    "Add constant operand": op("Add", S((2, 3)), W(3)),
    "Add dynamic dims (run-time reduction)": symbolic(op("Add", S((3, 4)), S((1, 4))),
                                                      x=("A", 4), z=("B", 4)),
    "Add symbolic batch": symbolic(op("Add", S((3, 4)), S((1, 4))), x=("N", 4)),
    "Sub broadcast": op("Sub", S((2, 3, 4)), S((4,))),
    "Mul broadcast": op("Mul", S((2, 3, 4)), S((2, 1, 4))),
    "Mul scalar": op("Mul", S((2, 3)), S(())),
    "Div broadcast": op("Div", S((2, 3, 4)), P(3, 1)),
    "Pow constant 2": op("Pow", S((2, 3)), np.array(2.0)),
    "Pow constant 3": op("Pow", S((2, 3)), np.array(3.0)),
    "Pow constant 0.5": op("Pow", P(2, 3), np.array(0.5)),
    "Pow constant per column": op("Pow", P(2, 3), f64(-1.5, 1.0, 2.5)),
    "Pow both inputs": op("Pow", P(2, 3), P(3)),
    "Neg": op("Neg", S((2, 3))),
    "Abs": op("Abs", S((2, 3))),
    "Reciprocal": op("Reciprocal", S((2, 3))),
    "Exp": op("Exp", S((2, 3))),
    "Log": op("Log", P(2, 3)),
    "Sqrt": op("Sqrt", P(2, 3)),
    # --- activations ---
    "Relu": op("Relu", S((2, 3, 4))),
    "LeakyRelu": op("LeakyRelu", S((2, 3, 4)), alpha=0.1),
    "LeakyRelu default alpha": op("LeakyRelu", S((2, 5))),
    "PRelu per channel": op("PRelu", S((2, 3, 2, 2)), f64(0.1, 0.2, 0.3).reshape(3, 1, 1)),
    "Clip min max": op("Clip", Rand((3, 4), ("avoid", [-0.5, 0.5], -1, 1)), np.array(-0.5),
                       np.array(0.5)),
    "Clip min only": op("Clip", Rand((3, 4), ("avoid", [-0.3], -1, 1)), np.array(-0.3)),
    "Clip max only": op("Clip", Rand((3, 4), ("avoid", [0.3], -1, 1)), "", np.array(0.3)),
    "Clip no bounds": op("Clip", S((3, 4))),
    "Clip as ReLU6": op("Clip", Rand((3, 4), ("avoid", [0, 6], -2, 8)), np.array(0.0),
                        np.array(6.0)),
    "Clip opset 6 attributes": op("Clip", Rand((3, 4), ("avoid", [-0.4, 0.4], -1, 1)),
                                  opset=6, min=-0.4, max=0.4),
    "Sigmoid": op("Sigmoid", S((2, 3))),
    "HardSigmoid": op("HardSigmoid", Rand((3, 4), ("avoid", [-2.5, 2.5], -4, 4))),
    "HardSigmoid alpha beta": op("HardSigmoid", Rand((3, 4), ("avoid", [-1.5, 0.5], -3, 2)),
                                 alpha=0.5, beta=0.75),
    "HardSwish": op("HardSwish", Rand((3, 4), ("avoid", [-3, 3], -5, 5))),
    "Tanh": op("Tanh", S((2, 3))),
    "Erf": op("Erf", S((2, 3))),
    "Gelu": op("Gelu", Rand((3, 4), ("avoid", [], -3, 3)), opset=20),
    "Gelu tanh": op("Gelu", Rand((3, 4), ("avoid", [], -3, 3)), opset=20, approximate="tanh"),
    "Softplus": op("Softplus", S((2, 3))),
    "Elu": op("Elu", S((2, 3)), alpha=0.5),
    "Softmax axis -1": op("Softmax", S((2, 3, 4))),
    "Softmax axis 1": op("Softmax", S((2, 3, 4)), axis=1),
    "Softmax opset 11 (axes from 1 on)": op("Softmax", S((2, 3, 4)), opset=11, axis=1),
    "LogSoftmax axis 0": op("LogSoftmax", S((2, 3, 4)), axis=0),
    "LogSoftmax opset 11 (axes from 1 on)": op("LogSoftmax", S((2, 3, 4)), opset=11, axis=1),
    # --- variadic and selection ---
    "Max two": op("Max", D(3, 4), D(3, 4)),
    "Max three broadcast": op("Max", D(2, 3, 4), D(3, 4), Rand((4,), "distinct")),
    "Max one": op("Max", S((2, 3))),
    "Min broadcast": op("Min", D(2, 3, 4), D(3, 1)),
    "Sum three broadcast": op("Sum", S((2, 3, 4)), S((3, 1)), S((4,))),
    "Mean": op("Mean", S((2, 3)), S((2, 3)), S((3,))),
    "Where constant condition": op("Where", np.array([[True, False, True]]), S((2, 3)),
                                   S((2, 1))),
    "Where condition from x": where_from_x(),
    "Identity": op("Identity", S((2, 3))),
    "Dropout": op("Dropout", S((2, 3)), opset=13),
    "Dropout with ratio and mask output": op("Dropout", S((2, 3)), np.array(0.5), opset=13,
                                             outputs=2),
    # --- linear ---
    "Conv": conv((1, 2, 5, 5), (3, 2, 3, 3), pads=[1, 1, 1, 1]),
    "Conv bias, batch 2": conv((2, 2, 4, 5), (3, 2, 3, 3), bias=True),
    "Conv stride 2 odd size": conv((1, 2, 7, 6), (3, 2, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    "Conv stride 3 uncovered border": conv((1, 2, 8, 7), (2, 2, 2, 2), strides=[3, 3]),
    "Conv dilation 2": conv((1, 2, 7, 7), (2, 2, 3, 3), dilations=[2, 2], pads=[2, 1, 2, 1]),
    "Conv groups 2": conv((1, 4, 5, 5), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    "Conv depthwise stride 2": conv((1, 3, 6, 6), (3, 1, 3, 3), group=3, strides=[2, 2],
                                    pads=[1, 1, 1, 1]),
    "Conv asymmetric pads": conv((1, 2, 5, 6), (2, 2, 3, 3), pads=[0, 2, 1, 0]),
    "Conv large pads (negative flipped pads)": conv((1, 2, 4, 4), (2, 2, 2, 2), pads=[2, 2, 2, 2]),
    "Conv SAME_UPPER stride 2": conv((1, 2, 6, 6), (2, 2, 3, 3), auto_pad="SAME_UPPER",
                                     strides=[2, 2]),
    "Conv SAME_LOWER stride 2": conv((1, 2, 6, 6), (2, 2, 4, 4), auto_pad="SAME_LOWER",
                                     strides=[2, 2]),
    "Conv SAME_UPPER stride 1 even kernel": conv((1, 2, 5, 5), (2, 2, 2, 2),
                                                 auto_pad="SAME_UPPER"),
    "Conv VALID": conv((1, 2, 5, 5), (2, 2, 3, 3), auto_pad="VALID"),
    "Conv 1-D": conv((2, 2, 7), (3, 2, 3), pads=[1, 1]),
    "Conv 3-D": conv((1, 1, 3, 4, 4), (2, 1, 2, 3, 3), pads=[0, 1, 1, 1, 1, 1]),
    "Conv weights as a graph input": op("Conv", S((1, 2, 5, 5)),
                                        Rand((3, 2, 3, 3), differentiate=False),
                                        pads=[1, 1, 1, 1]),
    "ConvTranspose stride 2 output_padding": op("ConvTranspose", S((1, 2, 3, 3)), W(2, 3, 3, 3),
                                                strides=[2, 2], pads=[1, 1, 1, 1],
                                                output_padding=[1, 1]),
    "ConvTranspose groups dilation": op("ConvTranspose", S((1, 4, 3, 3)), W(4, 1, 2, 2),
                                        group=2, dilations=[2, 2]),
    "ConvTranspose VALID with bias": op("ConvTranspose", S((1, 2, 3, 4)), W(2, 2, 3, 3), W(2),
                                        auto_pad="VALID"),
    "Gemm": op("Gemm", S((2, 3)), S((3, 4)), S((4,))),
    "Gemm transA transB alpha beta": op("Gemm", S((3, 2)), S((4, 3)), S((2, 4)), transA=1,
                                        transB=1, alpha=0.5, beta=2.0),
    "Gemm transA": op("Gemm", S((3, 2)), S((3, 4)), S((1, 4)), transA=1),
    "Gemm transB, scalar C": op("Gemm", S((2, 3)), S((4, 3)), S(()), transB=1),
    "Gemm no C": op("Gemm", S((2, 3)), W(3, 4), alpha=1.5),
    "MatMul 2-D": op("MatMul", S((2, 3)), S((3, 4))),
    "MatMul batched": op("MatMul", S((2, 2, 3)), S((2, 3, 4))),
    "MatMul broadcast batch": op("MatMul", S((2, 1, 2, 3)), S((3, 3, 2))),
    "MatMul 3-D x 2-D": op("MatMul", S((2, 2, 3)), S((3, 4))),
    "MatMul 1-D x 2-D": op("MatMul", S((3,)), S((3, 4))),
    "MatMul 2-D x 1-D": op("MatMul", S((2, 3)), S((3,))),
    "MatMul 1-D x 1-D": op("MatMul", S((3,)), S((3,))),
    "MatMul 1-D x 3-D": op("MatMul", S((3,)), S((2, 3, 4))),
    "MatMul symbolic batch": symbolic(op("MatMul", S((2, 2, 3)), S((3, 4))), x=("N", 2, 3)),
    "Einsum matmul": op("Einsum", S((2, 3)), S((3, 4)), equation="ij,jk->ik"),
    "Einsum batched": op("Einsum", S((2, 2, 3)), S((2, 3, 4)), equation="bij,bjk->bik"),
    "Einsum transpose": op("Einsum", S((2, 3)), equation="ij->ji"),
    "Einsum row sums": op("Einsum", S((2, 3)), equation="ij->i"),
    "Einsum implicit output": op("Einsum", S((2, 3)), S((3, 4)), equation="ij,jk"),
    "Einsum dot": op("Einsum", S((3,)), S((3,)), equation="i,i->"),
    # --- pooling ---
    "MaxPool 3x3 stride 2 ceil_mode": op("MaxPool", D(1, 2, 8, 8), kernel_shape=[3, 3],
                                         strides=[2, 2], ceil_mode=1),
    "MaxPool 3x3 stride 1 pads 1": op("MaxPool", D(2, 2, 5, 5), kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]),
    "MaxPool 2x2 stride 2": op("MaxPool", D(1, 3, 6, 6), kernel_shape=[2, 2], strides=[2, 2]),
    "MaxPool dilations 2": op("MaxPool", D(1, 2, 7, 7), kernel_shape=[2, 2], dilations=[2, 2]),
    "MaxPool asymmetric pads, stride 3": op("MaxPool", D(1, 2, 7, 8), kernel_shape=[3, 2],
                                            strides=[3, 2], pads=[1, 0, 0, 1]),
    "MaxPool Indices output unused": op("MaxPool", D(1, 2, 6, 6), kernel_shape=[3, 3],
                                        strides=[2, 2], outputs=2, storage_order=0),
    "MaxPool SAME_UPPER stride 2": op("MaxPool", D(1, 2, 7, 7), kernel_shape=[3, 3],
                                      strides=[2, 2], auto_pad="SAME_UPPER"),
    "MaxPool 1-D": op("MaxPool", D(2, 2, 9), kernel_shape=[3], strides=[2]),
    "MaxPool ceil_mode with pads": op("MaxPool", D(1, 2, 6, 6), kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
    "AveragePool": op("AveragePool", S((1, 2, 6, 6)), kernel_shape=[2, 2], strides=[2, 2]),
    "AveragePool pads excluded": op("AveragePool", S((1, 2, 5, 5)), kernel_shape=[3, 3],
                                    pads=[1, 1, 1, 1]),
    "AveragePool pads included": op("AveragePool", S((1, 2, 5, 5)), kernel_shape=[3, 3],
                                    pads=[1, 1, 1, 1], count_include_pad=1),
    "AveragePool ceil_mode": op("AveragePool", S((1, 2, 6, 6)), kernel_shape=[3, 3],
                                strides=[2, 2], ceil_mode=1),
    "AveragePool ceil_mode pads included": op("AveragePool", S((1, 2, 6, 6)),
                                              kernel_shape=[3, 3], strides=[2, 2],
                                              pads=[1, 1, 1, 1], ceil_mode=1,
                                              count_include_pad=1),
    "AveragePool 1-D": op("AveragePool", S((2, 2, 7)), kernel_shape=[3], strides=[2]),
    "GlobalAveragePool": op("GlobalAveragePool", S((2, 3, 4, 4))),
    "GlobalAveragePool symbolic size": symbolic(op("GlobalAveragePool", S((2, 3, 3, 4))),
                                                x=("N", 3, "H", "W")),
    "GlobalMaxPool": op("GlobalMaxPool", D(2, 3, 3, 4)),
    "LRN size 3": op("LRN", S((1, 5, 3, 3)), size=3, alpha=0.5, beta=0.75, bias=1.0),
    "LRN size 4 (even; onnxruntime takes odd sizes only)": no_runtime(op(
        "LRN", S((2, 6, 2, 2)), size=4, alpha=0.3, beta=0.6, bias=2.0)),
    "LRN size 5 defaults": op("LRN", S((1, 7, 2, 3)), size=5),
    # --- normalization ---
    "BatchNormalization": op("BatchNormalization", S((2, 3, 2, 2)), W(3), W(3), W(3),
                             np.abs(W(3)) + 0.5, epsilon=1e-3),
    "BatchNormalization 3-D": op("BatchNormalization", S((2, 3, 4)), W(3), W(3), W(3),
                                 np.abs(W(3)) + 0.5),
    "BatchNormalization 2-D": op("BatchNormalization", S((4, 3)), W(3), W(3), W(3),
                                 np.abs(W(3)) + 0.5),
    "InstanceNormalization": op("InstanceNormalization", S((2, 3, 3, 3)), W(3), W(3),
                                epsilon=1e-2),
    "LayerNormalization axis -1": op("LayerNormalization", S((2, 3, 4)), W(4), W(4)),
    "LayerNormalization axis 1 no bias": op("LayerNormalization", S((2, 3, 4)), W(3, 4),
                                            axis=1, epsilon=1e-2),
    "LayerNormalization axis -2 mean and inv std used": op(
        "LayerNormalization", S((2, 3, 4)), W(3, 4), W(3, 4), axis=-2, outputs=3,
        used=(0, 1, 2)),
    "LayerNormalization optional outputs unused": op("LayerNormalization", S((3, 4)), W(4),
                                                     outputs=3),
    # --- reductions ---
    "ReduceSum axes input keepdims": op("ReduceSum", S((2, 3, 4)), i64(1)),
    "ReduceSum axes input no keepdims": op("ReduceSum", S((2, 3, 4)), i64(0, -1), keepdims=0),
    "ReduceSum all": op("ReduceSum", S((2, 3)), keepdims=0),
    "ReduceSum noop_with_empty_axes (onnxruntime 1.19 fails the forward)": no_runtime(op(
        "ReduceSum", S((2, 3)), noop_with_empty_axes=1)),
    "ReduceSum opset 11 attribute": op("ReduceSum", S((2, 3, 4)), opset=11, axes=[1],
                                       keepdims=0),
    "ReduceMean attribute": op("ReduceMean", S((2, 3, 4)), axes=[-1]),
    "ReduceMean attribute no keepdims": op("ReduceMean", S((2, 3, 4)), axes=[0, 2], keepdims=0),
    "ReduceMean opset 18 input": op("ReduceMean", S((2, 3, 4)), i64(1, 2), opset=18,
                                    keepdims=0),
    "ReduceMean all": op("ReduceMean", S((2, 3))),
    "ReduceMean symbolic dims": symbolic(op("ReduceMean", S((2, 3, 4)), axes=[0, 2]),
                                         x=("N", 3, "L")),
    "ReduceMax attribute": op("ReduceMax", D(2, 3, 4), axes=[1], keepdims=0),
    "ReduceMax opset 18 input": op("ReduceMax", D(2, 3, 4), i64(-1), opset=18),
    "ReduceMax all": op("ReduceMax", D(3, 4), keepdims=0),
    "ReduceMin": op("ReduceMin", D(2, 3, 4), axes=[0]),
    "ReduceSumSquare": op("ReduceSumSquare", S((2, 3)), axes=[1]),
    "ReduceL2": op("ReduceL2", S((2, 3)), axes=[0], keepdims=0),
    "ReduceL1": op("ReduceL1", S((2, 3)), axes=[1]),
    "ReduceLogSumExp": op("ReduceLogSumExp", S((2, 3)), axes=[1], keepdims=0),
    # --- shapes ---
    "Flatten axis 1": op("Flatten", S((2, 3, 2))),
    "Flatten axis 0": op("Flatten", S((2, 3, 2)), axis=0),
    "Flatten axis 2": op("Flatten", S((2, 3, 2, 2)), axis=2),
    "Reshape 0 and -1": op("Reshape", S((2, 3, 4)), i64(0, -1, 2)),
    "Reshape allowzero": op("Reshape", S((2, 3, 4)), i64(4, 6), opset=14, allowzero=1),
    "Reshape symbolic batch": symbolic(op("Reshape", S((2, 3, 4)), i64(0, -1)),
                                       x=("N", 3, 4)),
    "Transpose default": op("Transpose", S((2, 3, 4))),
    "Transpose perm": op("Transpose", S((2, 3, 4, 2)), perm=[0, 2, 3, 1]),
    "Concat axis 1 with a constant": op("Concat", S((2, 1, 3)), W(2, 2, 3), S((2, 3, 3)), axis=1),
    "Concat negative axis": op("Concat", S((2, 3)), S((2, 2)), axis=-1),
    "Concat symbolic batch": symbolic(op("Concat", S((2, 3)), S((2, 2)), axis=1),
                                      x=("N", 3), z=("N", 2)),
    "Concat dynamic sizes": symbolic(op("Concat", S((2, 3)), S((2, 2)), axis=1),
                                     x=(2, "A"), z=(2, "B")),
    "Split attribute split (opset 11)": op("Split", S((2, 5)), opset=11, axis=1, split=[2, 3],
                                           outputs=2, used=(0, 1)),
    "Split input split": op("Split", S((5, 2)), i64(1, 4), opset=13, outputs=2, used=(0, 1)),
    "Split equal, one output unused": op("Split", S((2, 6)), opset=13, axis=1, outputs=3,
                                         used=(0, 2)),
    "Split num_outputs (opset 18)": op("Split", S((2, 7)), opset=18, axis=-1, num_outputs=3,
                                       outputs=3, used=(0, 1, 2)),
    "Slice": op("Slice", S((4, 5)), i64(1, 0), i64(3, 4)),
    "Slice negative, omitted axes": op("Slice", S((4, 5)), i64(-3), i64(-1)),
    "Slice axes, ends past the end": op("Slice", S((2, 4, 5)), i64(1), i64(100), i64(-1)),
    "Slice steps 2": op("Slice", S((4, 6)), i64(0, 1), i64(4, 6), i64(0, 1), i64(2, 2)),
    "Slice steps -1 (reverse)": op("Slice", S((3, 5)), i64(-1), i64(-100), i64(1), i64(-1)),
    "Slice steps -2": op("Slice", S((3, 7)), i64(5), i64(0), i64(1), i64(-2)),
    "Slice symbolic batch": symbolic(op("Slice", S((2, 5)), i64(1), i64(4), i64(1)),
                                     x=("N", 5)),
    "Gather axis 0": op("Gather", S((4, 3)), i64(2, 0)),
    "Gather axis 1, repeated and negative": op("Gather", S((2, 5)), i64(1, -1, 1, 4), axis=1),
    "Gather scalar index": op("Gather", S((2, 3, 4)), np.array(-2, np.int64), axis=1),
    "Gather 2-D indices axis -1": op("Gather", S((2, 3)), np.array([[0, 2], [2, 2]]), axis=-1),
    "Gather symbolic batch": symbolic(op("Gather", S((2, 5)), i64(1, 3, 3), axis=1),
                                      x=("N", 5)),
    "Squeeze input": op("Squeeze", S((2, 1, 3, 1)), i64(1, -1)),
    "Squeeze attribute (opset 11)": op("Squeeze", S((2, 1, 3)), opset=11, axes=[1]),
    "Squeeze all": op("Squeeze", S((1, 3, 1))),
    "Unsqueeze input": op("Unsqueeze", S((2, 3)), i64(0, -1)),
    "Unsqueeze attribute (opset 11)": op("Unsqueeze", S((2, 3)), opset=11, axes=[1]),
    "Expand": op("Expand", S((3, 1)), i64(2, 3, 4)),
    "Expand to a smaller rank shape": op("Expand", S((2, 1, 4)), i64(3, 1)),
    "Tile": op("Tile", S((2, 3)), i64(2, 3)),
    "Tile 3-D": op("Tile", S((1, 2, 2)), i64(2, 1, 3)),
    "Pad constant": op("Pad", S((2, 3)), i64(1, 0, 2, 1)),
    "Pad negative (crop)": op("Pad", S((3, 4)), i64(1, -1, -1, 2)),
    "Pad with value, opset 18 axes": op("Pad", S((2, 3, 4)), i64(1, 2), np.array(0.5), i64(2),
                                        opset=18),
    "Pad reflect": op("Pad", S((3, 4)), i64(1, 2, 2, 1), mode="reflect"),
    "Pad edge": op("Pad", S((1, 2, 3, 3)), i64(0, 0, 2, 1, 0, 0, 1, 3), mode="edge"),
    "Resize nearest asymmetric floor (torch)": op(
        "Resize", S((1, 2, 3, 3)), "", f32(1, 1, 2, 2), mode="nearest",
        coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "Resize nearest half_pixel sizes": op(
        "Resize", S((1, 2, 3, 4)), "", "", i64(1, 2, 5, 7), mode="nearest"),
    "Resize linear half_pixel": op("Resize", S((1, 2, 3, 3)), "", f32(1, 1, 2, 2),
                                   mode="linear"),
    "Resize linear align_corners sizes": op(
        "Resize", S((1, 1, 3, 4)), "", "", i64(1, 1, 5, 6), mode="linear",
        coordinate_transformation_mode="align_corners"),
    "Resize linear pytorch_half_pixel": op(
        "Resize", S((1, 2, 4, 3)), "", f32(1, 1, 0.5, 2), mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel"),
    "Resize linear asymmetric": op("Resize", S((1, 1, 3, 3)), "", f32(1, 1, 3, 2),
                                   mode="linear", coordinate_transformation_mode="asymmetric"),
    "Resize linear 1-D last axis": op("Resize", S((2, 5)), "", f32(1, 1.6), mode="linear"),
    "Resize opset 18 axes": op("Resize", S((1, 2, 3, 3)), "", f32(2, 3), opset=18,
                               mode="linear", axes=[2, 3]),
    "Resize nearest symbolic batch": symbolic(op(
        "Resize", S((2, 2, 3, 3)), "", f32(1, 1, 2, 2), mode="nearest",
        coordinate_transformation_mode="asymmetric", nearest_mode="floor"), x=("N", 2, 3, 3)),
}


@pytest.mark.parametrize("name", CASES)
def test_rule_matches_central_differences(name):
    check(CASES[name])


def test_cast_between_float_types():
    """y = cast(x) to float64 from a float32 graph: dx = cast(dy) = the score weights."""
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)
    weights = np.random.default_rng(0).uniform(0.5, 1.5, (2, 3))
    graph = helper.make_graph(
        [node, helper.make_node("Mul", ["y", "w"], ["p"]),
         helper.make_node("ReduceSum", ["p"], ["score"], keepdims=0)], "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("score", TensorProto.DOUBLE, [])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    gradient = build_native_gradient(model, "x")
    onnx.checker.check_model(gradient)
    x = np.ones((2, 3), np.float32)
    got = onnxruntime.InferenceSession(gradient.SerializeToString()).run(["x_grad"], {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, weights.astype(np.float32))
    ref = ReferenceEvaluator(gradient).run(["x_grad"], {"x": x})[0]
    np.testing.assert_allclose(ref, weights.astype(np.float32))


REQUIRED = """Conv ConvTranspose Gemm MatMul Add Sub Mul Div Relu LeakyRelu PRelu Clip Sigmoid
HardSigmoid HardSwish Tanh Erf Gelu Softplus Elu Softmax LogSoftmax Exp Log Sqrt Pow Neg Abs
Reciprocal Max Min Sum LayerNormalization BatchNormalization InstanceNormalization LRN MaxPool
AveragePool GlobalAveragePool GlobalMaxPool ReduceMean ReduceSum ReduceMax Flatten Reshape
Transpose Concat Split Slice Gather Squeeze Unsqueeze Expand Tile Pad Resize Identity Dropout
Cast Where Einsum""".split()


# tested in test_quantized against central differences of clip (the straight-through estimator:
# their own derivative is 0 almost everywhere)
STRAIGHT_THROUGH = {"QuantizeLinear", "DequantizeLinear"}


def test_every_rule_is_tested_and_documented():
    tested = ({node.op_type for case in CASES.values() for node in case.nodes} | {"Cast"}
              | STRAIGHT_THROUGH)
    assert set(REQUIRED) <= set(VJP_RULES)
    assert set(VJP_RULES) <= tested, sorted(set(VJP_RULES) - tested)
    for op_type, rule in VJP_RULES.items():
        assert rule.function.__doc__ and ":" in rule.function.__doc__, op_type
