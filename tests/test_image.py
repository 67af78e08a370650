"""onnxattr.io.image: each bad input is one OnnxAttrError line; odd modes give the expected RGB."""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from onnxattr.errors import OnnxAttrError
from onnxattr.io import image as image_module
from onnxattr.io.image import MAX_PIXELS, display_image, load_image, load_pixels, to_pixels


def expect_error(source, *words):
    """load_image(source) raises exactly OnnxAttrError, one line, containing every word."""
    with pytest.raises(OnnxAttrError) as info:
        load_image(source)
    assert type(info.value) is OnnxAttrError
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def rgb_at(source, xy=(0, 0)):
    image = load_image(source)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def close(actual, expected, tol):
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def png_header_only(path, width, height):
    """A PNG file whose header claims width x height but holds no pixel data."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def noise_file(path, fmt):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, fmt)
    return path


def columns_encode_x(width, height):
    """RGB image whose pixel value at column x is x (width <= 256)."""
    row = np.arange(width, dtype=np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[:, :, None], 3, axis=2))


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    expect_error(path, str(path), "not found")
    expect_error(str(path), str(path), "not found")


@pytest.mark.parametrize("target", ["loop.png", "gone.png"])
def test_unresolvable_symlink_is_not_a_missing_file(tmp_path, target):
    path = tmp_path / "loop.png"
    path.symlink_to(tmp_path / target)
    expect_error(path, str(path), "symlink cannot be resolved (a loop, or its target is missing)")


def test_directory(tmp_path):
    expect_error(tmp_path, str(tmp_path), "directory")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = noise_file(tmp_path / "locked.png", "PNG")
    path.chmod(0)
    try:
        expect_error(path, str(path), "cannot read", "ermission")
    finally:
        path.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    path = noise_file(tmp_path / "locked.png", "PNG")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    expect_error(path, str(path), "cannot read", "Permission denied")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    expect_error(path, str(path), "empty")


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 20)
    expect_error(path, str(path), "not an image")


def test_eps_is_refused(tmp_path):
    path = tmp_path / "figure.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    expect_error(path, str(path), "not an image")


def test_corrupt_png(tmp_path):
    path = noise_file(tmp_path / "corrupt.png", "PNG")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(50)  # scramble the compressed pixels
    path.write_bytes(bytes(data))
    expect_error(path, str(path), "corrupt")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    path = noise_file(tmp_path / f"cut.{fmt.lower()}", fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(path, str(path), "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_pil_image_is_reported_too(tmp_path):
    path = noise_file(tmp_path / "cut.jpg", "JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with Image.open(path) as lazy:  # opens (header intact), decodes lazily
        expect_error(lazy, "PIL image", "truncated")


# ---------------------------------------------------------------- size limits


def test_over_our_limit_refused_before_decoding(tmp_path):
    # 81 MP: over our limit, under Pillow's threshold, so ours answers
    path = png_header_only(tmp_path / "big.png", 9000, 9000)
    expect_error(path, str(path), "too large", "9000 x 9000", "81.0 megapixels", "limit 80")


@pytest.mark.parametrize("side", [10000, 12000])
def test_pillow_bomb_warning_zone_gets_our_message(tmp_path, side):
    """Past Image.MAX_IMAGE_PIXELS (89.5 MP): our limit and numbers, not Pillow's words."""
    path = png_header_only(tmp_path / "bigger.png", side, side)
    expect_error(path, str(path), "too large", f"{side} x {side}", "limit 80 megapixels")


def test_pillow_bomb_error(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 60000, 60000)
    expect_error(path, str(path), "too large", "60000 x 60000 pixels = 3600.0 megapixels")


def test_bomb_warning_from_lowered_pillow_limit(tmp_path, monkeypatch):
    path = noise_file(tmp_path / "small.png", "PNG")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # warning zone: limit < size < 2 * limit
    expect_error(path, str(path), "too large")


def test_limit_applies_to_every_source(tmp_path, monkeypatch):
    path = noise_file(tmp_path / "photo.png", "PNG")
    monkeypatch.setattr(image_module, "MAX_PIXELS", 1000)
    expect_error(path, "64 x 64")
    expect_error(np.zeros((64, 64, 3), np.uint8), "image array", "64 x 64")
    expect_error(Image.new("RGB", (64, 64)), "PIL image", "64 x 64")


def test_limit_is_below_pillows_own():
    assert MAX_PIXELS < Image.MAX_IMAGE_PIXELS


# ---------------------------------------------------------------- arrays and other sources


def test_array_rgb_gray_rgba():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1, 2] = (10, 20, 30)
    assert rgb_at(rgb, (2, 1)) == (10, 20, 30)
    assert load_image(rgb).size == (5, 4)
    assert rgb_at(np.full((4, 5), 77, np.uint8)) == (77, 77, 77)
    assert close(rgb_at(np.full((4, 5, 4), (255, 0, 0, 128), np.uint8)), (255, 128, 128), 1)


def test_array_non_contiguous():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, 1::2] = (200, 100, 50)
    assert np.array_equal(np.asarray(load_image(rgb[:, 1::2])), rgb[:, 1::2])


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((4, 5, 3), np.float32), ("uint8", "float32")),
        (np.zeros((4, 5, 3), np.uint16), ("uint8", "uint16")),
        (np.zeros((4, 5, 2), np.uint8), ("shape", "(4, 5, 2)")),
        (np.zeros((2, 4, 5, 3), np.uint8), ("shape",)),
        (np.zeros(7, np.uint8), ("shape",)),
        (np.zeros((0, 5, 3), np.uint8), ("no pixels",)),
    ],
)
def test_bad_arrays(array, words):
    expect_error(array, "image array", *words)


def test_unsupported_source_type():
    expect_error([[0, 0, 0]], "list")
    expect_error(b"photo.jpg", "bytes")


def test_pil_image_is_copied_not_modified():
    original = Image.new("RGB", (3, 3), (1, 2, 3))
    loaded = load_image(original)
    assert loaded is not original and loaded.getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------- modes


def test_grayscale_replicated(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (3, 3), 123).save(path)
    assert rgb_at(path) == (123, 123, 123)


def test_gray_alpha_on_white(tmp_path):
    path = tmp_path / "la.png"
    image = Image.new("LA", (2, 1), (100, 255))
    image.putpixel((1, 0), (100, 0))
    image.save(path)
    assert rgb_at(path, (0, 0)) == (100, 100, 100)
    assert rgb_at(path, (1, 0)) == (255, 255, 255)


def test_one_bit(tmp_path):
    path = tmp_path / "bits.png"
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    image.save(path)
    assert Image.open(path).mode == "1"
    assert rgb_at(path, (0, 0)) == (0, 0, 0)
    assert rgb_at(path, (1, 0)) == (255, 255, 255)


def palette_image(transparent_index=None):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([200, 10, 20, 0, 90, 180] + [0] * 762)
    image.putpixel((1, 0), 1)
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


@pytest.mark.parametrize("fmt", ["png", "gif", "bmp"])
def test_palette_colours(tmp_path, fmt):
    path = tmp_path / f"palette.{fmt}"
    palette_image().save(path)
    assert Image.open(path).mode == "P"
    assert rgb_at(path, (0, 0)) == (200, 10, 20)
    assert rgb_at(path, (1, 0)) == (0, 90, 180)


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_transparency_on_white(tmp_path, fmt):
    path = tmp_path / f"palette_t.{fmt}"
    palette_image(transparent_index=1).save(path, transparency=1)
    assert rgb_at(path, (0, 0)) == (200, 10, 20)
    assert rgb_at(path, (1, 0)) == (255, 255, 255)


def test_rgba_half_transparent_red_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (2, 2), (255, 0, 0, 128)).save(path)
    assert close(rgb_at(path), (255, 128, 128), 1)


def test_rgb_with_transparent_colour_key(tmp_path):
    path = tmp_path / "key.png"
    image = Image.new("RGB", (2, 1), (10, 20, 30))
    image.putpixel((1, 0), (1, 2, 3))
    image.save(path, transparency=(1, 2, 3))
    assert rgb_at(path, (0, 0)) == (10, 20, 30)
    assert rgb_at(path, (1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_sixteen_bit_scaled_not_clipped(tmp_path, fmt):
    path = tmp_path / f"deep.{fmt}"
    Image.fromarray(np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 4]
    assert image.getpixel((2, 0)) == (255, 255, 255)


def test_mode_i_sixteen_bit_values():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert image.mode == "I"
    assert [load_image(image).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_mode_i_wider_than_sixteen_bits_uses_its_range(tmp_path):
    path = tmp_path / "wide.tiff"
    Image.fromarray(np.array([[-1000000, 0, 1000000]], dtype=np.int32)).save(path)
    image = load_image(path)
    assert close([image.getpixel((x, 0))[0] for x in range(3)], [0, 128, 255], 1)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1
        ([0.0, 100.0, 255.0], [0, 100, 255]),  # 0..255
        ([-2.0, 0.0, 2.0], [0, 128, 255]),  # anything else: its own range
        ([0.0, float("nan"), 1.0], [0, 0, 255]),
    ],
)
def test_float_images(tmp_path, values, expected):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.array([values], dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    image = load_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize(("fmt", "tol"), [("tiff", 0), ("jpg", 12)])
def test_cmyk_cyan(tmp_path, fmt, tol):
    path = tmp_path / f"cyan.{fmt}"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path)
    assert Image.open(path).mode == "CMYK"
    assert close(rgb_at(path, (8, 8)), (0, 255, 255), tol)


def test_ycbcr(tmp_path):
    path = tmp_path / "ycc.tiff"
    Image.new("RGB", (4, 4), (200, 30, 60)).convert("YCbCr").save(path)
    assert Image.open(path).mode == "YCbCr"
    assert close(rgb_at(path), (200, 30, 60), 3)


def test_lab(tmp_path):
    path = tmp_path / "lab.tiff"
    Image.new("RGB", (4, 4), (200, 30, 60)).convert("LAB").save(path)
    assert Image.open(path).mode == "LAB"
    assert close(rgb_at(path), (200, 30, 60), 4)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_exif_orientation_applied(tmp_path, fmt):
    path = tmp_path / f"rotated.{fmt}"
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (10, 20)
    assert loaded.getpixel((9, 0)) == (255, 0, 0)
    assert loaded.getpixel((0, 0)) == (0, 0, 255)


def test_animated_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    frames = [Image.new("RGB", (4, 4), colour) for colour in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    assert rgb_at(path) == (255, 0, 0)


def test_multi_frame_tiff_first_frame(tmp_path):
    path = tmp_path / "pages.tiff"
    pages = [Image.new("RGB", (4, 4), (10, 20, 30)), Image.new("L", (8, 8), 200)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert Image.open(path).n_frames == 2
    assert load_image(path).size == (4, 4)
    assert rgb_at(path) == (10, 20, 30)


def test_loaded_image_independent_of_closed_file(tmp_path):
    path = noise_file(tmp_path / "photo.png", "PNG")
    image = load_image(path)
    path.unlink()
    assert np.asarray(image).shape == (64, 64, 3)


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("fit", ["stretch", "center-crop"])
def test_same_size_is_used_as_is(fit):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    pixels = to_pixels(Image.fromarray(array), (7, 9), fit)
    assert pixels.dtype == np.float32 and pixels.shape == (3, 7, 9)
    assert np.array_equal(pixels, array.transpose(2, 0, 1).astype(np.float32))
    assert np.array_equal(display_image(array, (7, 9), fit), array)


def test_stretch_geometry():
    pixels = to_pixels(columns_encode_x(201, 40), (30, 51), "stretch")
    assert pixels.shape == (3, 30, 51) and pixels.dtype == np.float32
    assert pixels.flags.c_contiguous
    assert np.array_equal(pixels[0], pixels[2])
    assert abs(pixels[0, 15, 25] - 100) <= 1  # centre column: centre of the source
    assert pixels[0, :, 0].max() < 5 and pixels[0, :, -1].min() > 195  # the whole width is kept
    assert np.all(np.diff(pixels[0, 0]) > 0)


def test_center_crop_geometry_landscape():
    # 200 x 100 -> shorter side int(50 * 256 / 224) = 57 -> 114 x 57 -> centred 50 x 50 crop.
    pixels = to_pixels(columns_encode_x(200, 100), (50, 50), "center-crop")
    assert pixels.shape == (3, 50, 50)
    assert abs(pixels[0, 25, 24:26].mean() - 99.5) <= 1
    scale = 200 / 114
    assert abs(pixels[0, 25, 0] - ((32 + 0.5) * scale - 0.5)) <= 1
    assert abs(pixels[0, 25, -1] - ((81 + 0.5) * scale - 0.5)) <= 1


def test_center_crop_geometry_portrait():
    # 60 wide, 200 tall, value = y
    rows = columns_encode_x(200, 60).transpose(Image.Transpose.TRANSPOSE)
    pixels = to_pixels(rows, (50, 50), "center-crop")
    assert abs(pixels[0, 24:26, 25].mean() - 99.5) <= 1
    assert np.all(np.diff(pixels[0, :, 25]) > 0)


def test_center_crop_matches_resize_then_crop():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (333, 500, 3), dtype=np.uint8))
    scaled = image.resize((int(256 * 500 / 333), 256), Image.Resampling.BILINEAR)
    left, top = round((scaled.width - 224) / 2), round((scaled.height - 224) / 2)
    expected = np.asarray(scaled.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    actual = display_image(image, (224, 224), "center-crop").astype(np.float32)
    assert np.abs(actual - expected).max() <= 1


def test_center_crop_non_square_target():
    pixels = to_pixels(columns_encode_x(200, 100), (40, 60), "center-crop")
    assert pixels.shape == (3, 40, 60)


def test_center_crop_of_a_very_long_strip_stays_small():
    strip = Image.new("RGB", (20000, 2), (9, 9, 9))  # resizing the whole strip would need 650 MP
    assert np.all(to_pixels(strip, (224, 224), "center-crop") == 9)


def test_unknown_fit():
    with pytest.raises(OnnxAttrError, match="unknown fit 'squash'"):
        to_pixels(Image.new("RGB", (4, 4)), (4, 4), "squash")


def test_load_pixels_and_display_image_agree(tmp_path):
    path = noise_file(tmp_path / "photo.png", "PNG")
    for fit in ("stretch", "center-crop"):
        pixels = load_pixels(path, (20, 30), fit)
        shown = display_image(path, (20, 30), fit)
        assert shown.dtype == np.uint8 and shown.shape == (20, 30, 3) and shown.flags.writeable
        assert np.array_equal(pixels, shown.transpose(2, 0, 1).astype(np.float32))
        assert np.array_equal(pixels, to_pixels(load_image(path), (20, 30), fit))


def test_bad_file_through_load_pixels(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(io.BytesIO(b"junk" * 10).getvalue())
    with pytest.raises(OnnxAttrError, match="not an image"):
        load_pixels(path, (8, 8))


def test_a_uri_is_read_through_pyarrow(tmp_path):
    """s3://, gs://, file://... (io/remote.py): the same image as the path; what cannot be read
    is one line naming the URI."""
    pytest.importorskip("pyarrow")
    path = tmp_path / "photo.png"
    Image.new("RGB", (5, 4), (10, 20, 30)).save(path)
    assert np.array_equal(np.asarray(load_image(path.as_uri())), np.asarray(load_image(path)))
    for uri, problem in ((tmp_path.as_uri() + "/missing.png", "not found"),
                         (tmp_path.as_uri(), "is not a file"),
                         ("nosuch://bucket/a.png", "cannot read")):
        with pytest.raises(OnnxAttrError, match=problem) as err:
            load_image(uri)
        assert str(err.value).startswith(uri) and "\n" not in str(err.value)
