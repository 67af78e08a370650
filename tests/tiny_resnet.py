"""The second test architecture: a small ResNet with residual Adds and functional ReLUs only.

Module-hook tools find no ReLU modules in it; onnxattr must rewrite its ReLUs all the same.
"""

import onnx
import torch
import torch.nn.functional as F


class TinyResNet(torch.nn.Module):
    """Stem, an identity residual block, a strided block with a 1x1 projection; F.relu only."""

    def __init__(self, classes=10):
        super().__init__()
        conv = torch.nn.Conv2d
        self.relu = F.relu
        self.stem = conv(3, 8, 3, padding=1)
        self.a1, self.a2 = conv(8, 8, 3, padding=1), conv(8, 8, 3, padding=1)
        self.b1, self.b2 = conv(8, 16, 3, stride=2, padding=1), conv(16, 16, 3, padding=1)
        self.project = conv(8, 16, 1, stride=2)
        self.fc = torch.nn.Linear(16, classes)
        torch.nn.init.normal_(self.fc.weight, std=4.0)  # confident enough to be non-uniform

    def forward(self, image):
        x = self.relu(self.stem((image - 127.5) / 64.0))
        x = self.relu(x + self.a2(self.relu(self.a1(x))))
        x = self.relu(self.project(x) + self.b2(self.relu(self.b1(x))))
        return torch.softmax(self.fc(x.mean(dim=(2, 3))), dim=1)


def export_tiny_resnet(path, seed=0):
    """A seeded TinyResNet exported to ONNX at `path` (input image [N, 3, 32, 32], output
    prob; opset 17, IR version 8); returns the torch module."""
    torch.manual_seed(seed)
    net = TinyResNet().eval()
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["image"],
                      output_names=["prob"], dynamic_axes={"image": {0: "N"}, "prob": {0: "N"}},
                      opset_version=17, **kwargs)
    model = onnx.load(path)
    model.ir_version = 8
    onnx.save(model, path)
    return net
