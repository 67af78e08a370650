"""Quantize a float32 ONNX image classifier to int8 with onnxruntime's static quantizer (QDQ).

    python examples/export/quantize.py resnet18.onnx resnet18-int8.onnx --images photos/ \
        --pixel-range 0..1 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225

Calibration runs the model on the images in --images (png, jpg), each resized to the model's
input size and prepared as the model expects: the same pixel contract flags as onnxattr's
(here those of a plain torchvision export). Channels-first [N, 3, H, W] models.
"""

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from PIL import Image


class Images(CalibrationDataReader):
    """One image at a time, as the model's input: (pixels / 255 * (high - low) + low - mean) / std."""

    def __init__(self, model, folder, pixel_range, mean, std):
        image = onnx.load(model).graph.input[0]
        height, width = (d.dim_value for d in image.type.tensor_type.shape.dim[2:])
        low, high = pixel_range
        mean, std = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (mean, std))
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg"))
        pixels = (np.asarray(Image.open(p).convert("RGB").resize((width, height)), np.float32)
                  .transpose(2, 0, 1) for p in paths)
        self.feeds = iter({image.name: ((p / 255 * (high - low) + low - mean) / std)[None]}
                          for p in pixels)

    def get_next(self):
        return next(self.feeds, None)


def numbers(text):
    return [float(v) for v in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--images", required=True, help="a folder of calibration images")
    parser.add_argument("--pixel-range", type=lambda t: numbers(t.replace("..", ",")),
                        default=[0, 255], help="the range the model expects (default 0..255)")
    parser.add_argument("--mean", type=numbers, default=[0.0])
    parser.add_argument("--std", type=numbers, default=[1.0])
    args = parser.parse_args(argv)
    reader = Images(args.model, args.images, args.pixel_range, args.mean, args.std)
    quantize_static(args.model, args.output, reader, quant_format=QuantFormat.QDQ)


if __name__ == "__main__":
    main()
