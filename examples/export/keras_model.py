"""Export a Keras application to ONNX with tf2onnx, with its defaults.

    .venv-tf/bin/python examples/export/keras_model.py --arch MobileNetV2 --output mobilenetv2.onnx

tf2onnx keeps Keras's channels-last layout ([N, H, W, 3] input, no --inputs-as-nchw) and its
layer names in the tensor names (`model/Conv_1/Conv2D:0`); onnxattr takes the model as it is.
Keras applications leave `preprocess_input` outside the model: give onnxattr the pixel contract
of the model's preprocessing mode (MobileNetV2: `--pixel-range -1..1`; see the page's table).
--weights none: random weights (no download), as the tests use it.
"""

import argparse

import tensorflow as tf
import tf2onnx


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="MobileNetV2", help="a keras.applications name")
    parser.add_argument("--weights", default="imagenet", help="imagenet, or none")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    weights = None if args.weights == "none" else args.weights
    model = getattr(tf.keras.applications, args.arch)(
        weights=weights, input_shape=(args.size, args.size, 3))
    spec = (tf.TensorSpec((None, args.size, args.size, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, output_path=args.output)


if __name__ == "__main__":
    main()
