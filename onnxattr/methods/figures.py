"""Rendering options and the figures written for one image: shared by `explain` and `audit`.

`RenderOptions` holds how a map is drawn (sign, channel reduction, clipping, colormap, style,
alpha) and turns an `Explanation` into a uint8 RGB image with `render.py`. `write_figures` writes
one image's figures as the example does: the photo titled "<class> (<score>)", one figure per
method titled e.g. "Gradient Attribution Map (Egyptian cat)", optionally the raw attribution
(.npy) and a panel with the photo and every map; `save_integration_path` the example's
"Images Along Integration Path" tile.
"""

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import OnnxAttrError
from ..io import render
from ..io.files import atomic_path
from .integration import path_images
from .table import METHODS

# Colormap when none is given, by style and by "is the map signed". The plain map is the
# example's white-to-black (blue-white-red when signed); an overlay needs a map whose zero
# does not wash out the photo, so it uses a perceptually uniform dark-to-bright heat map.
DEFAULT_CMAPS = {
    "map": {False: "white-black", True: "blue-white-red"},
    "overlay": {False: "inferno", True: "blue-white-red"},
    "masked": {False: None, True: None},  # the photo itself: no colormap
}
COLORBAR_STYLES = {"map", "overlay"}
# The options a method may choose for itself (Method.render: Grad-CAM draws an overlay) where
# the user leaves them None, and their values where neither does.
METHOD_DEFAULTABLE = {"sign": "absolute", "style": "map"}


@dataclass(frozen=True)
class RenderOptions:
    """How attributions become pictures; the defaults draw the example's map.

    `sign` and `style` None (the defaults) take the method's own choice where it has one
    (`Explanation.render_defaults`, e.g. Grad-CAM's overlay), else absolute and map: an
    explicit value always wins.
    """

    reduction: str = "sum"
    """Channel reduction: sum | max-abs."""
    sign: str = None
    """absolute | positive | negative | all (signed, diverging)."""
    clip: str = "none"
    """none | percentile | outlier-mass."""
    clip_value: float = None
    """The clip's parameter (None: its default)."""
    cmap: str = None
    """Any matplotlib colormap, 'white-black' or 'blue-white-red' (None: by style)."""
    style: str = None
    """map | overlay | masked."""
    alpha: float = 0.5
    """Overlay weight of the map."""

    def resolved(self, defaults=None):
        """These options with `sign` and `style` filled in where None: from `defaults` (a
        method's render defaults), else METHOD_DEFAULTABLE's values."""
        chosen = {name: getattr(self, name) if getattr(self, name) is not None
                  else (defaults or {}).get(name, fallback)
                  for name, fallback in METHOD_DEFAULTABLE.items()}
        return replace(self, **chosen)

    @property
    def signed(self):
        return self.resolved().sign in render.SIGNED

    @property
    def colormap(self):
        """The colormap name used (the default for the style when `cmap` is None)."""
        if self.cmap is not None:
            return self.cmap
        return DEFAULT_CMAPS.get(self.resolved().style, {}).get(self.signed)

    def check(self):
        """Validate every option on a tiny map, so a bad value fails before any work."""
        self.image(np.ones((3, 2, 2), np.float32), np.zeros((2, 2, 3), np.uint8))
        if self.cmap is not None:
            render.colorize(np.zeros((1, 1)), self.cmap)  # a masked picture ignores it: check here
        return self

    def map(self, attribution):
        """float32 (H, W) map of a (C, H, W) attribution: [0, 1], or [-1, 1] when signed."""
        return render.attribution_map(attribution, reduction=self.reduction,
                                      sign=self.resolved().sign, clip=self.clip,
                                      clip_value=self.clip_value)

    def image(self, attribution, photo):
        """uint8 (H, W, 3) picture of a (C, H, W) attribution over `photo` (uint8 (H, W, 3))."""
        return render.styled(self.map(attribution), photo, style=self.resolved().style,
                             cmap=self.colormap, alpha=self.alpha, signed=self.signed)

    def render(self, explanation):
        """uint8 (H, W, 3) picture of an Explanation, with its method's defaults."""
        return self.for_result(explanation).image(explanation.channels_first,
                                                     explanation.photo)

    def for_result(self, explanation):
        """These options resolved for one Explanation's method."""
        return self.resolved(explanation.render_defaults)

    def as_dict(self):
        return asdict(self)


def photo_title(result):
    """The example's photo title: "<class> (<score>)"."""
    return f"{result.label} ({result.score:.2f})"


def write_figures(results, prefix, options=None, save_raw=False, panel=False):
    """Write one image's figures for `results` (one Explanation per method, same image).

    Files are `<prefix>photo.png`, `<prefix><method>.png`, with `save_raw` `<prefix><method>.npy`
    (float32, the attribution in the model's layout: [C, H, W], or [H, W, C] for a channels-last
    model) and with `panel` `<prefix>panel.png`; `prefix` is a path prefix such as
    "out/chelsea_" or "out/chelsea/". Every file is written atomically. Returns a dict
    {"photo": path, "panel": path, "<method>": path, "<method>.npy": path} of what was written.
    """
    if not results:
        raise OnnxAttrError("no results to draw")
    options = (options or RenderOptions()).check()
    prefix = str(prefix)
    first = results[0]
    title = photo_title(first)
    written = {"photo": Path(f"{prefix}photo.png")}
    render.save_photo_figure(written["photo"], first.photo, title)
    pictures = []
    for result in results:
        chosen = options.for_result(result)
        picture = chosen.render(result)
        pictures.append((result.title, picture))
        path = written[result.method] = Path(f"{prefix}{result.method}.png")
        if chosen.style in COLORBAR_STYLES:
            render.save_map_figure(path, picture, result.title, cmap=chosen.colormap,
                                   signed=chosen.signed)
        else:
            render.save_map_figure(path, picture, result.title, colorbar=False)
        if save_raw:
            written[f"{result.method}.npy"] = save_array(Path(f"{prefix}{result.method}.npy"),
                                                         result.attribution)
    if panel:
        written["panel"] = Path(f"{prefix}panel.png")
        render.save_panel(written["panel"], first.photo, title, pictures)
    return written


def save_array(path, array):
    """`np.save` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    return Path(path)


def save_integration_path(explainer, image, path, ig_options):
    """The example's "Images Along Integration Path" figure for integrated gradients with
    `ig_options` (the same baseline, rule and steps); returns the path."""
    own = {k: v for k, v in ig_options.items() if k in METHODS["integrated-gradients"].own_options}
    alphas, images = path_images(explainer.pixels([image])[0], **own)
    render.save_tile_figure(path, [im.transpose(1, 2, 0).round().clip(0, 255).astype(np.uint8)
                                   for im in images], "Images Along Integration Path",
                            labels=[f"α = {a:.2f}" for a in alphas])
    return path
