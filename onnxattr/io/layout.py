"""The image input's layout and channel order: what the user or the model's metadata states, or
what the input's shape says where it is unambiguous.

A layout is "NCHW" (channels-first, as torch exports) or "NHWC" (channels-last, as tf2onnx and
jax2onnx export by default). The shape [N, a, b, c] decides when exactly one of a and c can be
the channel axis (1, 3 or 4 channels): [N, 3, 224, 224] is NCHW, [N, 224, 224, 3] is NHWC.
[N, 3, 3, 3], [N, 3, 224, 3] or [N, 3, H, 3] could be either and are refused unless the layout
is stated (`--layout`, `layout=`, or "layout" in the onnxattr.input metadata). A channel order
is "RGB" or "BGR" (Caffe and Keras "caffe" preprocessing): the order of the channels the model
reads; images are always given as RGB.
"""

from ..errors import OnnxAttrError

LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
CHANNEL_COUNTS = (1, 3, 4)  # what a channel axis can hold: grey, colour, colour with alpha
TO_CHANNELS_FIRST = (0, 3, 1, 2)  # Transpose perm: NHWC -> NCHW
TO_CHANNELS_LAST = (0, 2, 3, 1)  # Transpose perm: NCHW -> NHWC


def parse_layout(value, where="layout"):
    """"nchw" / "NHWC" (any case) -> "NCHW" / "NHWC"; None stays None."""
    return _choice(value, LAYOUTS, where)


def parse_channel_order(value, where="channel order"):
    """"rgb" / "BGR" (any case) -> "RGB" / "BGR"; None stays None."""
    return _choice(value, CHANNEL_ORDERS, where)


def _choice(value, choices, where):
    if value is None:
        return None
    text = str(value).strip().upper()
    if text not in choices:
        raise OnnxAttrError(f"{where} must be {' or '.join(c.lower() for c in choices)}, got "
                            f"{value!r}")
    return text


def resolve_layout(dims, stated, where):
    """The layout of an image input of dims [N, a, b, c] (ints, or names for symbolic dims):
    `stated` (a parsed layout) if given, else the one the shape allows; an OnnxAttrError naming
    --layout when both can be. `where` names the input in the message."""
    if stated is not None:
        return stated
    _, first, _, last = dims
    first_fits, last_fits = first in CHANNEL_COUNTS, last in CHANNEL_COUNTS
    if first_fits and last_fits:
        raise OnnxAttrError(f"{where} {_show(dims)} could be channels-first [N, C, H, W] or "
                            "channels-last [N, H, W, C]: give --layout nchw or --layout nhwc "
                            "(layout= in the API, or \"layout\" in the onnxattr.input metadata)")
    return "NHWC" if last_fits else "NCHW"


def channels_first_dims(dims, layout):
    """[N, C, H, W] of an input's dims in `layout`."""
    return [dims[i] for i in TO_CHANNELS_FIRST] if layout == "NHWC" else list(dims)


def _show(dims):
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"
