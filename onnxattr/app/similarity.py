"""Similarity of two attribution maps, as the sanity checks measure it (Adebayo et al. 2018):
Spearman rank correlation of the channel sum of |attribution| and of the signed channel sum,
SSIM (`ssim`, Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1) of the rendered
maps (`render.attribution_map` defaults), and the Pearson correlation of the HOG features
(`hog`: 8x8-pixel cells, 9 unsigned orientation bins, 2x2-cell blocks, L2-Hys) of the rendered
maps. SSIM and HOG are implemented here with numpy.
"""

import numpy as np

from ..errors import OnnxAttrError
from ..io import render

METRICS = {  # key -> label in figures
    "spearman_abs": "Spearman rank corr. |attribution|",
    "spearman_signed": "Spearman rank corr. (signed)",
    "ssim": "SSIM of the maps",
    "hog_pearson": "Pearson corr. of HOG features",
}


def _ranks(x):
    """1-based ranks of a flat array, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def pearson(a, b):
    """Pearson correlation of two arrays of the same size; nan when one is constant."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def spearman(a, b):
    """Spearman rank correlation (average ranks for ties); nan when one is constant."""
    return pearson(_ranks(np.asarray(a).ravel()), _ranks(np.asarray(b).ravel()))


def _gaussian_window(size, sigma):
    x = np.arange(size) - (size - 1) / 2.0
    w = np.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def _filter_valid(image, window):
    """Separable 'valid' filtering of a 2-D array by a 1-D window along both axes."""
    n = len(window)
    rows = sum(w * image[i:image.shape[0] - n + 1 + i] for i, w in enumerate(window))
    return sum(w * rows[:, i:rows.shape[1] - n + 1 + i] for i, w in enumerate(window))


def ssim(x, y, data_range=1.0, window=11, sigma=1.5, k1=0.01, k2=0.03):
    """Mean structural similarity of two 2-D images (Wang et al. 2004), Gaussian window,
    over the positions where the window lies inside the image (a smaller odd window on small
    images)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise OnnxAttrError(f"ssim needs two 2-D images of one shape, got {x.shape} and {y.shape}")
    size = min(window, min(x.shape) - (1 - min(x.shape) % 2))
    if size < 1:
        raise OnnxAttrError("images too small for SSIM")
    w = _gaussian_window(size, sigma * size / window)
    mx, my = _filter_valid(x, w), _filter_valid(y, w)
    vx = _filter_valid(x * x, w) - mx * mx
    vy = _filter_valid(y * y, w) - my * my
    cxy = _filter_valid(x * y, w) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def hog_cells(image, cell=8, bins=9):
    """Per-cell histograms of unsigned gradient orientation, weighted by gradient magnitude:
    float64 (H // cell, W // cell, bins). Gradients are central differences (zero on the border
    rows/columns); bin b is centred on b * 180 / bins degrees (0 = a horizontal gradient, i.e.
    a vertical edge) and each pixel's magnitude is split linearly between the two nearest bins."""
    image = np.asarray(image, np.float64)
    gx, gy = np.zeros_like(image), np.zeros_like(image)
    gx[:, 1:-1] = image[:, 2:] - image[:, :-2]
    gy[1:-1, :] = image[2:, :] - image[:-2, :]
    magnitude = np.hypot(gx, gy)
    position = (np.degrees(np.arctan2(gy, gx)) % 180.0) / (180.0 / bins)
    low = np.floor(position).astype(int) % bins
    share = position - np.floor(position)
    cy, cx = image.shape[0] // cell, image.shape[1] // cell
    if cy < 1 or cx < 1:
        raise OnnxAttrError(f"image {image.shape} is smaller than one HOG cell ({cell} pixels)")
    crop = (slice(0, cy * cell), slice(0, cx * cell))
    cell_index = ((np.arange(cy * cell) // cell)[:, None] * cx + np.arange(cx * cell) // cell)
    hist = np.zeros((cy * cx, bins))
    flat = cell_index.ravel()
    m, lo, sh = magnitude[crop].ravel(), low[crop].ravel(), share[crop].ravel()
    np.add.at(hist, (flat, lo), m * (1 - sh))
    np.add.at(hist, (flat, (lo + 1) % bins), m * sh)
    return hist.reshape(cy, cx, bins)


def hog(image, cell=8, bins=9, block=2, clip=0.2):
    """HOG feature vector (Dalal & Triggs 2005): `hog_cells`, then overlapping blocks of
    `block` x `block` cells (stride one cell), each L2-Hys normalised (L2, clip at `clip`,
    L2 again). A map smaller than a block gives its single normalised cell grid."""
    cells = hog_cells(image, cell, bins)
    by, bx = min(block, cells.shape[0]), min(block, cells.shape[1])
    blocks = np.lib.stride_tricks.sliding_window_view(cells, (by, bx), axis=(0, 1))
    blocks = blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)
    eps = 1e-6
    blocks = blocks / np.sqrt((blocks ** 2).sum(axis=1, keepdims=True) + eps ** 2)
    blocks = np.minimum(blocks, clip)
    blocks = blocks / np.sqrt((blocks ** 2).sum(axis=1, keepdims=True) + eps ** 2)
    return blocks.ravel()


def similarity(original, other):
    """The four similarities (see METRICS) of attribution `other` (C, H, W) to `original`."""
    original = np.asarray(original, np.float64)
    other = np.asarray(other, np.float64)
    rendered_a, rendered_b = render.attribution_map(original), render.attribution_map(other)
    return {
        "spearman_abs": spearman(np.abs(original).sum(0), np.abs(other).sum(0)),
        "spearman_signed": spearman(original.sum(0), other.sum(0)),
        "ssim": ssim(rendered_a, rendered_b),
        "hog_pearson": pearson(hog(rendered_a), hog(rendered_b)),
    }
