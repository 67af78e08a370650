"""Occlusion sensitivity's ingredients (Zeiler & Fergus 2014; MATLAB's occlusionSensitivity):
the mask positions, the mask value and the masked images. `methods.occlusion` runs them.

A square mask of `mask_size` pixels slides over the image in steps of `stride` from the top
left corner. Along each side the mask starts at 0, stride, 2 stride, ... up to the first
position where it reaches the last pixel; that last mask is clipped at the image's edge (as
Captum's Occlusion, and MATLAB's MaskClipping "on"), so every pixel is masked at least once
whatever the image's size. A stride above the mask size would leave pixels never masked, so
it is refused. The map at a pixel is the mean, over the mask positions covering it, of
S(I) - S(I masked): the drop of the target's score (probability or logit) when the pixels
under the mask take the mask value.

Defaults (MATLAB's): `mask_size` 20% of the image's shorter side, rounded up (45 pixels at
224 x 224), `stride` half the mask size, rounded up (23; MATLAB's 10% of the side), which makes
9 x 9 = 81 masked images at 224 x 224. `mask_value` "mean" is each channel's mean over the
image (MATLAB's "auto"); a number is a pixel value (pixels are 0..255).
"""

import math

import numpy as np

from ..errors import OnnxAttrError
from ..graph.runtime import even_chunks
from .integration import MAX_BASELINE

DEFAULT_MASK_FRACTION = 0.2  # of the shorter side


def occlusion_geometry(size, mask_size=None, stride=None):
    """(mask_size, stride) checked for an image of `size` (height, width), defaults filled in."""
    shorter = min(size)
    if mask_size is None:
        mask_size = math.ceil(DEFAULT_MASK_FRACTION * shorter)
    if not _whole(mask_size) or not 1 <= mask_size <= shorter:
        raise OnnxAttrError(f"mask_size must be a whole number from 1 to {shorter} (the image's "
                            f"shorter side), got {mask_size!r}")
    if stride is None:
        stride = math.ceil(mask_size / 2)
    if not _whole(stride) or not 1 <= stride <= mask_size:
        raise OnnxAttrError(f"stride must be a whole number from 1 to the mask size {mask_size} "
                            f"(a larger stride leaves pixels never masked), got {stride!r}")
    return int(mask_size), int(stride)


def _whole(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def mask_starts(side, mask_size, stride):
    """Where the mask starts along a side of `side` pixels: 0, stride, ... up to the first
    start whose mask reaches the last pixel."""
    return np.arange(math.ceil(max(side - mask_size, 0) / stride) + 1) * stride


def mask_positions(size, mask_size, stride):
    """int [P, 2]: every mask position (top, left), row by row."""
    rows, columns = (mask_starts(side, mask_size, stride) for side in size)
    return np.stack(np.meshgrid(rows, columns, indexing="ij"), axis=-1).reshape(-1, 2)


def coverage(size, mask_size, positions):
    """float64 [H, W]: how many mask positions cover each pixel (at least 1)."""
    counts = np.zeros(size)
    for top, left in positions:
        counts[top:top + mask_size, left:left + mask_size] += 1
    return counts


def mask_values(pixels, mask_value="mean"):
    """float32 [N, C]: the value each image's masked pixels take, per channel."""
    if isinstance(mask_value, str) and mask_value.strip() == "mean":
        return pixels.mean(axis=(2, 3), dtype=np.float64).astype(np.float32)
    try:
        value = float(mask_value) if not isinstance(mask_value, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or not np.isfinite(value) or abs(value) > MAX_BASELINE:
        raise OnnxAttrError(f"mask_value must be 'mean' or a pixel value (a number within "
                            f"±{MAX_BASELINE:g}; pixels are 0..255), got {mask_value!r}")
    return np.full(pixels.shape[:2], value, np.float32)


def masked_chunks(pixels, values, positions, mask_size, batch_size):
    """The masked images of every image at every position, made at most `batch_size` at a
    time (chunks of even size): yields (image, position, masked) where row r of `masked` is
    image[r] with the mask at positions[position[r]]. Only one chunk of masked images exists
    at a time."""
    for start, end in even_chunks(len(pixels) * len(positions), batch_size):
        image, position = np.divmod(np.arange(start, end), len(positions))
        masked = pixels[image]
        for row, (n, (top, left)) in enumerate(zip(image, positions[position])):
            masked[row, :, top:top + mask_size, left:left + mask_size] = \
                values[n][:, None, None]
        yield image, position, masked
