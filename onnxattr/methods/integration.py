"""Integration paths for integrated gradients: baselines, integration rules, path images.

Integrated gradients (Sundararajan et al. 2017) attributes S(I) - S(I0) to the pixels:

    W = (I - I0) * integral over a in [0, 1] of dS/dI(I0 + a (I - I0)) da
      ~ (I - I0) * sum_k w_k dS/dI(I0 + a_k (I - I0))

where I0 is the baseline. This module holds the three ingredients; `methods.py` runs them.

Integration rules: `INTEGRATION_RULES` maps a name to a function `steps -> (alphas, weights)` on [0, 1]
(weights sum to 1). The default is `gausslegendre`, as in Captum: an n-point Gauss-Legendre
rule integrates polynomials of degree 2n - 1 exactly, so on a smooth integrand its error falls
far faster with n than the Riemann sums' (O(1/n) for left/right, O(1/n^2) for middle and
trapezoid). A ReLU network's path integrand is only piecewise smooth, which evens the rules
out somewhat: on GoogLeNet (chelsea, coffee; black baseline, probability) the relative
completeness gap was 8% / 9% with Gauss-Legendre at 16 steps against 13-54% / 8-9% for the
Riemann sums, and 0.6% / 4.2% at 50 steps against 1.2-2.5% / 1.3-4.2%. Whatever the rule,
`relative_convergence_delta` says when more steps are needed.

Baselines (`make_baselines`): "black" and "white" (the ends of the model's pixel range),
"blur" (the image under a Gaussian blur of sigma = BLUR_SIGMA_FRACTION of its larger side,
22.4 pixels at 224 x 224: the objects are gone, the colours stay), "uniform" (uniform noise
over the pixel range, drawn from `seed`; one noise image for every image of the call), a
number (a constant image of that value), or an image of the model's input size (a path, a
PIL image, a uint8 (H, W, 3) array or a float (C, H, W) pixel array).
"""

import os

import numpy as np
from PIL import Image

from ..errors import OnnxAttrError
from ..graph.runtime import even_chunks
from ..io.image import load_image, to_pixels
from ..io.model import PIXEL_RANGE

DEFAULT_STEPS = 50
# The most steps accepted: Gauss-Legendre's nodes cost O(steps^3) time and O(steps^2) memory
# (numpy's leggauss: 27 s at 4000 steps on 2 cores, where 50-300 steps is the usual range).
MAX_STEPS = 4096
DEFAULT_RULE = "gausslegendre"
BLUR_SIGMA_FRACTION = 0.1
# The largest constant baseline accepted: far outside 0..255 already, and far from float32's
# overflow, so the path images and the model's activations stay finite.
MAX_BASELINE = 1e6


# --- integration rules -------------------------------------------------------------------------


def _riemann(offset):
    """Riemann sum with nodes at (k + offset) / steps: 0 left, 1 right, 0.5 middle."""
    def rule(steps):
        return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)
    return rule


def _trapezoid(steps):
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] /= 2
    return np.linspace(0.0, 1.0, steps), weights


def _gauss_legendre(steps):
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    return (nodes + 1) / 2, weights / 2


INTEGRATION_RULES = {
    "riemann_left": _riemann(0.0),
    "riemann_right": _riemann(1.0),
    "riemann_middle": _riemann(0.5),
    "riemann_trapezoid": _trapezoid,
    "gausslegendre": _gauss_legendre,
}


def integration_rule(rule=DEFAULT_RULE, steps=DEFAULT_STEPS):
    """(alphas, weights) float64 [steps] of `rule`, after checking the rule and the step count."""
    if not isinstance(rule, str) or rule not in INTEGRATION_RULES:
        raise OnnxAttrError(f"unknown integration rule {rule!r} (choose from "
                            f"{', '.join(INTEGRATION_RULES)})")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
            or not 2 <= steps <= MAX_STEPS:
        raise OnnxAttrError(f"steps must be a whole number of at least 2 and at most "
                            f"{MAX_STEPS}, got {steps!r}")
    return INTEGRATION_RULES[rule](int(steps))


# --- baselines ---------------------------------------------------------------------------------


def gaussian_blur(pixels, sigma):
    """`pixels` [..., H, W] blurred by a Gaussian of standard deviation `sigma` pixels
    (edges mirrored), as two matrix products: rows, then columns."""
    height, width = pixels.shape[-2:]
    return _blur_matrix(height, sigma) @ pixels @ _blur_matrix(width, sigma).T


def _blur_matrix(n, sigma):
    """[n, n] matrix M with (M @ x) = x convolved with the Gaussian, x mirrored at both ends."""
    offsets = np.arange(-int(np.ceil(3 * sigma)), int(np.ceil(3 * sigma)) + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    source = (np.arange(n)[:, None] + offsets) % (2 * n)  # mirrored: ... 1 0 | 0 1 ... n-1 | n-1
    source = np.where(source >= n, 2 * n - 1 - source, source)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (np.repeat(np.arange(n), len(offsets)), source.ravel()), np.tile(kernel, n))
    return matrix


def _blur(pixels, low, high, seed):
    return gaussian_blur(pixels.astype(np.float64), BLUR_SIGMA_FRACTION * max(pixels.shape[-2:]))


def _uniform(pixels, low, high, seed):
    return np.random.default_rng(seed).uniform(low, high, pixels.shape[1:])


# name -> function(pixels [N, C, H, W], low, high, seed) -> baselines (broadcast to pixels)
BASELINES = {
    "black": lambda pixels, low, high, seed: low,
    "white": lambda pixels, low, high, seed: high,
    "blur": _blur,
    "uniform": _uniform,
}


def make_baselines(baseline, pixels, value_range=PIXEL_RANGE, seed=None):
    """float32 baselines [N, C, H, W] for `pixels` [N, C, H, W].

    `baseline`: one spec for every image (a name of `BASELINES`, a number or a numeric string,
    an image), or a list with one spec per image.
    """
    if isinstance(baseline, list):
        if len(baseline) != len(pixels):
            raise OnnxAttrError(f"{len(baseline)} baselines for {len(pixels)} images")
        return np.concatenate([make_baselines(spec, pixels[i:i + 1], value_range, seed)
                               for i, spec in enumerate(baseline)])
    low, high = value_range
    if isinstance(baseline, str) and baseline in BASELINES:
        values = BASELINES[baseline](pixels, low, high, seed)
    elif (number := _number(baseline)) is not None:
        values = number
    elif isinstance(baseline, (np.ndarray, Image.Image, os.PathLike)) or (
            isinstance(baseline, str) and (os.path.lexists(baseline) or _image_suffix(baseline))):
        values = _baseline_image(baseline, pixels.shape[1:])
    else:
        raise OnnxAttrError(f"unknown baseline {baseline!r} (choose {', '.join(BASELINES)}, a "
                            "number, or an image of the model's input size)")
    return np.ascontiguousarray(np.broadcast_to(np.asarray(values, np.float32), pixels.shape))


def _number(value):
    """`value` as a finite float when it is a number or a numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not np.isfinite(value) or abs(value) > MAX_BASELINE:
            raise OnnxAttrError(f"baseline {value!r} is not a finite pixel value within "
                                f"±{MAX_BASELINE:g} (pixels are 0..255)")
        return float(value)
    return None


def _image_suffix(name):
    """Whether `name` ends like an image file (.png, .jpg...): a missing one is a file not
    found, not an unknown baseline."""
    return os.path.splitext(name)[1].lower() in Image.registered_extensions()


def _baseline_image(source, shape):
    """A baseline image as float pixels `shape` (C, H, W); refuses any other size."""
    channels, height, width = shape
    if isinstance(source, np.ndarray) and source.dtype != np.uint8:
        if source.ndim != 3 or source.shape[0] != channels:
            raise OnnxAttrError(f"baseline image is a {source.dtype} array of shape "
                                f"{source.shape}: it must be a float array of shape {shape} or "
                                "a uint8 image")
        pixels = source.astype(np.float64)
        size = source.shape[2], source.shape[1]
    else:
        try:
            image = load_image(source)
        except OnnxAttrError as err:
            raise OnnxAttrError(f"baseline {err}") from None
        size = image.size
        pixels = to_pixels(image, image.size[::-1])
    if size != (width, height):
        raise OnnxAttrError(f"baseline image is {size[0]}x{size[1]} pixels; it must be the "
                            f"model's input size {width}x{height}")
    if not np.isfinite(pixels).all():
        raise OnnxAttrError("baseline image has NaN or infinite values")
    return pixels


# --- path images -------------------------------------------------------------------------------


def integration_path(pixels, baseline, alphas):
    """The images I0 + a (I - I0) for each a of `alphas` [K]: [K, C, H, W] float32.

    `pixels` and `baseline` are one image (C, H, W), or K images [K, C, H, W] paired with the
    alphas row by row."""
    alphas = np.asarray(alphas, np.float64).reshape(-1, 1, 1, 1)
    pixels, baseline = np.asarray(pixels, np.float64), np.asarray(baseline, np.float64)
    return (baseline + alphas * (pixels - baseline)).astype(np.float32)


def path_chunks(pixels, baselines, alphas, batch_size):
    """The path images of every image, made at most `batch_size` at a time (chunks of even
    size): yields (image, step, path_images) where row r of the chunk is image[r]'s path image
    at alphas[step[r]].

    Rows run image by image, step by step, so a chunk may span images; only one chunk of
    path images exists at a time."""
    for start, end in even_chunks(len(pixels) * len(alphas), batch_size):
        image, step = np.divmod(np.arange(start, end), len(alphas))
        yield image, step, integration_path(pixels[image], baselines[image], alphas[step])


def path_images(pixels, steps=DEFAULT_STEPS, baseline="black", rule=DEFAULT_RULE, seed=None,
                value_range=PIXEL_RANGE, count=16):
    """A few of the path images integrated gradients uses for one image (C, H, W): (alphas,
    images [k, C, H, W] float32), k <= count evenly spaced along the rule's alphas, with the
    method's options (for the "Images Along Integration Path" figure)."""
    alphas, _ = integration_rule(rule, steps)
    baseline = make_baselines(baseline, pixels[None], value_range, seed)[0]
    chosen = np.unique(np.linspace(0, len(alphas) - 1, min(count, len(alphas))).round().astype(int))
    return alphas[chosen], integration_path(pixels, baseline, alphas[chosen])
