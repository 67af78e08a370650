"""The native reverse pass: d(output)/d(wrt) for an ONNX graph, in standard ai.onnx ops.

    prepared model (functions inlined, opset >= 17)
      -> path: the nodes downstream of `wrt` through differentiable inputs and upstream of
         `output` (nothing else gets a cotangent)
      -> reverse walk over the path: each node's rule from the VJP_RULES table maps its
         outputs' cotangents to its inputs' cotangents; a tensor read by several nodes gets the
         Sum of their contributions
      -> ReLU rules (vanilla, guided, zeiler-fergus) plug in at every Relu and gated Clip (and
         QuantizeLinear that replaced a Relu: quantization.rectifies)

The walk knows ops by name only for the ReLU rules' policy (which rectifiers they gate, which
they refuse); every other op-specific fact is in a rule (elementwise.py, linear.py, pooling.py,
normalization.py, reductions.py, shapes.py).
"""

import numpy as np
import onnx
import onnx.inliner
from onnx import helper

from ...errors import OnnxAttrError
from .. import relu_rules
from ..control_flow import CONTROL_FLOW, reads, refuse_control_flow
from ..quantization import refuse_quantized_operators
from ..toolkit import (
    MAX_IR_VERSION,
    MIN_OPSET,
    STANDARD_DOMAINS,
    Emitter,
    GraphEditor,
    at_least_opset,
    copy_model,
    default_opset,
    topological_order,
)
from .registry import FLOAT_DTYPES, VJP_RULES, Vjp, differentiable_inputs

# ops whose outputs carry no gradient whatever their inputs (shapes, indices, random values)
NO_GRADIENT = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "EyeLike",
                         "RandomNormalLike", "RandomUniformLike", "ConstantOfShape"})


def build_native_gradient(model, wrt, relu_rule="vanilla", output="score"):
    """A copy of `model` that also computes d `output` / d `wrt` as output `<wrt>_grad`.

    `model`: a ModelProto whose graph computes the scalar tensor `output`. `wrt`: the name of a
    graph input or of any intermediate tensor. `relu_rule`: the backward rule of rectifiers
    (relu_rules.RELU_RULES: vanilla, guided, zeiler-fergus). The result keeps every forward
    node and output and adds `<wrt>_grad` (wrt's shape and dtype); it has only standard ai.onnx
    ops at opset max(17, the model's), IR version <= 10. Raises OnnxAttrError on an op without a
    rule on the path (naming it), and when a modified ReLU rule does not apply.
    """
    relu_backward = relu_rules.relu_rule(relu_rule)
    model = _prepared(model)
    editor = GraphEditor(model)
    editor.set_nodes(topological_order(model.graph.node))
    gradient_name = f"{wrt}_grad"
    _check_names(editor, wrt, output, gradient_name)
    walk = ReverseWalk(editor, wrt, output, relu_rule, relu_backward)
    gradient = walk.run()
    em = walk.em
    em.op("Identity", gradient, outputs=[gradient_name], name=f"{wrt}_grad")
    _install(model, editor, em, gradient_name, _value_type(model, editor, wrt))
    return model


def _prepared(model):
    """A copy with model-local functions inlined, converted to opset 17 if older (onnx's
    version converter also rewrites the ops whose meaning changed, such as Softmax before 13)."""
    model = copy_model(model)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
        del model.functions[:]
    return at_least_opset(model)


def _check_names(editor, wrt, output, gradient_name):
    graph = editor.graph
    known = ({n for node in graph.node for n in node.output} | {i.name for i in graph.input}
             | {t.name for t in graph.initializer})
    for name, what in ((wrt, "tensor to differentiate with respect to"),
                       (output, "output to differentiate")):
        if name not in known:
            raise OnnxAttrError(f"the model has no tensor '{name}' (the {what})")
    taken = known | {n for node in graph.node for n in node.input}
    if gradient_name in taken:
        raise OnnxAttrError(f"the model already has a tensor named '{gradient_name}'")
    if np.dtype(editor.dtype(wrt, default=np.float32)) not in FLOAT_DTYPES:
        raise OnnxAttrError(f"tensor '{wrt}' is not floating point: it has no gradient")


class ReverseWalk:
    """One reverse pass: the path, the cotangents, the emitted nodes."""

    def __init__(self, editor, wrt, output, rule_name, relu_backward):
        self.editor = editor
        self.em = Emitter(editor, prefix="grad/")
        self.opset = max(MIN_OPSET, editor.opset)
        self.wrt, self.output = wrt, output
        self.rule_name, self.relu_backward = rule_name, relu_backward
        self.relu_count = 0
        self._contributions = {}

    # --- the path --------------------------------------------------------------------------

    def _is_float(self, name):
        dtype = self.editor.dtype(name, default=None)
        return dtype is None or np.dtype(dtype) in FLOAT_DTYPES

    def path(self):
        """(the path's nodes in reverse topological order, {id(node): positions of its inputs
        that need a cotangent})."""
        reached, downstream, blocked = {self.wrt}, [], []
        for node in self.editor.graph.node:
            hits = [i for i, name in enumerate(node.input) if name and name in reached]
            if node.op_type in CONTROL_FLOW and reached.intersection(reads(node)):
                hits = list(range(len(node.input)))  # refused below if the output needs it
            if not hits or node.op_type in NO_GRADIENT:
                continue
            rule = VJP_RULES.get(node.op_type)
            through = hits if rule is None else [
                i for i in hits if i in differentiable_inputs(rule, node)]
            if len(through) < len(hits):
                blocked.append((node, [i for i in hits if i not in through]))
            if not through:
                continue
            carries_integers = rule is not None and rule.integer_outputs
            reached.update(o for o in node.output if o and (carries_integers or self._is_float(o)))
            downstream.append((node, through))
        needed, path, wanted = {self.output}, [], {}
        for node, through in reversed(downstream):
            if needed.intersection(node.output):
                path.append(node)
                wanted[id(node)] = set(through)
                needed.update(node.input[i] for i in through)
        refuse_control_flow(path[::-1], self.wrt, self.output)
        ancestors = _ancestors(self.editor.graph, self.output)
        refuse_quantized_operators([node for node, _ in downstream
                                    if ancestors.intersection(node.output)], self.wrt, self.output)
        self._refuse_blocked(blocked, ancestors)
        if self.wrt not in needed:
            raise OnnxAttrError(f"'{self.output}' does not depend on '{self.wrt}' through "
                                "differentiable ops: there is no gradient to build")
        return path, wanted

    def _refuse_blocked(self, blocked, ancestors):
        """A float input reached from wrt at a position its rule does not differentiate, on a
        node the output depends on (`ancestors`: the tensors it depends on): the gradient would
        silently miss that term."""
        for node, positions in blocked:
            floats = [i for i in positions if self._is_float(node.input[i])]
            if floats and ancestors.intersection(node.output):
                names = ", ".join(f"input {i} ('{node.input[i]}')" for i in floats)
                raise OnnxAttrError(
                    f"the native gradient builder differentiates {node.op_type} node "
                    f"'{node.name}' only through its data input, but its {names} depends on "
                    f"'{self.wrt}': re-export the model without that dependency, try --builder "
                    "onnxruntime, or file an issue")

    # --- the walk ----------------------------------------------------------------------------

    def run(self):
        path, wanted = self.path()
        missing = [n for n in path if n.op_type not in VJP_RULES]
        if missing:
            node = missing[-1]  # the first in forward order
            more = len({n.op_type for n in missing} - {node.op_type})
            also = f" (and {more} other op type{'s' * (more > 1)})" if more else ""
            raise OnnxAttrError(f"the native gradient builder has no rule for op {node.op_type} "
                                f"(node '{node.name}'){also}: re-export the model without it, "
                                "try --builder onnxruntime, or file an issue")
        gated = relu_rules.check_rule_applies(self.rule_name, self.editor, path[::-1], self.wrt,
                                              self.output)
        self._seed()
        for node in path:
            self._backward(node, wanted[id(node)])
        if self.relu_count != len(gated):
            raise OnnxAttrError(f"the native gradient builder applied the '{self.rule_name}' "
                                f"ReLU rule {self.relu_count} times for {len(gated)} Relu (and "
                                "gated Clip) nodes between the input and the output; refusing "
                                "a partly modified gradient")
        return self._total(self.wrt)

    def _seed(self):
        dtype = self.em.dtype(self.output)
        shape = self.editor.inferred_shape(self.output)
        if shape == []:
            seed = self.em.const(np.array(1, dtype), "seed")
        else:
            seed = self.em.op("ConstantOfShape", self.em.op("Shape", self.output),
                              value=onnx.numpy_helper.from_array(np.ones(1, dtype)))
        self._contributions[self.output] = [seed]

    def _total(self, name):
        parts = self._contributions.get(name)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return self.em.declare(self.em.op("Sum", *parts), self.em.dtype(parts[0]))

    def _backward(self, node, wanted):
        em = self.em
        em.prefix = f"grad/{node.name or node.op_type}/"
        cotangents = [self._total(o) if o else None for o in node.output]
        g = Vjp(self, node, cotangents, wanted)
        results = VJP_RULES[node.op_type].function(g)
        if isinstance(results, str):
            results = [results]
        results = list(results or [])
        for i in sorted(wanted):
            grad = results[i] if i < len(results) else None
            if grad is None:
                raise OnnxAttrError(f"the native gradient builder's rule for {node.op_type} gave "
                                    f"no gradient for input {i} of node '{node.name}'")
            dtype = em.dtype(node.input[i])  # an integer tensor's cotangent: its rule's float
            em.declare(grad, dtype if dtype in FLOAT_DTYPES else em.dtype(grad))
            self._contributions.setdefault(node.input[i], []).append(grad)
        em.prefix = "grad/"

    def apply_relu_rule(self, dy, active):
        self.relu_count += 1
        result = self.relu_backward(self.em, dy, active)
        return result[0] if isinstance(result, list) else result


def _ancestors(graph, output):
    """Names of every tensor `output` depends on (itself included)."""
    producer = {o: node for node in graph.node for o in node.output if o}
    seen, stack = {output}, [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None:
            continue
        for name in node.input:
            if name and name not in seen:
                seen.add(name)
                stack.append(name)
    return seen


def _value_type(model, editor, name):
    """The TypeProto of tensor `name`: from the graph's declarations, else from inference."""
    graph = model.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return value.type
    for tensor in graph.initializer:
        if tensor.name == name:
            return helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    shape = editor.symbolic_shape(name)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(editor.dtype(name)))
    return helper.make_tensor_type_proto(elem, shape)


def _install(model, editor, em, gradient_name, value_type):
    """Append the backward nodes the gradient needs (only those) and the gradient output; set
    the opset and IR version; drop the emitted constants nothing reads."""
    graph = model.graph
    needed, kept = {gradient_name}, []
    for node in reversed(em.nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    constants = em.constant_names()
    unused = constants - needed
    initializers = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    graph.node.extend(reversed(kept))
    output = onnx.ValueInfoProto()
    output.name = gradient_name
    output.type.CopyFrom(value_type)
    graph.output.append(output)
    opset = max(MIN_OPSET, default_opset(model))
    imports = [o for o in model.opset_import if o.domain not in STANDARD_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset), *imports])
    ir = max(model.ir_version, helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))
    model.ir_version = min(ir, MAX_IR_VERSION)
