"""Export a Flax (NNX) image classifier to ONNX with jax2onnx, with its defaults.

    .venv-jax/bin/python examples/export/flax_model.py --output flax_cnn.onnx

jax2onnx keeps JAX's channels-last layout ([N, H, W, C] input) and writes opset 23; onnxattr
takes both as they are. The CNN here (random weights: replace it with your trained module)
scales its pixels inside (x / 255), so onnxattr needs no pixel contract flags.
"""

import argparse

import jax
from flax import nnx
from jax2onnx import to_onnx


class CNN(nnx.Module):
    """pixels 0..255 [N, H, W, 3] -> class probabilities [N, classes]."""

    def __init__(self, size, classes, rngs):
        self.conv1 = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(16 * (size // 2) ** 2, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x / 255.0))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return jax.nn.softmax(self.head(x.reshape(x.shape[0], -1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    model = CNN(args.size, args.classes, nnx.Rngs(0))
    to_onnx(model, [("N", args.size, args.size, 3)], input_names=["image"],
            output_names=["prob"], return_mode="file", output_path=args.output)


if __name__ == "__main__":
    main()
