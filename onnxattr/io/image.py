"""Loading user images as RGB and fitting them to a model's input size.

Every problem with an image (missing, unreadable, not an image, corrupt, truncated, too
large, unusual array) is reported as one `OnnxAttrError` line naming the image.
"""

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import OnnxAttrError
from .remote import is_uri, open_uri

# Largest image accepted, in pixels. 80 megapixels covers every common camera (full-frame
# sensors top out near 61 MP) and keeps the decoded RGB image near 240 MB. It is kept below
# Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS, about 89.5 MP by
# default) so that, normally, our check is the one that answers, with the image's size.
MAX_PIXELS = 80_000_000

FITS = ("stretch", "center-crop")

# Pillow reads EPS by running Ghostscript on the file: not something to do with arbitrary input.
_REFUSED_FORMATS = {"EPS"}

# Nominal value ranges, tried in order, for modes with more than 8 bits per pixel; the
# first range that holds all the data is scaled onto 0..255 (else the data's own min..max).
# 16-bit files open as I;16* (or as I in some formats); float images are 0..1 or 0..255.
_SIXTEEN_BIT = (65535,)
_HIGH_DEPTH_TOPS = {
    "I;16": _SIXTEEN_BIT,
    "I;16L": _SIXTEEN_BIT,
    "I;16B": _SIXTEEN_BIT,
    "I;16N": _SIXTEEN_BIT,
    "I": _SIXTEEN_BIT,
    "F": (1.0, 255.0),
}


def load_image(source):
    """Return `source` (a file path or URI, PIL image or uint8 array) as a fully decoded RGB PIL
    image.

    Files: first frame, EXIF orientation applied. Arrays: (H, W) gray, (H, W, 3) RGB or
    (H, W, 4) RGBA, dtype uint8. Transparent images are composited onto white (see `_to_rgb`).
    """
    if isinstance(source, Image.Image):
        return _decode(source, "PIL image")
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if is_uri(source):  # s3://, gs://, file://...: through pyarrow (io/remote.py)
        return _read_stream(open_uri(source), source)
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source))
    raise OnnxAttrError(
        f"cannot load an image from a value of type {type(source).__name__}: "
        "give a file path, PIL image or uint8 array"
    )


def to_pixels(image, size, fit="stretch"):
    """RGB PIL `image` -> float32 array (3, H, W) of values 0..255 at `size` = (H, W)."""
    pixels = np.asarray(_fit(image, size, fit), dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def load_pixels(source, size, fit="stretch"):
    """`to_pixels` of `load_image(source)`."""
    return to_pixels(load_image(source), size, fit)


def display_image(source, size, fit="stretch"):
    """The photo the model sees, as a writable uint8 (H, W, 3) array (geometry of `to_pixels`)."""
    return np.array(_fit(load_image(source), size, fit), dtype=np.uint8)


def _error(name, problem):
    """An OnnxAttrError `name: problem`, kept to one line."""
    return OnnxAttrError(" ".join(f"{name}: {problem}".splitlines()))


def _read_file(path):
    """Check, open and decode an image file."""
    try:
        if not path.exists():
            if path.is_symlink():
                raise _error(path, "symlink cannot be resolved (a loop, or its target is missing)")
            raise _error(path, "file not found")
        if path.is_dir():
            raise _error(path, "is a directory, not an image file")
        if not path.is_file():
            raise _error(path, "is not a regular file")
        if path.stat().st_size == 0:
            raise _error(path, "file is empty (0 bytes)")
        fp = path.open("rb")
    except OSError as err:  # permissions, I/O errors
        raise _error(path, f"cannot read file ({err.strerror or err})") from None
    return _read_stream(fp, path)


def _read_stream(fp, name):
    """Open and decode the image in the binary file object `fp` (closed after), named `name`."""
    with fp:
        try:
            with _bombs_as_errors():
                image = Image.open(fp, formats=_allowed_formats())
        except Image.UnidentifiedImageError:
            raise _error(name, "not an image file (format not recognized)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            _check_pixels(_header_size(fp), name)  # over our own limit: say so in our words
            raise _decode_error(name, err) from None
        except Exception as err:
            raise _decode_error(name, err) from None
        return _decode(image, name)


def _header_size(fp):
    """(width, height) from an image file's header, without Pillow's size check."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        fp.seek(0)
        with Image.open(fp, formats=_allowed_formats()) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _allowed_formats():
    """Every format Pillow can open, minus the refused ones."""
    Image.init()
    return [name for name in Image.OPEN if name not in _REFUSED_FORMATS]


@contextlib.contextmanager
def _bombs_as_errors():
    """Within this block Pillow's DecompressionBombWarning is raised as an exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _decode(image, name):
    """Size-check, fully decode, orient and convert an opened PIL image to RGB."""
    _check_pixels(image.size, name)
    try:
        with _bombs_as_errors():
            image.load()  # full decode: truncated data fails now (LOAD_TRUNCATED_IMAGES untouched)
            image = ImageOps.exif_transpose(image)
    except Exception as err:
        raise _decode_error(name, err) from None
    try:
        return _to_rgb(image)
    except Exception as err:
        raise _error(name, f"unsupported image mode {image.mode} ({_detail(err)})") from None


def _check_pixels(size, name):
    """Refuse empty images and those over MAX_PIXELS, before any decoding."""
    width, height = size
    if width == 0 or height == 0:
        raise _error(name, f"image has no pixels ({width} x {height})")
    if width * height > MAX_PIXELS:
        raise _error(
            name,
            f"image too large: {width} x {height} pixels = {width * height / 1e6:.1f} megapixels "
            f"(limit {MAX_PIXELS / 1e6:g} megapixels)",
        )


def _decode_error(name, err):
    """The OnnxAttrError for an exception raised while Pillow parsed or decoded an image."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _error(name, f"image too large to decode safely ({_detail(err)})")
    return _error(name, f"corrupt or truncated image data ({_detail(err)})")


def _detail(err):
    """An exception's message, or its type name when it has none."""
    return str(err) or type(err).__name__


def _to_rgb(image):
    """Convert any Pillow mode to RGB.

    Transparent pixels are composited onto white: their stored colour is arbitrary (often
    black or leftovers), and white is what viewers and web pages show behind cut-outs,
    logos and product shots, i.e. what the auditor sees when opening the file.
    """
    if image.mode in _HIGH_DEPTH_TOPS:
        image = _high_depth_to_gray(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_gray(image):
    """16-bit, 32-bit integer or float gray -> 8-bit L, scaled (not clipped) from its value range.

    16-bit data maps 0..65535 onto 0..255 (65535 -> 255, 32768 -> 128); see _HIGH_DEPTH_TOPS.
    Non-finite floats count as 0.
    """
    values = np.asarray(image, dtype=np.float32)
    values = np.where(np.isfinite(values), values, 0)
    low, high = float(values.min()), float(values.max())
    top = next((top for top in _HIGH_DEPTH_TOPS[image.mode] if low >= 0 and high <= top), None)
    if top is not None:
        low, high = 0.0, top
    scaled = (values - low) * (255 / ((high - low) or 1))
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def _from_array(array):
    """uint8 (H, W), (H, W, 3) or (H, W, 4) array -> RGB image."""
    name = "image array"
    if array.dtype != np.uint8:
        raise _error(name, f"dtype must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise _error(name, f"shape must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    _check_pixels((array.shape[1], array.shape[0]), name)
    return _decode(Image.fromarray(np.ascontiguousarray(array)), name)


def check_fit(fit):
    """Refuse a fit that is not one of FITS."""
    if not isinstance(fit, str) or fit not in FITS:
        raise OnnxAttrError(f"unknown fit {fit!r}: choose one of {', '.join(FITS)}")


def _fit(image, size, fit):
    """Bring an RGB image to `size` = (H, W); an image already that size is used as is."""
    check_fit(fit)
    height, width = size
    if image.size == (width, height):
        return image
    if fit == "stretch":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    return _center_crop(image, height, width)


def _center_crop(image, height, width):
    """Caffe/ImageNet evaluation: shorter side to int(max(H, W) * 256 / 224), centred (H, W) crop.

    Resampling only the crop's source box gives the same pixels (up to rounding) as resizing
    the whole image then cropping, without building a huge intermediate for elongated images.
    """
    src_w, src_h = image.size
    short = int(max(height, width) * 256 / 224)
    if src_w <= src_h:
        new_w, new_h = short, int(short * src_h / src_w)
    else:
        new_w, new_h = int(short * src_w / src_h), short
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    sx, sy = src_w / new_w, src_h / new_h
    box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    return image.resize((width, height), Image.Resampling.BILINEAR, box=box)
