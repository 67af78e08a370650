"""int8 models as they are loaded: QOperator-format models (integer ops such as QLinearConv)
are refused in one line, and a class output computed by a QuantizeLinear -> DequantizeLinear
pair (QDQ format) is read as what the pair quantizes (a Softmax's probabilities). How QDQ models
are differentiated: onnxattr.graph.quantization."""

from ..errors import OnnxAttrError

# QOperator-format int8 ops (besides the QLinear* family): integer arithmetic with no gradient
INTEGER_OPERATORS = frozenset({"QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
                               "DynamicQuantizeMatMul", "QAttention", "QOrderedMatMul"})


def is_integer_operator(node):
    """A QOperator-format int8 op: QLinear*, or an integer Conv/MatMul/Gemm."""
    return node.op_type.startswith("QLinear") or node.op_type in INTEGER_OPERATORS


def refuse_integer_operators(graph, name):
    """One line naming the first QOperator-format op: onnxattr explains int8 models in QDQ
    format (QuantizeLinear/DequantizeLinear around float ops) only."""
    node = next((n for n in graph.node if is_integer_operator(n)), None)
    if node is not None:
        raise OnnxAttrError(
            f"{name} computes in integers ({node.op_type} node '{node.name}', QOperator format), "
            "which onnxattr cannot differentiate: quantize the model in QDQ format "
            "(onnxruntime.quantization.quantize_static with quant_format=QuantFormat.QDQ), or "
            "explain the float model")


def producer_through_qdq(producers, name):
    """The node that computes tensor `name`, looking through QuantizeLinear -> DequantizeLinear
    pairs (an int8 model's quantized Softmax output)."""
    node = producers.get(name)
    while node is not None and node.op_type == "DequantizeLinear":
        quantize = producers.get(node.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            break
        node = producers.get(quantize.input[0])
    return node
