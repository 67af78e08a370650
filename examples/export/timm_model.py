"""Export a timm classifier to ONNX, its pixel contract written into the model's metadata.

    python examples/export/timm_model.py --arch convnextv2_atto --output convnextv2.onnx

timm knows each model's preprocessing (its pretrained config: input size, mean, std on 0..1
pixels); the script stores it as onnxattr.input metadata, so onnxattr needs no flags.
--pretrained none: random weights (no download), as the tests use it (with `test_convnext`,
one of timm's tiny test models).
"""

import argparse
import json

import onnx
import timm
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="convnextv2_atto", help="a timm.list_models() name")
    parser.add_argument("--pretrained", choices=["yes", "none"], default="yes")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    model = timm.create_model(args.arch, pretrained=args.pretrained == "yes").eval()
    config = timm.data.resolve_data_config({}, model=model)
    torch.onnx.export(model, (torch.zeros(2, *config["input_size"]),), args.output,
                      input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamo=False, dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    exported = onnx.load(args.output)
    onnx.helper.set_model_props(exported, {"onnxattr.input": json.dumps(
        {"range": [0, 1], "mean": list(config["mean"]), "std": list(config["std"])})})
    onnx.save(exported, args.output)


if __name__ == "__main__":
    main()
