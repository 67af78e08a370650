"""Gradient graphs from onnxruntime-training's GradientGraphBuilder (the training build), each
ReluGrad node replaced by the chosen ReLU backward rule.

The builder emits one `com.microsoft::ReluGrad(dY, T)` per forward Relu on the path from the
image to the score, where T is the Relu's output or its input (either: X > 0 exactly where
Y > 0). `rewrite_relu_gradients` replaces each of them by `relu_rules.RELU_RULES[rule]` in
standard ops, and refuses rather than return a partly modified gradient under a modified label:
every Relu on the path must have exactly one ReluGrad (any fusion would show as a count
mismatch). Which models a modified rule applies to is relu_rules.check_rule_applies, shared with
the native builder (onnxattr.graph.autodiff), which also gates ReLU6: this builder's gradient of Clip
is not ours to rewrite.

The result still holds training ops (ConvGrad, MaxPoolGrad, ...): onnxattr.graph.lowering turns them
into standard ops.
"""

import re
import signal
import subprocess
import sys

import onnx

from ..errors import OnnxAttrError
from .autodiff.registry import VJP_RULES
from .control_flow import reads, refuse_control_flow
from .opset import MAX_OPSET
from .prepare import ONEHOT, SCORE
from .quantization import DEQUANTIZE, QUANTIZE
from .relu_rules import VANILLA, check_rule_applies, relu_rule, zero_like
from .runtime import onnxruntime
from .toolkit import Emitter, GraphEditor, copy_model, default_opset

NO_GRADIENT = frozenset({"Shape", "Size"})  # ops whose output carries no gradient to their input
_UNSUPPORTED = re.compile(r"not been registered: (\S+) for node (.*)")


def has_training_builder():
    """Whether this onnxruntime is the training build (it has the GradientGraphBuilder)."""
    return hasattr(onnxruntime.capi._pybind_state, "GradientGraphBuilder")


def build_training_gradient(scored, wrt, rule=VANILLA, output=SCORE):
    """The training builder's graph of d `output` / d `wrt`, with `rule` at every ReLU. Keeps
    every output of `scored` and adds `<wrt>_grad`.

    `wrt` is a graph input or any intermediate tensor: the GradientGraphBuilder takes a tensor
    name and stops its backward walk there (a layer's gradient for Grad-CAM; tested against
    the native builder and float64 PyTorch on GoogLeNet and ResNet-18), so no probe input is
    needed."""
    relu_rule(rule)  # an unknown rule fails before the build, and so does a refused model
    check_rule_applies(rule, GraphEditor(scored), score_path(scored, wrt, output), wrt, output,
                       gates_clip=False)
    return rewrite_relu_gradients(training_builder_graph(scored, wrt, output), rule, scored, wrt)


def training_builder_graph(scored, wrt, output=SCORE):
    """The GradientGraphBuilder's own graph of d `output` / d `wrt` (ReluGrad nodes as built)."""
    if not has_training_builder():
        raise OnnxAttrError("the onnxruntime builder needs onnxruntime-training (pip install "
                            "onnxruntime-training-cpu, Python <= 3.12); use the native builder")
    if default_opset(scored) > MAX_OPSET:
        raise OnnxAttrError(f"model uses opset {default_opset(scored)}; onnxruntime-training "
                            f"supports at most {MAX_OPSET} (use the native builder)")
    path = score_path(scored, wrt, output)
    refuse_control_flow(path, wrt, output)
    _refuse_quantization(path)
    graph = onnx.load_from_string(_run_builder(
        onnx.shape_inference.infer_shapes(scored).SerializeToString(), wrt, output))
    outputs = {o.name for o in graph.graph.output}
    graph.graph.output.extend(o for o in scored.graph.output if o.name not in outputs)
    return graph


# The builder runs in a child process: a native crash there (an assertion, a segfault on a graph
# it mishandles) becomes one error line instead of taking this process down. The child loads
# only onnxruntime's extension module, not the onnxruntime package (whose import, pulling in
# torch for the training build, takes 3-5 s). BVLC GoogLeNet's gradient graph on 2 CPU cores:
# 0.2-0.4 s in process, 0.6-0.7 s in the child (measured; the child's own start is 0.3 s), once
# per model, rule and score as graphs are cached on disk.
_BUILDER_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("onnxruntime_pybind11_state", sys.argv[1])
ort = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ort)
wrt, output = sys.argv[2:]
options = ort.SessionOptions()
options.log_severity_level = 3
try:
    builder = ort.GradientGraphBuilder(sys.stdin.buffer.read(), {output}, {wrt}, output, options)
    builder.build()
except RuntimeError as err:
    sys.exit(str(err))
sys.stdout.buffer.write(builder.get_model())
"""


def _refuse_quantization(path):
    """The GradientGraphBuilder stops at a QuantizeLinear (no gradient for it, nor through its
    integer output): one line pointing to the native builder's straight-through estimator."""
    node = next((n for n in path if n.op_type in (QUANTIZE, DEQUANTIZE)), None)
    if node is not None:
        raise OnnxAttrError(f"onnxruntime-training cannot differentiate {node.op_type} (node "
                            f"'{node.name}', an int8 QDQ model): use --builder native, which "
                            "passes the gradient through it (clipped straight-through estimator)")


def _run_builder(model_bytes, wrt, output):
    """The serialized gradient graph the GradientGraphBuilder makes, built in a child process."""
    extension = onnxruntime.capi._pybind_state.GradientGraphBuilder.__module__
    done = subprocess.run([sys.executable, "-c", _BUILDER_CHILD, sys.modules[extension].__file__,
                           wrt, output], input=model_bytes, capture_output=True)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise OnnxAttrError(f"onnxruntime-training's gradient builder crashed ({name}) on this "
                            "model; use --builder native, or file an issue")
    if done.returncode:
        raise OnnxAttrError(_builder_error(done.stderr.decode(errors="replace")))
    return done.stdout


def _builder_error(message):
    unsupported = _UNSUPPORTED.search(message)
    if unsupported:
        op, node = unsupported.group(1), unsupported.group(2).strip() or "(unnamed)"
        instead = "use --builder native, " if op in VJP_RULES else "the native builder cannot either; "
        return (f"onnxruntime-training cannot differentiate op {op} (node '{node}'); "
                f"{instead}replace it in the model, or file an issue")
    last_line = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    return f"onnxruntime-training's gradient builder failed: {last_line[-300:]}"


def score_path(forward, wrt=None, output=SCORE):
    """The nodes of `forward` on a path from tensor `wrt` (default: its image input) to its
    `output`, in order (a node's subgraphs' reads of outer tensors count as its inputs)."""
    graph = forward.graph
    initializers = {t.name for t in graph.initializer}
    reached = {wrt} if wrt else {i.name for i in graph.input} - initializers - {ONEHOT}
    downstream = []
    for node in graph.node:  # topological order: one pass finds everything fed by the source
        if reached.intersection(reads(node)):
            reached.update(node.output)
            downstream.append(node)
    needed, path = {output}, []
    for node in reversed(downstream):
        if needed.intersection(node.output):
            path.append(node)
            if node.op_type not in NO_GRADIENT:
                needed.update(reads(node))
    return path[::-1]


def rewrite_relu_gradients(gradient_graph, rule, forward, wrt=None):
    """A copy of `gradient_graph` whose ReluGrad nodes compute `rule`'s dX instead.

    `forward` is the scored forward model the gradient graph was built from, differentiated
    with respect to `wrt` (default: its image input); the Relu nodes between the two fix how
    many ReluGrad nodes there must be. Raises OnnxAttrError on an unknown rule, a count mismatch,
    and, for the modified rules, a model without Relu or with another rectifier on the path.
    """
    backward = relu_rule(rule)
    path = score_path(forward, wrt)
    wrt = wrt or _image_input(forward)
    expected = len(check_rule_applies(rule, GraphEditor(forward), path, wrt, SCORE,
                                      gates_clip=False))
    model = copy_model(gradient_graph)
    em = Emitter(GraphEditor(model), "relu_rule/")
    count = 0
    for node in model.graph.node:
        if node.op_type == "ReluGrad" and node.domain == "com.microsoft":
            dy, t = node.input
            active = em.op("Greater", t, em.const(zero_like(em, t)))
            backward(em, dy, active, out=node.output[0])
            count += 1
        else:
            em.nodes.append(node)
    if count != expected:
        raise OnnxAttrError(f"the gradient graph has {count} ReluGrad nodes for {expected} Relu "
                            f"nodes between '{wrt}' and the score; cannot apply the '{rule}' "
                            "rule to every ReLU")
    em.editor.set_nodes(em.nodes)
    return model


def _image_input(forward):
    graph = forward.graph
    initializers = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers | {ONEHOT})
