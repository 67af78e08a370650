"""A float64 PyTorch reference of a Caffe classifier, built straight from the Caffe files.

It shares only the prototxt parser with onnxattr.io.caffe: weights are loaded and the Caffe
preprocessing is done here explicitly (RGB -> BGR, then mean subtraction), not folded into a
filter the way the ONNX exporter does, so the two implementations check each other.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxattr.io.caffe import parse_prototxt

MEAN_BGR = (104.0, 117.0, 123.0)


def _first(layer, group, key, default=None):
    return layer.get(group, [{}])[0].get(key, [default])[0]


class CaffeReference(nn.Module):
    """Runs the prototxt layers in order on RGB 0..255 input [N,3,H,W] float64."""

    def __init__(self, layers, weights_dir):
        super().__init__()
        self.layers = [layer for layer in layers if layer["type"][0] != "Input"]
        self.input_blob = next(layer["top"][0] for layer in layers if layer["type"][0] == "Input")
        self.ops = nn.ModuleDict()
        for layer in self.layers:
            op = self._make(layer, weights_dir)
            if op is not None:
                self.ops[layer["name"][0]] = op
        self.double().eval()

    @staticmethod
    def _make(layer, weights_dir):
        kind, name = layer["type"][0], layer["name"][0]

        def load(suffix):
            return torch.from_numpy(np.fromfile(weights_dir / f"{name}_{suffix}.bin", "<f4"))

        if kind == "Convolution":
            n = _first(layer, "convolution_param", "num_output")
            k = _first(layer, "convolution_param", "kernel_size")
            filt = load("filter")
            conv = nn.Conv2d(filt.numel() // (n * k * k), n, k,
                             stride=_first(layer, "convolution_param", "stride", 1),
                             padding=_first(layer, "convolution_param", "pad", 0))
            conv.weight.data = filt.reshape(n, k, k, -1).permute(0, 3, 1, 2).contiguous()
            conv.bias.data = load("bias")
            return conv
        if kind == "InnerProduct":
            filt = load("filter").reshape(_first(layer, "inner_product_param", "num_output"), -1)
            linear = nn.Linear(filt.shape[1], filt.shape[0])
            linear.weight.data, linear.bias.data = filt, load("bias")
            return nn.Sequential(nn.Flatten(), linear)
        if kind == "Pooling":
            kwargs = dict(kernel_size=_first(layer, "pooling_param", "kernel_size"),
                          stride=_first(layer, "pooling_param", "stride", 1),
                          padding=_first(layer, "pooling_param", "pad", 0), ceil_mode=True)
            pool = _first(layer, "pooling_param", "pool", "MAX")
            return nn.MaxPool2d(**kwargs) if pool == "MAX" else nn.AvgPool2d(**kwargs)
        if kind == "LRN":
            return nn.LocalResponseNorm(_first(layer, "lrn_param", "local_size", 5),
                                        alpha=_first(layer, "lrn_param", "alpha", 1.0),
                                        beta=_first(layer, "lrn_param", "beta", 0.75),
                                        k=_first(layer, "lrn_param", "k", 1.0))
        if kind == "ReLU":
            return nn.ReLU()
        return None  # Concat, Dropout (identity at inference) and Softmax are done in forward

    def forward(self, x, score="prob"):
        """Class probabilities (score="prob") or the Softmax's input (score="logit")."""
        bgr = x.flip(1) - torch.tensor(MEAN_BGR, dtype=x.dtype).reshape(1, 3, 1, 1)
        blobs = {self.input_blob: bgr}
        for layer in self.layers:
            kind, name, top = layer["type"][0], layer["name"][0], layer["top"][0]
            inputs = [blobs[b] for b in layer["bottom"]]
            if kind == "Concat":
                blobs[top] = torch.cat(inputs, dim=1)
            elif kind == "Dropout":
                blobs[top] = inputs[0]
            elif kind == "Softmax":
                if score == "logit":
                    return inputs[0]
                blobs[top] = torch.softmax(inputs[0], dim=1)
            else:
                blobs[top] = self.ops[name](inputs[0])
        return blobs[top]


def build_reference(caffe_dir) -> nn.Module:
    """The float64 reference model of the Caffe network in `caffe_dir`."""
    caffe_dir = Path(caffe_dir)
    net = parse_prototxt((caffe_dir / "deploy.prototxt").read_text())
    return CaffeReference(net["layer"], caffe_dir / "weights")
