"""The classifier zoo: torchvision architectures that outside testers ran onnxattr on.

Importable by tests and scripts (no pytest here). Every model is random-init and seeded
(pretrained weights cannot be downloaded here); `build` wraps it so it takes RGB pixels 0..255
[N, 3, H, W], applies ImageNet normalisation ((x / 255 - mean) / std) inside, and returns
softmax probabilities (or logits with `softmax=False`).

Sizes:

- "full": torchvision's own architecture (`torchvision.models.<name>(weights=None)`), 224x224,
  1000 classes.
- "tiny": the same family built from torchvision's classes and config helpers with reduced
  widths, depths and input size (32-96 px, 10 classes), keeping the ops that matter
  (BatchNormalization, LayerNorm, GELU, HardSwish/HardSigmoid, SiLU, ReLU6, squeeze-excitation,
  channel shuffle, Concat, grouped/depthwise convs, MaxPool ceil_mode, AveragePool, adaptive
  pools, attention, window shifts, Dropout). Building, exporting and one float64 gradient take
  well under a second each.

Random init alone makes poor test models: the softmax is near-uniform (ViT's head is even
zero-initialised), so the top-1 probability is about 1/K and its gradient tiny, and in eval mode
BatchNorm with default statistics (mean 0, variance 1) does not normalise, so the signal of the
image fades with depth and every image gets nearly the same output. So `build` does what
training would have settled, all of it seeded and data-dependent on 8 fixed random images:

- BatchNorm running mean and variance are those of each layer's input on the images (a
  BatchNorm recalibration, the rest of the model in eval mode), and BatchNorm/LayerNorm scale
  and shift are drawn U(0.75, 1.25) and N(0, 0.1^2), so neither is an identity and the tests
  notice a wrong BatchNorm fold or LayerNorm gradient.
- Nets without normalisation layers (AlexNet, SqueezeNet) get an LSUV-style init instead: each
  conv/linear output channel is shifted and scaled to mean 0, std 1 on the images.
- The final classifier layer is redrawn N(0, 1/fan_in) and rescaled so that its logits on the
  images have std `LOGIT_STD` across classes: the top-1 class then has a probability well above
  1/K (tiny, 10 classes: 0.3-1.0 on `random_pixels`; full, 1000 classes: 0.035-0.83). That is
  4x to 60x the weight std of torchvision's default init of that layer (MobileNetV3-Small,
  whose last features are small: 250x to 600x; ViT's default head is zero).
"""

import copy
import hashlib
import inspect
import json
import math
import tempfile
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import (
    convnext,
    densenet,
    efficientnet,
    mobilenetv2,
    mobilenetv3,
    regnet,
    resnet,
    shufflenetv2,
    squeezenet,
    swin_transformer,
    vision_transformer,
)
from torchvision.models.alexnet import AlexNet  # torchvision.models.alexnet is the function

ARCHITECTURES = ["resnet18", "alexnet", "squeezenet1_1", "densenet121", "mobilenet_v2",
                 "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
                 "shufflenet_v2_x1_0", "convnext_tiny", "vit_b_16", "swin_t"]
EXPORTERS = ["torchscript", "dynamo"]
OPSETS = {"torchscript": 17, "dynamo": 18}
MAX_IR_VERSION = 10  # onnxruntime-training 1.19.2 loads IR <= 10 (and opset <= 21)
FULL_SIZE, FULL_CLASSES, TINY_CLASSES = 224, 1000, 10
LOGIT_STD = 2.0
CALIBRATION_IMAGES = 8
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the layer that produces the logits, by architecture (a torch submodule path)
CLASSIFIER_LAYERS = {
    "resnet18": "fc", "alexnet": "classifier.6", "squeezenet1_1": "classifier.1",
    "densenet121": "classifier", "mobilenet_v2": "classifier.1",
    "mobilenet_v3_small": "classifier.3", "efficientnet_b0": "classifier.1",
    "regnet_y_400mf": "fc", "shufflenet_v2_x1_0": "fc", "convnext_tiny": "classifier.2",
    "vit_b_16": "heads.head", "swin_t": "head",
}


class Classifier(nn.Module):
    """pixels 0..255 [N, 3, H, W] -> softmax probabilities [N, K] (logits if not `softmax`)."""

    def __init__(self, net, size, softmax=True):
        super().__init__()
        self.net = net
        self.size = size  # (H, W) the model takes
        self.softmax = softmax
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1) * 255.0)

    def forward(self, image):
        logits = self.net((image - self.mean) / self.std)
        return torch.softmax(logits, dim=1) if self.softmax else logits


# ---- tiny members of each family, built from torchvision's classes --------------------------

class _TinyResNet(resnet.ResNet):
    """torchvision's ResNet (BasicBlock, its _make_layer and forward) with narrow stages."""

    def __init__(self, num_classes, widths=(8, 16, 24, 32), blocks=(1, 1, 1, 1)):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(resnet.BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(resnet.BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(resnet.BasicBlock, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(resnet.BasicBlock, widths[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)


class _TinyAlexNet(AlexNet):
    """torchvision's AlexNet layout (and forward) with narrow layers. At 96 px the features are
    2x2 and the adaptive pool's output is 2x2, as the full net's is 6x6 on 6x6 at 224 px."""

    def __init__(self, num_classes, dropout=0.5):
        nn.Module.__init__(self)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(16, 24, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(24, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 24, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(24, 24, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(24 * 2 * 2, 64), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(64, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )


class _TinySqueezeNet(squeezenet.SqueezeNet):
    """SqueezeNet 1.1's layout (Fire modules, ceil_mode MaxPools, conv classifier) with narrow
    Fires. At 66 px every ceil_mode pool rounds up (32 -> 16 -> 8 -> 4), as none does at 224."""

    def __init__(self, num_classes, dropout=0.5):
        nn.Module.__init__(self)
        self.num_classes = num_classes
        fire = squeezenet.Fire
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            fire(16, 4, 8, 8), fire(16, 4, 8, 8),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            fire(16, 8, 16, 16), fire(32, 8, 16, 16),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            fire(32, 8, 16, 16), fire(32, 12, 24, 24),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Conv2d(48, num_classes, kernel_size=1),
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)),
        )


def _tiny_mobilenet_v3_small(num_classes):
    setting, last_channel = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
    # C1 (SE, ReLU), C2 (ReLU, residual), C3 (SE, HardSwish, residual)
    return mobilenetv3.MobileNetV3(setting[:5], last_channel, num_classes=num_classes)


def _tiny_efficientnet_b0(num_classes):
    setting, last_channel = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25,
                                                            depth_mult=0.5)
    # stages 1-4: expand ratio 1 and 6, kernels 3 and 5, a residual MBConv in stage 4
    return efficientnet.EfficientNet(setting[:4], dropout=0.2, num_classes=num_classes,
                                      last_channel=last_channel)


def _tiny_regnet_y(num_classes):
    params = regnet.BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0,
                                                 group_width=8, se_ratio=0.25)
    return regnet.RegNet(params, num_classes=num_classes, stem_width=8,
                         norm_layer=partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1))


def _tiny_convnext(num_classes):
    cfg = convnext.CNBlockConfig
    # layer_scale 0.5 instead of 1e-6: with random weights the blocks must matter to the gradient
    return convnext.ConvNeXt([cfg(16, 32, 1), cfg(32, 48, 1), cfg(48, None, 1)],
                             layer_scale=0.5, num_classes=num_classes)


def _tiny_swin(num_classes):
    # 8x8 patches of 4x4 px, windows of 4x4 tokens shifted by 2 in every second block
    return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                            num_heads=[2, 4], window_size=[4, 4],
                                            num_classes=num_classes)


TINY = {  # name: (constructor(num_classes), input size)
    "resnet18": (_TinyResNet, 32),
    "alexnet": (_TinyAlexNet, 96),
    "squeezenet1_1": (_TinySqueezeNet, 66),
    "densenet121": (lambda k: densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                                num_init_features=16, bn_size=2,
                                                num_classes=k), 32),
    "mobilenet_v2": (lambda k: mobilenetv2.MobileNetV2(
        num_classes=k, width_mult=0.5,
        inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2], [6, 64, 1, 2]]),
        32),
    "mobilenet_v3_small": (_tiny_mobilenet_v3_small, 32),
    "efficientnet_b0": (_tiny_efficientnet_b0, 32),
    "regnet_y_400mf": (_tiny_regnet_y, 32),
    "shufflenet_v2_x1_0": (lambda k: shufflenetv2.ShuffleNetV2([2, 2, 1], [8, 16, 32, 64, 128],
                                                               num_classes=k), 64),
    "convnext_tiny": (_tiny_convnext, 32),
    "vit_b_16": (lambda k: vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=k), 32),
    "swin_t": (_tiny_swin, 32),
}


def build(name, size="tiny", seed=0, softmax=True):
    """A seeded random-init `Classifier` of architecture `name` (one of ARCHITECTURES) in eval
    mode: pixels 0..255 [N, 3, H, W] -> probabilities [N, K] (logits with softmax=False).
    size "full": torchvision's model at 224x224, 1000 classes; "tiny": a small member of the
    same family (see TINY for the input sizes), 10 classes."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    torch.manual_seed(seed)
    if size == "full":
        net = getattr(torchvision.models, name)(weights=None, num_classes=FULL_CLASSES)
        side = FULL_SIZE
    else:
        constructor, side = TINY[name]
        net = constructor(TINY_CLASSES)
    model = Classifier(net, (side, side), softmax).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    images = _blob_images(CALIBRATION_IMAGES, (side, side), generator)
    _perturb_affine(net, generator)
    _calibrate_batchnorm(model, images)
    head = net.get_submodule(CLASSIFIER_LAYERS[name])
    if not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm))
               for m in net.modules()):
        _standardise_layers(model, images, head)
    _calibrate_classifier(model, head, images, generator)
    return model.eval()


def input_size(module):
    """(H, W) a `build` module takes."""
    return module.size


def random_pixels(module, count=2, seed=0):
    """float32 [count, 3, H, W] seeded random images, pixels 0..255: smooth colour blobs plus
    noise (not pure white noise), for the module's input size."""
    generator = torch.Generator().manual_seed(seed)
    return _blob_images(count, input_size(module), generator).numpy()


def _blob_images(count, size, generator):
    h, w = size
    coarse = torch.rand((count, 3, max(2, h // 8), max(2, w // 8)), generator=generator) * 255
    smooth = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear",
                                       align_corners=False)
    noisy = smooth + torch.randn(smooth.shape, generator=generator) * 20
    return noisy.clamp(0, 255).float()


def _calibrate_batchnorm(model, images):
    """Set every BatchNorm's running mean and variance to the statistics of its input on
    `images` (the rest of the model in eval mode, so Dropout and stochastic depth are off)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one batch gives its own statistics
        norm.train()
    with torch.no_grad():
        model(images)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def _standardise_layers(model, images, skip):
    """LSUV-style data-dependent init for nets without normalisation layers: in one forward pass
    over `images`, every Conv2d and Linear but `skip` is rescaled and shifted so each output
    channel has mean 0 and std 1 there (the job trained BatchNorm statistics do elsewhere)."""
    def standardise(layer, inputs, output):
        dims = [d for d in range(output.dim()) if d != 1] if output.dim() > 2 else [0]
        mean = output.mean(dim=dims)
        std = output.std(dim=dims).clamp_min(1e-6)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.div_(std.reshape(shape))
        layer.bias.copy_((layer.bias - mean) / std)
        view = (1, -1) + (1,) * (output.dim() - 2)
        return (output - mean.reshape(view)) / std.reshape(view)

    layers = [m for m in model.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not skip and m.bias is not None]
    handles = [layer.register_forward_hook(standardise) for layer in layers]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()


def _perturb_affine(net, generator):
    """Random scale U(0.75, 1.25) and shift N(0, 0.1^2) for BatchNorm and LayerNorm."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) \
                    and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator)
                                    * 0.5 + 0.75)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def _calibrate_classifier(model, layer, images, generator):
    """Redraw the logits layer N(0, 1/fan_in), zero bias, then rescale it so the logits of
    `images` have std LOGIT_STD across classes (see module doc)."""
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator)
                           / math.sqrt(fan_in))
        if layer.bias is not None:
            layer.bias.zero_()
        softmax, model.softmax = model.softmax, False
        try:
            logits = model(images).double()
        finally:
            model.softmax = softmax
        spread = float(logits.std(dim=1).mean())
        if spread > 0:
            layer.weight.mul_(LOGIT_STD / spread)


# ---- export ---------------------------------------------------------------------------------

def export(module, path, exporter="torchscript", opset=None):
    """Export a `build` module to one self-contained ONNX file at `path`: input `image`
    [N, 3, H, W] (dynamic batch N), output `prob` [N, K]. exporter "torchscript"
    (dynamo=False, opset 17 by default) or "dynamo" (opset 18 by default; needs onnxscript).
    IR version is lowered to <= 10; external weights (under 2 GB) and model-local functions
    are folded into the file. Returns the path."""
    import onnx

    if exporter not in OPSETS:
        raise ValueError(f"exporter must be one of {', '.join(OPSETS)}, not {exporter!r}")
    opset = opset or OPSETS[exporter]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    softmax, module.softmax = module.softmax, True
    h, w = input_size(module)
    example = (torch.zeros(2, 3, h, w),)  # batch 2: torch.export specialises a batch of 1
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as work, warnings.catch_warnings():
            # the tracer's notes on Python-side shape checks (ViT, Swin): sizes are fixed here;
            # the TorchScript exporter's deprecation notices: choosing it is the point
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            raw = Path(work) / "raw.onnx"
            if exporter == "torchscript":
                torch.onnx.export(module, example, str(raw), input_names=["image"],
                                  output_names=["prob"], opset_version=opset, dynamo=False,
                                  dynamic_axes={"image": {0: "N"}, "prob": {0: "N"}})
            else:
                batch = torch.export.Dim("N", min=1, max=4096)
                program = torch.onnx.export(module, example, input_names=["image"],
                                            output_names=["prob"], opset_version=opset,
                                            dynamo=True, dynamic_shapes=({0: batch},),
                                            verbose=False)
                program.save(str(raw))
            model = onnx.load(str(raw))  # reads any external data beside it
    finally:
        module.softmax = softmax
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.helper.set_model_props(model, {"onnxattr.input": json.dumps(
        {"range": [0, 255], "preprocessing": "ImageNet normalisation inside the model"})})
    large = sum(len(t.raw_data) for t in model.graph.initializer) > 2**31 - 2**24
    onnx.save(model, str(path), save_as_external_data=large,
              location=path.name + ".data" if large else None)
    return path


def export_key(module, exporter):
    """What an exported file depends on: the module (its structure and every weight and buffer),
    the export function's code, torch's version and the exporter."""
    digest = hashlib.sha256()
    for part in (repr(module), inspect.getsource(export), torch.__version__, exporter,
                 str(module.size)):
        digest.update(part.encode() + b"\0")
    for key, value in module.state_dict().items():
        digest.update(key.encode() + b"\0")
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def export_cached(module, path, exporter="torchscript"):
    """`export` unless `path` holds an export with the same `export_key`; returns the opset.
    The file is written under a temporary name and renamed, so an interrupted run leaves no
    half file (single-file models only: every zoo model is far below the 2 GB protobuf limit)."""
    import onnx

    path, key = Path(path), export_key(module, exporter)
    if path.exists():
        try:
            model = onnx.load(str(path), load_external_data=False)
            if {p.key: p.value for p in model.metadata_props}.get("zoo.key") == key:
                return _opset(model)
        except Exception:  # unreadable: export again
            pass
    unfinished = path.with_name(path.name + ".unfinished")
    export(module, unfinished, exporter)
    model = onnx.load(str(unfinished))
    model.metadata_props.add(key="zoo.key", value=key)  # beside onnxattr.input
    onnx.save(model, str(unfinished))
    unfinished.replace(path)
    return _opset(model)


def _opset(model):
    """The model's default-domain opset."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ---- gradients ------------------------------------------------------------------------------

def reference_gradient(module, pixels, targets, score="prob", dtype=torch.float64):
    """Torch autograd (float64 unless `dtype` says otherwise) of each row's target softmax
    probability (score "prob") or logit (score "logit") with respect to the 0..255 pixels; rows
    are independent (eval mode). Returns numpy [N, 3, H, W] of that dtype."""
    if score not in ("prob", "logit"):
        raise ValueError(f"score must be 'prob' or 'logit', not {score!r}")
    reference = copy.deepcopy(module).to(dtype).eval()
    reference.softmax = score == "prob"
    x = torch.tensor(np.asarray(pixels), dtype=dtype, requires_grad=True)
    rows = torch.arange(len(x))
    out = reference(x)[rows, torch.as_tensor(np.asarray(targets), dtype=torch.long)]
    (gradient,) = torch.autograd.grad(out.sum(), x)
    return gradient.numpy()


def reference_forward(module, pixels, score="prob"):
    """float64 probabilities (or logits) [N, K] of the module on `pixels`, as numpy."""
    reference = copy.deepcopy(module).double().eval()
    reference.softmax = score == "prob"
    with torch.no_grad():
        return reference(torch.tensor(np.asarray(pixels), dtype=torch.float64)).numpy()


def onnxattr_explainer(path, builder=None, cache_dir=None):
    """onnxattr's public `Explainer` for a model file; `builder` ("native", "onnxruntime",
    "auto") is passed through when given. cache_dir None: $ONNXATTR_CACHE or the default."""
    from onnxattr import Explainer

    kwargs = {} if builder is None else {"builder": builder}
    return Explainer(path, cache_dir=cache_dir, **kwargs)


def onnxattr_gradient(path, pixels, targets, builder=None, score="prob", cache_dir=None):
    """onnxattr's plain gradient of each row's target score for a model file, through the public
    API (Explainer and its engine). Returns numpy float32 [N, 3, H, W]."""
    explainer = onnxattr_explainer(path, builder, cache_dir)
    gradient, _, _ = explainer.engine.gradient(np.asarray(pixels, np.float32),
                                               np.asarray(targets, np.int64), "vanilla", score)
    return gradient


def relative_l2(actual, expected):
    """||actual - expected|| / ||expected|| over all elements."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
