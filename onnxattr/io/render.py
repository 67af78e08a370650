"""Turning attributions into maps, colored images and PNG figures (numpy + matplotlib Agg only).

Pipeline: `attribution_map` (C, H, W) float -> (H, W) map in [0, 1] (or [-1, 1] for sign "all"),
`colorize` / `styled` -> uint8 RGB, and the `save_*` functions -> PNG files written atomically.
"""

import math
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure

from onnxattr.errors import OnnxAttrError
from onnxattr.io.files import atomic_path

# --- option tables: a new sign, reduction, clipping mode or style is one entry ---------------

# sign -> rectifier applied to the raw attribution before the channel reduction
SIGNS = {
    "absolute": np.abs,
    "positive": lambda a: np.maximum(a, 0.0),
    "negative": lambda a: np.maximum(-a, 0.0),
    "all": lambda a: a,
}
SIGNED = {"all"}  # signs whose maps keep their sign (diverging, range [-1, 1])


def _max_abs(a):
    """Per pixel, the channel value of largest magnitude, sign kept (Simonyan et al.'s max over channels)."""
    idx = np.argmax(np.abs(a), axis=0)[None]
    return np.take_along_axis(a, idx, axis=0)[0]


REDUCTIONS = {
    "sum": lambda a: a.sum(axis=0),
    "max-abs": _max_abs,
}


def _percentile_threshold(magnitude, p):
    """PAIR saliency style: the `p`-th percentile (linear interpolation) of the magnitudes."""
    return float(np.percentile(magnitude, p))


def _outlier_mass_threshold(magnitude, p):
    """Captum style: sort magnitudes ascending and take the running sum; the threshold is the first
    value at which the running sum reaches (100 - p)% of the total. The values above it (holding at
    most p% of the total mass) are the outliers that get clipped. An all-zero map gives 0."""
    values = np.sort(magnitude, axis=None).astype(np.float64)
    running = np.cumsum(values)
    if running[-1] <= 0:
        return 0.0
    k = int(np.searchsorted(running, running[-1] * (1.0 - p / 100.0), side="left"))
    return float(values[min(k, values.size - 1)])


# clip -> (threshold function of (|map|, value), default value, (low, high, inclusive-low, inclusive-high))
CLIPS = {
    "none": None,
    "percentile": (_percentile_threshold, 99.0, (0.0, 100.0, False, True)),
    "outlier-mass": (_outlier_mass_threshold, 2.0, (0.0, 100.0, True, False)),
}


def _white_black():
    """MATLAB flipud(gray(255)): 255 linear gray levels from white (0) to black (1)."""
    g = np.linspace(1.0, 0.0, 255)
    return ListedColormap(np.stack([g, g, g], axis=1), name="white-black")


def _blue_white_red():
    """255-level diverging map: blue (-1), exactly white (0), red (+1)."""
    t = np.linspace(0.0, 1.0, 128)
    down = np.stack([t, t, np.ones_like(t)], axis=1)  # blue -> white
    up = np.stack([np.ones_like(t), t, t], axis=1)[::-1]  # white -> red
    return ListedColormap(np.concatenate([down, up[1:]]), name="blue-white-red")


OWN_CMAPS = {"white-black": _white_black, "blue-white-red": _blue_white_red}
DEFAULT_CMAP = {False: "white-black", True: "blue-white-red"}  # keyed by "is the map signed"

GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma (MATLAB rgb2gray, summing to 1)


def _plain(map_, photo, cmap, alpha, signed):
    """The colorized map alone."""
    return colorize(map_, cmap, signed=signed)


def _masked(map_, photo, cmap, alpha, signed):
    """Photo dimmed by the map (its positive part for signed maps)."""
    weight = np.clip(map_, 0.0, 1.0)[..., None]
    return _to_uint8(photo * weight)


def _overlay(map_, photo, cmap, alpha, signed):
    """Colorized map blended with weight `alpha` over the grayscale photo."""
    heat = colorize(map_, cmap, signed=signed).astype(np.float64)
    gray = np.repeat((photo @ GRAY_WEIGHTS)[..., None], 3, axis=2)
    return _to_uint8((1.0 - alpha) * gray + alpha * heat)


# style -> (needs the photo, function of (map, photo as float, cmap, alpha, signed) -> uint8 RGB)
STYLES = {
    "map": (False, _plain),
    "overlay": (True, _overlay),
    "masked": (True, _masked),
}

DPI = 150
PANEL_INCHES = 3.2  # width of one image in a figure
TILE_INCHES = 2.0  # width of one image in a tile grid
TITLE_CHARS = 34  # titles wrap at this many characters


# --- helpers ----------------------------------------------------------------------------------


def _choice(kind, value, table):
    """`table[value]`, or an OnnxAttrError naming the valid choices."""
    if not isinstance(value, str) or value not in table:
        valid = ", ".join(f"'{k}'" for k in table)
        raise OnnxAttrError(f"unknown {kind} {value!r}; choose one of {valid}")
    return table[value]


def _check_clip_value(clip, value, bounds):
    """Raise unless `value` is a number within `bounds` = (low, high, low included, high included)."""
    lo, hi, lo_in, hi_in = bounds
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
    if not ok:
        span = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
        raise OnnxAttrError(f"clip value for '{clip}' must be a number in {span}, got {value!r}")


def _finite_array(x, ndim, what):
    """`x` as a float64 array of `ndim` dimensions, or an OnnxAttrError if empty or not finite."""
    x = np.asarray(x)
    if x.ndim != ndim or x.size == 0:
        raise OnnxAttrError(f"{what} must be a non-empty {ndim}-D array, got shape {x.shape}")
    real = np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    if not real or not np.all(np.isfinite(x)):
        raise OnnxAttrError(f"{what} must contain only finite numbers")
    return x.astype(np.float64)


def _check_rgb(image, what, shape=None):
    """A uint8 (H, W, 3) array, optionally of the given (H, W)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise OnnxAttrError(f"{what} must be a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if shape is not None and image.shape[:2] != tuple(shape):
        raise OnnxAttrError(f"{what} is {image.shape[1]}x{image.shape[0]} but the map is "
                            f"{shape[1]}x{shape[0]}")
    return image


def _to_uint8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _rescale(m, signed):
    """Signed maps: divide by max |m| (-> [-1, 1]; a constant c becomes sign(c)); others: min-max
    to [0, 1] (a constant becomes zeros). An all-zero map stays zeros, never NaN."""
    if signed:
        span, shifted = np.abs(m).max(), m
    else:
        span, shifted = m.max() - m.min(), m - m.min()
    return shifted / span if span > 0 else np.zeros_like(m)


def _cmap(name):
    """A colormap by name: ours ('white-black', 'blue-white-red') or any matplotlib colormap."""
    if name in OWN_CMAPS:
        return OWN_CMAPS[name]()
    try:
        return colormaps[name]
    except (KeyError, TypeError):
        raise OnnxAttrError(
            f"unknown colormap {name!r}; use 'white-black', 'blue-white-red' or a matplotlib colormap "
            "name (list them: python -c \"import matplotlib; print(sorted(matplotlib.colormaps))\")"
        ) from None


# --- maps and images --------------------------------------------------------------------------


def attribution_map(attribution, reduction="sum", sign="absolute", clip="none", clip_value=None):
    """Reduce a (C, H, W) attribution to a float32 (H, W) map.

    Steps: sign (absolute |a|, positive max(a,0), negative max(-a,0), all = a), channel reduction
    (sum, or max-abs: the channel value of largest magnitude), clipping of |map| at a threshold
    (percentile: the `clip_value`-th percentile, default 99; outlier-mass: the values holding the
    top `clip_value` percent of total mass, default 2, see `_outlier_mass_threshold`; `clip_value`
    is ignored for clip "none"), then rescaling: min-max to [0, 1], or for sign "all" division by
    max |map| to [-1, 1]. A constant map becomes all zeros (for sign "all": its sign, so uniform
    evidence stays visible); never NaN.
    """
    rectify = _choice("sign", sign, SIGNS)
    reduce = _choice("reduction", reduction, REDUCTIONS)
    clipping = _choice("clip", clip, CLIPS)
    a = _finite_array(attribution, 3, "attribution")
    m = reduce(rectify(a))
    if clipping is not None:
        threshold_of, default, bounds = clipping
        value = default if clip_value is None else clip_value
        _check_clip_value(clip, value, bounds)
        t = threshold_of(np.abs(m), float(value))
        m = np.clip(m, -t, t)
    return _rescale(m, sign in SIGNED).astype(np.float32)


def colorize(map, cmap=None, signed=None):
    """Color a 2-D map as uint8 (H, W, 3).

    Unsigned maps span [0, 1]; signed maps span [-1, 1] (0 in the middle of the colormap).
    `signed=None` treats the map as signed when it has negative values. `cmap=None` picks
    'white-black' (the example's flipud(gray(255))) or, for signed maps, 'blue-white-red'.
    """
    m = _finite_array(map, 2, "map")
    signed = bool((m < 0).any()) if signed is None else bool(signed)
    cm = _cmap(DEFAULT_CMAP[signed] if cmap is None else cmap)
    unit = (np.clip(m, -1.0, 1.0) + 1.0) / 2.0 if signed else np.clip(m, 0.0, 1.0)
    return cm(unit, bytes=True)[..., :3]


def styled(map, photo=None, style="map", cmap=None, alpha=0.5, signed=None):
    """Show a map as uint8 (H, W, 3) in a style: 'map' (colorized), 'overlay' (colorized map blended
    with `alpha` over the grayscale photo) or 'masked' (photo times the map's positive part)."""
    needs_photo, render = _choice("style", style, STYLES)
    m = _finite_array(map, 2, "map")
    signed = bool((m < 0).any()) if signed is None else bool(signed)
    if needs_photo:
        if photo is None:
            raise OnnxAttrError(f"style '{style}' needs the photo")
        photo = _check_rgb(photo, "photo", m.shape).astype(np.float64)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not 0 <= alpha <= 1:
        raise OnnxAttrError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return render(m, photo, cmap, float(alpha), signed)


# --- figures ----------------------------------------------------------------------------------


def blank_figure(width, height):
    """A blank Agg figure (constrained layout) of `width` x `height` inches."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure(columns, rows, aspect, inches=PANEL_INCHES, titled=True):
    """A blank figure for a grid of images `inches` wide of height/width ratio `aspect`, with
    room for a title line above each when `titled`."""
    return blank_figure(inches * columns, rows * (inches * aspect + (0.45 if titled else 0.1)))


def show(ax, image, title=None, interpolation="nearest"):
    """An image with a thin light frame, no ticks, and a wrapped title."""
    ax.imshow(image, interpolation=interpolation)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("0.8")
        spine.set_linewidth(0.6)
    if title:
        ax.set_title(textwrap.fill(str(title), TITLE_CHARS), fontsize=10)


def save_figure(fig, path, title=None):
    """Write the figure as PNG to `path` atomically, cropped tight to its content; the path."""
    if title:
        fig.suptitle(textwrap.fill(str(title), TITLE_CHARS * 3), fontsize=12)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1, facecolor="white")
    return path


def _aspect(image):
    return image.shape[0] / image.shape[1]


def save_photo_figure(path, photo, title):
    """The photo titled by the caller, e.g. "golden retriever (0.93)"."""
    photo = _check_rgb(photo, "photo")
    fig = _figure(1, 1, _aspect(photo))
    show(fig.add_subplot(), photo, title)
    save_figure(fig, path)


def save_map_figure(path, image_rgb, title, colorbar=True, cmap=None, signed=False):
    """One method's colored map with its title; the colorbar shows `cmap` (default 'white-black',
    or 'blue-white-red' when `signed`) over [0, 1], or [-1, 1] when `signed`."""
    image = _check_rgb(image_rgb, "map image")
    fig = _figure(1, 1, _aspect(image))
    ax = fig.add_subplot()
    show(ax, image, title)
    if colorbar:
        low = -1.0 if signed else 0.0
        colormap = _cmap(DEFAULT_CMAP[bool(signed)] if cmap is None else cmap)
        mappable = ScalarMappable(Normalize(low, 1.0), colormap)
        fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04)
    save_figure(fig, path)


def save_tile_figure(path, images, title, columns=None, labels=None):
    """A grid of uint8 images under one title (e.g. "Images Along Integration Path"),
    `columns` wide (default: about square), each optionally captioned by `labels`."""
    images = [_check_rgb(im, f"tile {i}") for i, im in enumerate(images)]
    if not images:
        raise OnnxAttrError("no images to tile")
    if labels is not None and len(labels) != len(images):
        raise OnnxAttrError(f"{len(labels)} labels for {len(images)} images")
    if columns is None:
        columns = math.ceil(math.sqrt(len(images)))
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise OnnxAttrError(f"columns must be a positive whole number, got {columns!r}")
    columns = min(int(columns), len(images))
    rows = math.ceil(len(images) / columns)
    fig = _figure(columns, rows, _aspect(images[0]), inches=TILE_INCHES, titled=labels is not None)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i < len(images):
            show(ax, images[i], None if labels is None else labels[i], interpolation="auto")
        else:
            ax.set_axis_off()
    save_figure(fig, path, title)


def save_panel(path, photo, photo_title, maps):
    """The photo and each method's map side by side: `maps` is a list of (title, uint8 RGB)."""
    photo = _check_rgb(photo, "photo")
    panels = [(photo_title, photo)] + [(t, _check_rgb(im, f"map '{t}'")) for t, im in maps]
    fig = _figure(len(panels), 1, max(_aspect(im) for _, im in panels))
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (title, image) in zip(axes, panels):
        show(ax, image, title)
    save_figure(fig, path)
