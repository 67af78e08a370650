"""Export GoogLeNet to ONNX with the onnxattr input contract (`image`: RGB NCHW, pixels 0..255).

    python scripts/export_googlenet.py --caffe DIR [--output models/googlenet.onnx]
    python scripts/export_googlenet.py --torchvision [--weights FILE.pth] [--output ...]

--caffe converts BVLC's Caffe GoogLeNet from a directory in the shared layout (see
onnxattr.io.caffe). --torchvision exports torchvision's GoogLeNet with its ImageNet
normalisation put inside the graph; --weights is a state dict for torchvision's pretrained
architecture (aux_logits=False, transform_input=True), else IMAGENET1K_V1 is downloaded.
Both write `logits` and `prob` outputs and the same metadata.
"""

import io
import sys
import warnings
from pathlib import Path

import click
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout uninstalled

from onnxattr.errors import OnnxAttrError  # noqa: E402
from onnxattr.io import caffe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_PREPROCESSING = (
    "Scales pixels to 0..1 and normalises each RGB channel with the ImageNet mean "
    f"{IMAGENET_MEAN} and standard deviation {IMAGENET_STD}."
)


def torchvision_model(weights_file):
    """torchvision's GoogLeNet in a module mapping RGB 0..255 to (logits, prob), and its labels."""
    import torch
    from torchvision.models import GoogLeNet_Weights, googlenet

    weights = GoogLeNet_Weights.IMAGENET1K_V1
    try:
        if weights_file is None:
            state = weights.get_state_dict(progress=False)
        else:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        net = googlenet(weights=None, aux_logits=False, init_weights=False, transform_input=True)
        # IMAGENET1K_V1 holds the auxiliary classifiers too; inference does not use them
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith(("aux1", "aux2"))})
    except Exception as e:  # download, unpickling or state dict mismatch: say it on one line
        hint = "; pass --weights FILE.pth" if weights_file is None else ""
        raise OnnxAttrError(f"cannot load GoogLeNet weights from {weights_file or weights.url}: "
                            f"{' '.join(str(e).split())}{hint}") from None

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))

        def forward(self, image):
            logits = self.net((image / 255 - self.mean) / self.std)
            return logits, torch.softmax(logits, dim=1)

    return Wrapper().eval(), list(weights.meta["categories"])


def export_torchvision(weights_file, output):
    """Export the wrapped torchvision GoogLeNet (legacy TorchScript exporter, opset 17)."""
    if weights_file is not None and not weights_file.is_file():  # before torch's slow import
        raise OnnxAttrError(f"weights file not found: {weights_file}")
    import torch

    wrapper, labels = torchvision_model(weights_file)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter announces its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (torch.zeros(1, 3, 224, 224),), buffer, dynamo=False,
                          input_names=["image"], output_names=["logits", "prob"],
                          dynamic_axes={name: {0: "N"} for name in ("image", "logits", "prob")},
                          opset_version=caffe.OPSET)
    model = onnx.load_from_string(buffer.getvalue())
    model.ir_version = caffe.IR_VERSION
    caffe.set_metadata(model, labels, "torchvision GoogLeNet",
                       caffe.input_metadata(TORCHVISION_PREPROCESSING))
    return caffe.save_model(model, output)


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--caffe", "caffe_dir", type=click.Path(path_type=Path),
              help="Directory with deploy.prototxt, synset_words.txt and weights/.")
@click.option("--torchvision", is_flag=True, help="Export torchvision's GoogLeNet instead.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="With --torchvision: a state dict file instead of downloading IMAGENET1K_V1.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("models/googlenet.onnx"),
              show_default=True, help="Where to write the ONNX model.")
def main(caffe_dir, torchvision, weights, output):
    if (caffe_dir is None) == (not torchvision):
        raise click.UsageError("pass exactly one of --caffe DIR and --torchvision")
    if weights is not None and not torchvision:
        raise click.UsageError("--weights goes with --torchvision")
    try:
        if torchvision:
            path = export_torchvision(weights, output)
        else:
            path = caffe.export(caffe_dir, output)
    except OnnxAttrError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
