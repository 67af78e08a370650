"""The command line's shared flags: the model flags every command takes (which file, device,
builder, pixel contract), the rendering flags and the method flags, each turned into one
checked value before the command runs."""

import functools
from pathlib import Path

import click

from ..errors import OnnxAttrError
from ..graph.builders import CHOICES as BUILDER_CHOICES
from ..graph.prepare import SCORES
from ..graph.runtime import PROVIDERS
from ..io.model import parse_numbers, parse_range
from ..methods.explainer import DEFAULT_MODEL, Explainer
from ..methods.figures import RenderOptions
from ..methods.integration import DEFAULT_RULE, DEFAULT_STEPS, INTEGRATION_RULES, MAX_STEPS
from ..methods.metrics import METRICS, parse_metrics
from ..methods.table import DEFAULT_NOISE, DEFAULT_SAMPLES, METHODS, SMOOTHINGS

EXPORT_HINT = ("export it with: python scripts/export_googlenet.py --caffe "
               "../shared/models/bvlc_googlenet")

# The image input's layout and channel order, and the class names: every command that reads a
# source model takes them (compile too).
CONTRACT_FLAGS = [
    click.option("--layout", type=click.Choice(["nchw", "nhwc"], case_sensitive=False),
                 help="The image input's layout: channels-first or channels-last (default: "
                      "its onnxattr.input metadata, else what its shape says)."),
    click.option("--channel-order", type=click.Choice(["rgb", "bgr"], case_sensitive=False),
                 help="The channel order the model reads (bgr: Caffe, Keras 'caffe' "
                      "preprocessing) [default: its onnxattr.input metadata, else rgb]."),
    click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                 help="Class names: one per line, or a JSON list (default: the model's "
                      "onnxattr.labels metadata, else class 0, class 1, ...)."),
]

# The model flags every command takes: which file, where it runs, how its gradient graph is
# built, and the pixel contract it expects.
MODEL_FLAGS = [
    click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                 help="ONNX image classifier (or a compiled attribution model)."),
    click.option("--device", type=click.Choice(list(PROVIDERS)), default="cpu",
                 show_default=True),
    click.option("--tf32", is_flag=True, help="CUDA: convolutions in TF32 (faster, about 1e-2 "
                 "relative error; default is float32-exact)."),
    click.option("--builder", type=click.Choice(BUILDER_CHOICES), default="auto",
                 show_default=True, help="Gradient builder: onnxruntime-training's where it "
                 "can (auto), that one only, or onnxattr's native reverse pass."),
    click.option("--pixel-range", metavar="0..1|0..255",
                 help="The value range the model's input expects (default: its onnxattr.input "
                      "metadata, else 0..255)."),
    click.option("--mean", metavar="M[,M,M]", help="Per-channel mean the model expects "
                 "subtracted, in its pixel range (e.g. 0.485,0.456,0.406)."),
    click.option("--std", metavar="S[,S,S]", help="Per-channel std the model expects divided "
                 "by, in its pixel range (e.g. 0.229,0.224,0.225)."),
    *CONTRACT_FLAGS,
    click.option("--output", "model_output", metavar="NAME", help="The class output to "
                 "explain, for a model with several (default: the first [N, classes] output)."),
]


def contract_flags(command):
    """Add CONTRACT_FLAGS to a command."""
    for flag in reversed(CONTRACT_FLAGS):
        command = flag(command)
    return command


def model_flags(command):
    """Add the model flags to a command, which gets them as one `explainer` (an Explainer
    made before any image is read, so a bad model or flag fails once)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        kwargs["explainer"] = open_explainer(
            kwargs.pop("model"), kwargs.pop("device"), builder=kwargs.pop("builder"),
            precision="tf32" if kwargs.pop("tf32") else "float32",
            pixel_range=parse_range(kwargs.pop("pixel_range"), "--pixel-range"),
            mean=parse_numbers(kwargs.pop("mean"), "--mean"),
            std=parse_numbers(kwargs.pop("std"), "--std"), layout=kwargs.pop("layout"),
            channel_order=kwargs.pop("channel_order"), output=kwargs.pop("model_output"),
            labels=kwargs.pop("labels"))
        return command(*args, **kwargs)
    for flag in reversed(MODEL_FLAGS):
        wrapper = flag(wrapper)
    return wrapper


def open_explainer(model, device, **options):
    """An Explainer, with a hint on how to make the default model when it is missing."""
    if model == DEFAULT_MODEL and not Path(model).exists():
        raise OnnxAttrError(f"default model {model} not found; {EXPORT_HINT}")
    return Explainer(model, device=device, **options)


score_option = click.option("--score", type=click.Choice(list(SCORES)), default="prob",
                            show_default=True, help="Differentiate the softmax probability "
                            "(as the example) or the logit.")
images_argument = click.argument("images", nargs=-1, required=True,
                                 type=click.Path(path_type=Path))

# Rendering flags: plain strings checked by RenderOptions, so a bad value is one line on stderr.
RENDER_FLAGS = [
    click.option("--reduction", "render_reduction", default="sum", show_default=True,
                 metavar="[sum|max-abs]", help="Channel reduction of the attribution."),
    click.option("--sign", "render_sign", metavar="[absolute|positive|negative|all]",
                 help="Which evidence to draw; 'all' keeps the sign (blue-white-red) "
                      "[default: absolute; all for occlusion]."),
    click.option("--clip", "render_clip", default="none", show_default=True,
                 metavar="[none|percentile|outlier-mass]",
                 help="Clip the largest values before rescaling."),
    click.option("--clip-value", "render_clip_value", metavar="P",
                 help="The clip's percent: percentile (default 99) or outlier mass (default 2)."),
    click.option("--cmap", "render_cmap", metavar="NAME",
                 help="Colormap: white-black, blue-white-red or any matplotlib name "
                      "(default: by style and sign)."),
    click.option("--style", "render_style", metavar="[map|overlay|masked]",
                 help="The map alone, blended over the photo, or the photo masked by it "
                      "[default: map; overlay for grad-cam and occlusion]."),
    click.option("--alpha", "render_alpha", default="0.5", show_default=True, metavar="A",
                 help="Weight of the map in an overlay, 0..1."),
]


def render_flags(command):
    """Add the rendering flags to a command, which gets them as one checked `options`."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name[len("render_"):]: kwargs.pop(name) for name in list(kwargs)
                  if name.startswith("render_")}
        for name in ("clip_value", "alpha"):
            values[name] = _number(name, values[name])
        kwargs["options"] = RenderOptions(**values).check()
        return command(*args, **kwargs)
    for flag in reversed(RENDER_FLAGS):
        wrapper = flag(wrapper)
    return wrapper


def _number(name, text):
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise OnnxAttrError(f"--{name.replace('_', '-')} must be a number, got {text!r}") from None


# Method flags: absent unless given, and each goes only to the methods that take it
# (Method.options); a flag that none of the chosen methods takes is an error.
METHOD_FLAGS = {
    "steps": dict(type=int, help="integrated-gradients: integration steps, 2 to "
                                 f"{MAX_STEPS} [default: {DEFAULT_STEPS}]."),
    "rule": dict(type=click.Choice(list(INTEGRATION_RULES)),
                 help=f"integrated-gradients: integration rule [default: {DEFAULT_RULE}]."),
    "baseline": dict(help="integrated-gradients: black (default), white, blur, uniform (noise "
                          "from --seed), a number, or an image file of the model's input size."),
    "smooth": dict(type=click.Choice(list(SMOOTHINGS)),
                   help="Average the method over noisy copies of the image: SmoothGrad, "
                        "SmoothGrad squared or VarGrad."),
    "samples": dict(type=int, help=f"--smooth: noisy copies [default: {DEFAULT_SAMPLES}]."),
    "noise": dict(type=float, help="--smooth: noise standard deviation as a fraction of the "
                                   f"image's pixel range [default: {DEFAULT_NOISE}]."),
    "seed": dict(type=int, help="Seed of --smooth's noise and of the uniform baseline."),
    "layer": dict(help="grad-cam, guided-grad-cam: the layer (a tensor [N, K, h, w], or a "
                       "ViT's tokens [N, 1 + h*w, C], read as their h x w grid) "
                       "[default: the last spatial feature map before the classifier]."),
    "mask_size": dict(type=int, help="occlusion: side of the square mask in pixels "
                                     "[default: 20% of the image's shorter side]."),
    "stride": dict(type=int, help="occlusion: step of the mask in pixels, at most the mask "
                                  "size [default: half the mask size]."),
    "mask_value": dict(help="occlusion: what masked pixels become: mean (each channel's mean "
                            "over the image, default) or a pixel value."),
}


def flag(name):
    """The command-line flag of a method option: mask_size -> --mask-size."""
    return f"--{name.replace('_', '-')}"


def method_flags(command):
    """Add the method flags to a command, which gets the ones given as a dict `method_options`."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in METHOD_FLAGS}
        kwargs["method_options"] = {k: v for k, v in given.items() if v is not None}
        return command(*args, **kwargs)
    for name, settings in reversed(METHOD_FLAGS.items()):
        wrapper = click.option(flag(name), name, **settings)(wrapper)
    return wrapper


def options_per_method(methods, given):
    """{method: the options out of `given` that it takes}; refuses a flag no method takes."""
    for name in given:
        if not any(name in METHODS[m].options for m in methods):
            raise OnnxAttrError(f"{flag(name)} does not apply to {', '.join(methods)}")
    return {m: {k: v for k, v in given.items() if k in METHODS[m].options} for m in methods}


def metric_flags(option_name):
    """Add the faithfulness flags (`option_name`: --metric or --metrics, comma-separated
    names) to a command, which gets `metrics` (checked names, or [] when the flag is absent
    and optional) and `metric_options`."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, metrics, metric_steps, **kwargs):
            kwargs["metrics"] = parse_metrics(metrics) if metrics else []
            kwargs["metric_options"] = {} if metric_steps is None else {"steps": metric_steps}
            return command(*args, **kwargs)
        wrapper = click.option("--metric-steps", type=click.IntRange(1),
                               help="deletion, insertion, pixel-flipping: steps of the curve "
                                    "[default: 50].")(wrapper)
        return click.option(option_name, "metrics", metavar="NAMES",
                            help=f"Faithfulness metrics, comma-separated: {', '.join(METRICS)} "
                                 "(docs/faithfulness.md).")(wrapper)
    return decorate
