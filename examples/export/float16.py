"""Convert a float32 ONNX model to float16, the usual GPU deployment form.

    python examples/export/float16.py resnet18.onnx resnet18-float16.onnx

onnxruntime's converter (onnxruntime.transformers.float16, shipped with every onnxruntime;
onnxconverter-common's float16 module has the same function): weights, input and output in
float16. onnxattr explains such a model in float32 on its own weights (see the page).
"""

import argparse

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    onnx.save(convert_float_to_float16(onnx.load(args.model)), args.output)


if __name__ == "__main__":
    main()
