"""Export a torchvision classifier to ONNX with either of torch's exporters.

    python examples/export/torchvision_model.py --arch resnet18 --output resnet18.onnx
    python examples/export/torchvision_model.py --arch resnet18 --exporter dynamo \
        --output resnet18-dynamo.onnx

The model is exported as torchvision defines it: it takes ImageNet-normalised [N, 3, H, W]
input ((pixels / 255 - mean) / std) and returns logits, so onnxattr needs the pixel contract
flags (`--pixel-range 0..1 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225`).

--exporter torchscript: torch.onnx.export(..., dynamo=False), opset 17.
--exporter dynamo: the torch.export-based exporter (needs onnxscript), opset 18 or later.
--weights none: random weights (no download), as the tests use it.
"""

import argparse

import torch
import torchvision


def export(arch, weights, exporter, size, output):
    model = torchvision.models.get_model(arch, weights=None if weights == "none" else weights)
    model.eval()
    example = (torch.zeros(2, 3, size, size),)  # batch 2: torch.export specialises a batch of 1
    names = {"input_names": ["image"], "output_names": ["logits"]}
    if exporter == "torchscript":
        torch.onnx.export(model, example, output, opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, **names)
    else:
        batch = torch.export.Dim("N", min=1, max=4096)
        torch.onnx.export(model, example, output, dynamo=True, dynamic_shapes=({0: batch},),
                          external_data=False, **names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="a torchvision.models name")
    parser.add_argument("--weights", default="DEFAULT",
                        help="torchvision weights name (DEFAULT: the best), or none")
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    export(args.arch, args.weights, args.exporter, args.size, args.output)


if __name__ == "__main__":
    main()
