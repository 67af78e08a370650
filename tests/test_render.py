"""Tests for onnxattr.io.render: numbers checked by hand on tiny arrays, and figures as real PNGs."""

import numpy as np
import pytest
from PIL import Image

from onnxattr.errors import OnnxAttrError
from onnxattr.io import render
from onnxattr.io.render import attribution_map, colorize, styled


def one_channel(values):
    """A (3, 1, N) attribution with `values` in channel 0 and zeros elsewhere (so every
    sign/reduction combination other than the channel handling is easy to predict)."""
    values = np.asarray(values, dtype=np.float32)
    a = np.zeros((3, 1, values.size), dtype=np.float32)
    a[0, 0] = values
    return a


# One pixel, channels (1, -3, 2), plus a zero pixel so min-max has a floor at 0.
PIXEL = np.array([[[1.0, 0.0]], [[-3.0, 0.0]], [[2.0, 0.0]]], dtype=np.float32)


# --- sign and reduction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sign, reduction, raw",
    [
        ("absolute", "sum", 6.0),  # 1 + 3 + 2
        ("positive", "sum", 3.0),  # 1 + 0 + 2
        ("negative", "sum", 3.0),  # 0 + 3 + 0
        ("all", "sum", 0.0),  # 1 - 3 + 2
        ("absolute", "max-abs", 3.0),
        ("positive", "max-abs", 2.0),
        ("negative", "max-abs", 3.0),
        ("all", "max-abs", -3.0),  # the sign of the largest-magnitude channel is kept
    ],
)
def test_sign_and_reduction(sign, reduction, raw):
    # a third pixel (1, 1, 1) keeps the map from being constant for every combination
    a = np.concatenate([PIXEL, np.ones((3, 1, 1), dtype=np.float32)], axis=2)
    m = attribution_map(a, reduction=reduction, sign=sign)
    third = 0.0 if sign == "negative" else {"sum": 3.0, "max-abs": 1.0}[reduction]
    raw_map = np.array([raw, 0.0, third])
    if sign == "all":
        expected = raw_map / np.abs(raw_map).max()
    else:
        expected = (raw_map - raw_map.min()) / (raw_map.max() - raw_map.min())
    assert m.dtype == np.float32 and m.shape == (1, 3)
    np.testing.assert_allclose(m[0], expected, atol=1e-6)


def test_absolute_rescale_is_min_max_not_divide_by_max():
    m = attribution_map(one_channel([2.0, 4.0, 6.0]))
    np.testing.assert_allclose(m[0], [0.0, 0.5, 1.0], atol=1e-6)


def test_signed_map_divides_by_max_magnitude():
    m = attribution_map(one_channel([-2.0, 1.0, 4.0]), sign="all")
    np.testing.assert_allclose(m[0], [-0.5, 0.25, 1.0], atol=1e-6)


def test_negative_sign_keeps_only_negative_evidence():
    m = attribution_map(one_channel([-4.0, -2.0, 0.0, 5.0]), sign="negative")
    np.testing.assert_allclose(m[0], [1.0, 0.5, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("sign", list(render.SIGNS))
@pytest.mark.parametrize("value", [0.0, 7.5, -2.0])
@pytest.mark.parametrize("clip", list(render.CLIPS))
def test_constant_map_becomes_zeros(sign, value, clip):
    a = np.full((3, 4, 5), value, dtype=np.float32)
    m = attribution_map(a, sign=sign, clip=clip)
    assert m.shape == (4, 5) and not np.isnan(m).any()
    # min-max sends any constant to 0; the signed map (divide by max |m|) keeps a nonzero constant's sign
    expected = np.sign(value) if sign == "all" else 0.0
    np.testing.assert_array_equal(m, np.full((4, 5), expected, dtype=np.float32))


# --- clipping ------------------------------------------------------------------------------------


def test_percentile_clip_hand_computed():
    # 50th percentile of 0..4 is 2: map becomes 0,1,2,2,2, then min-max by 2.
    m = attribution_map(one_channel([0, 1, 2, 3, 4]), clip="percentile", clip_value=50)
    np.testing.assert_allclose(m[0], [0.0, 0.5, 1.0, 1.0, 1.0], atol=1e-6)


def test_percentile_clip_default_is_99():
    # 99th percentile of 0..100 is 99 (linear interpolation): only the 100 is clipped.
    m = attribution_map(one_channel(np.arange(101)), clip="percentile")
    expected = np.minimum(np.arange(101), 99) / 99
    np.testing.assert_allclose(m[0], expected, atol=1e-6)


def test_percentile_clip_interpolates():
    # 90th percentile of (0, 10) is 9.
    m = attribution_map(one_channel([0.0, 10.0]), clip="percentile", clip_value=90)
    np.testing.assert_allclose(m[0], [0.0, 1.0], atol=1e-6)
    assert render._percentile_threshold(np.array([0.0, 10.0]), 90) == pytest.approx(9.0)


@pytest.mark.parametrize(
    "p, threshold",
    [
        # values 1,2,3,4 (total 10); ascending running sums 1,3,6,10
        (40, 3.0),  # first running sum >= 6   -> at value 3
        (45, 3.0),  # first running sum >= 5.5 -> at value 3
        (30, 4.0),  # first running sum >= 7   -> at value 4: nothing clipped
        (0, 4.0),  # >= 10: the maximum
        (95, 1.0),  # >= 0.5: the smallest value
    ],
)
def test_outlier_mass_threshold_hand_computed(p, threshold):
    assert render._outlier_mass_threshold(np.array([4.0, 1.0, 3.0, 2.0]), p) == threshold


def test_outlier_mass_clip_in_map():
    # eight 1s, a 2 and a 10 (total 20). With p = 50 the target is 10: running sums
    # 1..8, 10 -> threshold 2, so the 10 is clipped to 2; min-max then maps 1 -> 0, 2 -> 1.
    values = [1] * 8 + [2, 10]
    m = attribution_map(one_channel(values), clip="outlier-mass", clip_value=50)
    np.testing.assert_allclose(m[0], [0.0] * 8 + [1.0, 1.0], atol=1e-6)
    # the default (2%) keeps the 10: target 19.6 is first reached at the 10 itself
    m = attribution_map(one_channel(values), clip="outlier-mass")
    np.testing.assert_allclose(m[0], (np.array(values) - 1) / 9, atol=1e-6)


def test_outlier_mass_all_zero_threshold():
    assert render._outlier_mass_threshold(np.zeros(5), 2) == 0.0


def test_signed_clipping_is_symmetric():
    # |map| = 4,1,2,3: 50th percentile is 2.5 -> clip to [-2.5, 2.5] and divide by 2.5
    m = attribution_map(one_channel([-4.0, 1.0, 2.0, 3.0]), sign="all", clip="percentile", clip_value=50)
    np.testing.assert_allclose(m[0], [-1.0, 0.4, 0.8, 1.0], atol=1e-6)


def test_clip_value_ignored_for_none():
    m = attribution_map(one_channel([0.0, 1.0, 10.0]), clip="none", clip_value=50)
    np.testing.assert_allclose(m[0], [0.0, 0.1, 1.0], atol=1e-6)


# --- option validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"sign": "abs"}, ["sign", "'absolute'", "'positive'", "'negative'", "'all'"]),
        ({"reduction": "mean"}, ["reduction", "'sum'", "'max-abs'"]),
        ({"reduction": ["sum"]}, ["reduction", "'sum'", "'max-abs'"]),
        ({"clip": "top"}, ["clip", "'none'", "'percentile'", "'outlier-mass'"]),
        ({"clip": "percentile", "clip_value": 0}, ["(0, 100]"]),
        ({"clip": "percentile", "clip_value": 101}, ["(0, 100]"]),
        ({"clip": "outlier-mass", "clip_value": 100}, ["[0, 100)"]),
        ({"clip": "outlier-mass", "clip_value": "2"}, ["[0, 100)"]),
    ],
)
def test_bad_map_options(kwargs, words):
    with pytest.raises(OnnxAttrError) as err:
        attribution_map(one_channel([1.0, 2.0]), **kwargs)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4)), np.array([[[np.nan]]]), np.array([[[np.inf]]]), np.zeros((3, 0, 2)),
            np.ones((3, 2, 2), complex)]
)
def test_bad_attribution_arrays(bad):
    with pytest.raises(OnnxAttrError):
        attribution_map(bad)


# --- colormaps -----------------------------------------------------------------------------------


def test_white_black_endpoints_and_levels():
    ramp = np.linspace(0.0, 1.0, 10_000)[None]
    rgb = colorize(ramp)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 10_000, 3)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, -1]) == (0, 0, 0)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # gray
    levels = np.unique(rgb[0, :, 0])
    assert levels.size == 255
    assert (np.diff(rgb[0, :, 0].astype(int)) <= 0).all()  # monotone white -> black


def test_signed_map_defaults_to_diverging_with_white_zero():
    rgb = colorize(np.array([[-1.0, 0.0, 1.0]]))
    assert tuple(rgb[0, 1]) == (255, 255, 255)
    assert tuple(rgb[0, 0]) == (0, 0, 255)
    assert tuple(rgb[0, 2]) == (255, 0, 0)
    # an explicitly signed map without negatives still puts 0 at white
    assert tuple(colorize(np.zeros((1, 1)), signed=True)[0, 0]) == (255, 255, 255)


def test_matplotlib_colormap_by_name():
    rgb = colorize(np.array([[0.0, 1.0]]), cmap="gray")
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, 1]) == (255, 255, 255)


def test_unknown_colormap():
    with pytest.raises(OnnxAttrError, match="unknown colormap 'nope'.*matplotlib.colormaps"):
        colorize(np.zeros((2, 2)), cmap="nope")


# --- styles --------------------------------------------------------------------------------------


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)


@pytest.fixture
def unit_map():
    return np.linspace(0.0, 1.0, 20, dtype=np.float32).reshape(4, 5)


def test_style_map_is_colorize(unit_map):
    np.testing.assert_array_equal(styled(unit_map), colorize(unit_map))


def test_overlay_alpha_endpoints(photo, unit_map):
    gray = np.rint(photo.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    out0 = styled(unit_map, photo, "overlay", alpha=0.0)
    np.testing.assert_array_equal(out0, np.repeat(gray[..., None], 3, axis=2))
    out1 = styled(unit_map, photo, "overlay", alpha=1.0, cmap="viridis")
    np.testing.assert_array_equal(out1, colorize(unit_map, "viridis"))


def test_overlay_half_blend(photo):
    white_photo = np.full((1, 2, 3), 255, dtype=np.uint8)
    out = styled(np.array([[0.0, 1.0]]), white_photo, "overlay", alpha=0.5)
    # white heat over white -> white; black heat over white -> mid gray (127.5 rounds to 128)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (128, 128, 128)


def test_masked_is_photo_times_map(photo, unit_map):
    out = styled(unit_map, photo, "masked")
    expected = np.rint(photo * unit_map[..., None].astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_masked_signed_uses_positive_part():
    photo = np.full((1, 3, 3), 200, dtype=np.uint8)
    out = styled(np.array([[-1.0, 0.5, 1.0]]), photo, "masked")
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 200])


@pytest.mark.parametrize("style", ["overlay", "masked"])
def test_style_needs_photo(style, unit_map):
    with pytest.raises(OnnxAttrError, match="needs the photo"):
        styled(unit_map, None, style)


def test_bad_style_and_inputs(photo, unit_map):
    with pytest.raises(OnnxAttrError, match="'map', 'overlay', 'masked'"):
        styled(unit_map, photo, "blend")
    with pytest.raises(OnnxAttrError, match="alpha"):
        styled(unit_map, photo, "overlay", alpha=1.5)
    with pytest.raises(OnnxAttrError, match="5x4"):
        styled(unit_map, photo[:3], "overlay")
    with pytest.raises(OnnxAttrError, match="uint8"):
        styled(unit_map, photo.astype(np.float32), "masked")


# --- figures -------------------------------------------------------------------------------------


def blob(size=64, center=(0.4, 0.6), width=0.15):
    y, x = np.mgrid[0:size, 0:size] / size
    return np.exp(-((x - center[1]) ** 2 + (y - center[0]) ** 2) / (2 * width**2)).astype(np.float32)


def check_png(path):
    """`path` is a real, non-empty PNG and nothing else is left in its directory."""
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 0 and im.size[1] > 0
        im.load()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_save_photo_figure(tmp_path, photo):
    path = tmp_path / "photo.png"
    render.save_photo_figure(path, photo, "golden retriever (0.93)")
    check_png(path)


@pytest.mark.parametrize("colorbar", [True, False])
def test_save_map_figure(tmp_path, colorbar):
    path = tmp_path / "map.png"
    render.save_map_figure(path, colorize(blob()), "Gradient Attribution Map (golden retriever)", colorbar)
    check_png(path)


def test_save_map_figure_signed_colorbar(tmp_path):
    path = tmp_path / "signed.png"
    signed_map = blob() - blob(center=(0.7, 0.2))
    render.save_map_figure(path, colorize(signed_map), "Signed", signed=True)
    check_png(path)


def test_save_tile_figure(tmp_path, photo):
    path = tmp_path / "tiles.png"
    steps = [np.rint(photo * t).astype(np.uint8) for t in np.linspace(0, 1, 7)]
    render.save_tile_figure(path, steps, "Images Along Integration Path",
                            labels=[f"{t:.2f}" for t in range(7)])
    check_png(path)
    path2 = tmp_path / "sub" / "tiles.png"
    render.save_tile_figure(path2, steps, "Images Along Integration Path", columns=3)
    check_png(path2)


def test_save_tile_figure_bad_input(tmp_path, photo):
    with pytest.raises(OnnxAttrError):
        render.save_tile_figure(tmp_path / "t.png", [], "x")
    with pytest.raises(OnnxAttrError, match="columns"):
        render.save_tile_figure(tmp_path / "t.png", [photo], "x", columns=0)
    assert list(tmp_path.iterdir()) == []


def test_save_panel(tmp_path, photo):
    path = tmp_path / "panel.png"
    heat = colorize(blob(8)[2:6, 1:6])
    maps = [("Gradient Attribution Map (golden retriever)", heat), ("Guided Backpropagation", heat)]
    render.save_panel(path, photo, "golden retriever (0.93)", maps)
    check_png(path)
    with Image.open(path) as im:
        assert im.size[0] > im.size[1]  # side by side


def test_failed_write_leaves_nothing(tmp_path, photo, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render.Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        render.save_photo_figure(tmp_path / "photo.png", photo, "title")
    assert list(tmp_path.iterdir()) == []
