"""Grad-CAM's map from a layer's activation and gradient (Selvaraju et al. 2017), and the
bilinear upsampling that brings it to the image.

    alpha_k = mean over (i, j) of dS/dA_k[i, j]        (the gradient, global-average-pooled)
    map     = ReLU(sum_k alpha_k A_k)                  [h, w]

Upsampling is bilinear with half-pixel centres, as torch's `F.interpolate(mode="bilinear",
align_corners=False)` and OpenCV's `resize`: output pixel i samples the input at
(i + 0.5) * h / H - 0.5, clamped to the first and last pixel centres. All in float64.
"""

import numpy as np


def grad_cam_maps(activation, gradient):
    """float64 [N, h, w] Grad-CAM maps from the activation A and dS/dA, both [N, K, h, w]."""
    alpha = gradient.astype(np.float64).mean(axis=(2, 3))
    return np.maximum(np.einsum("nk,nkhw->nhw", alpha, activation.astype(np.float64)), 0.0)


def upsample(maps, size):
    """float64 [N, H, W] bilinear upsampling of `maps` [N, h, w] to `size` (H, W)."""
    height, width = size
    rows = interpolation_matrix(height, maps.shape[1])
    columns = interpolation_matrix(width, maps.shape[2])
    return rows @ maps.astype(np.float64) @ columns.T


def interpolation_matrix(n_out, n_in):
    """[n_out, n_in] matrix of linear interpolation weights with half-pixel centres."""
    source = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    weight = source - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - weight)
    np.add.at(matrix, (np.arange(n_out), high), weight)
    return matrix
