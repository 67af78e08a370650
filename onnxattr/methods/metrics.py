"""Faithfulness metrics: how well a map ranks what the model uses (docs/faithfulness.md).

`METRICS` is the table: a metric is its title, its function and its defaults (the function's
keyword-only options). A function `(subject, maps, **options)` measures every map of one image
and returns {map name: {quantity: Result}}; a quantity is a number with its curve where it has
one (`QUANTITIES`: which way is better). Every metric but max-sensitivity is forward passes
only, made `subject.chunk` images at a time (even chunks), so memory depends on the chunk size,
not on the steps or samples.

The ranking metrics rank pixels by the map the pictures show, the channel sum of |attribution|
at the model's input resolution, highest first, ties in raster order (a stable sort):

- deletion (Petsiuk et al. 2018): at step k of 0..steps the first round(k·H·W/steps) pixels
  (round half to even) are set to 0 in every channel (black in the model's pixel space);
- insertion: from the image blurred as integrated gradients' `blur` baseline, the same pixels
  are put back;
- pixel flipping (Samek et al. 2017): 8 x 8 patches ranked by their sum of the map, replaced
  by the image's per-channel mean, most relevant first (MoRF) and least relevant first (LeRF),
  at round(k·P/steps) patches; `flip_gap` = LeRF area - MoRF area;
- ROAD (Rong et al. 2022): at each of `percentages` (whole percents, their 10..90) the most
  relevant ⌊p·H·W/100⌋ pixels (MoRF), or all but the most relevant ⌊(100-p)·H·W/100⌋ (LeRF),
  are removed and imputed by noisy linear imputation (imputation.linear_impute, their
  neighbour weights, plus N(0, (noise · 255)^2) on each removed value, their 0.01 on 0..1
  images); `road_gap` = LeRF area - MoRF area.

The score is the softmax probability of the explained class and an area is the trapezoid mean
over the steps + 1 points (ROAD: over the percentages). Beside every method, the controls: a
uniform random map (from `seed`) and the method's map inverted (its ranking reversed, ties
still in raster order).

Infidelity and max-sensitivity follow Captum (captum.metrics): infidelity with perturbations
I ~ N(0, (noise · 255)^2) per pixel, x - I the perturbed image, E[(I·Φ - (f(x) - f(x - I)))^2]
over `samples` draws, with Captum's `normalize` (Φ rescaled by the best β) on by default; it is
Captum's `infidelity` with `perturb_func` returning (I, x - I). Max-sensitivity is Captum's
`sensitivity_max` with its default perturbation, uniform noise in ±radius, the radius given as
a share of the pixel range (0.02: Captum's default on 0..1 images): max over `samples` draws of
||Φ(x) - Φ(x + δ)||_F / ||Φ(x)||_F, the method rerun on each perturbed image.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import OnnxAttrError
from ..graph.prepare import PROB
from ..graph.runtime import even_chunks
from ..io.model import PIXEL_RANGE
from .imputation import linear_impute
from .integration import make_baselines

RANDOM = "random"
INVERTED = " (inverted)"  # after a method's name: its inverted control
DEFAULT_METRICS = ("deletion", "insertion")
# quantity -> whether higher is better
QUANTITIES = {"deletion_auc": False, "insertion_auc": True, "morf_auc": False, "lerf_auc": True,
              "flip_gap": True, "road_morf_auc": False, "road_lerf_auc": True, "road_gap": True,
              "infidelity": False, "max_sensitivity": False}


@dataclass(frozen=True)
class Result:
    value: float
    curve: np.ndarray = None  # float64 [steps + 1]: the score at each step, where there is one


@dataclass
class Map:
    """One map to measure: a method's attribution (C, H, W), or a control."""

    name: str
    attribution: np.ndarray
    inverted: bool = False  # rank by the reverse of the attribution's ranking

    def ranking(self):
        """float64 (H, W): higher ranks first."""
        ranked = np.abs(self.attribution.astype(np.float64)).sum(axis=0)
        return -ranked if self.inverted else ranked


@dataclass
class Subject:
    """One image and what the metrics need to run the model on it."""

    engine: object
    pixels: np.ndarray  # float32 (C, H, W)
    target: int
    chunk: int  # images per forward pass
    explain: Callable = None  # pixels [N, C, H, W] -> the method's attributions, or None
    progress: Callable = field(default=lambda share: None)  # the share of this metric done

    def scores(self, images):
        """The explained class's probability for images [N, C, H, W], float64 [N]."""
        return self.engine.target_scores(images.astype(np.float32, copy=False),
                                         np.full(len(images), self.target), PROB, self.chunk)


def area(curve):
    """Trapezoid mean of a curve over evenly spaced points on [0, 1]."""
    return spaced_area(curve, np.arange(len(curve)))


def positions(ranking):
    """Each cell's place in the order of `ranking` (highest first, ties in raster order)."""
    order = np.argsort(-ranking.ravel(), kind="stable")
    place = np.empty(order.size, np.int64)
    place[order] = np.arange(order.size)
    return place


def counts(units, steps):
    """Cells replaced at each step 0..steps: round(k · units / steps), half to even."""
    return np.rint(np.arange(steps + 1) * units / steps).astype(np.int64)


def replacement_curves(subject, start, fill, places, replaced):
    """Scores [M, K]: for ranking m (places [M, H·W], each pixel's place) and step k, the image
    whose pixels of place < replaced[k] come from `fill`, the others from `start` (both
    broadcast to (C, H, W))."""
    rows = len(places) * len(replaced)
    scores = np.empty(rows)
    shape = subject.pixels.shape
    for begin, end in even_chunks(rows, subject.chunk):
        which, step = np.divmod(np.arange(begin, end), len(replaced))
        mask = (places[which] < replaced[step][:, None]).reshape(-1, 1, *shape[1:])
        scores[begin:end] = subject.scores(np.where(mask, fill, start))
        subject.progress(end / rows)
    return scores.reshape(len(places), len(replaced))


def _ranking_curves(subject, maps, start, fill, steps, quantity):
    steps = _whole(steps, "steps", 1)
    places = np.stack([positions(m.ranking()) for m in maps])
    curves = replacement_curves(subject, start, fill, places, counts(places.shape[1], steps))
    return {m.name: {quantity: Result(area(c), c)} for m, c in zip(maps, curves)}


def deletion(subject, maps, *, steps=50):
    """Deletion: the ranked pixels set to black (0), step by step."""
    low = PIXEL_RANGE[0]
    return _ranking_curves(subject, maps, subject.pixels, np.float32(low), steps, "deletion_auc")


def insertion(subject, maps, *, steps=50):
    """Insertion: the ranked pixels put back into the blurred image, step by step."""
    blurred = make_baselines("blur", subject.pixels[None])[0]
    return _ranking_curves(subject, maps, blurred, subject.pixels, steps, "insertion_auc")


def patch_places(ranking, patch):
    """Each pixel's place (H·W) by its patch's sum of `ranking`, patches of `patch` x `patch`
    (the last row and column of patches cut at the edge), and the number of patches."""
    height, width = ranking.shape
    rows, cols = np.arange(height) // patch, np.arange(width) // patch
    sums = np.zeros((rows[-1] + 1, cols[-1] + 1))
    np.add.at(sums, (rows[:, None], cols[None, :]), ranking)
    return positions(sums).reshape(sums.shape)[rows[:, None], cols[None, :]].ravel(), sums.size


def pixel_flipping(subject, maps, *, steps=50, patch=8):
    """MoRF and LeRF pixel flipping in patches replaced by the image's per-channel mean."""
    steps, patch = _whole(steps, "steps", 1), _whole(patch, "patch", 1)
    mean = subject.pixels.mean(axis=(1, 2), keepdims=True)
    places, units = [], 0
    for m in maps:
        for sign in (1, -1):  # most relevant first, then least relevant first
            place, units = patch_places(sign * m.ranking(), patch)
            places.append(place)
    curves = replacement_curves(subject, subject.pixels, mean, np.stack(places),
                                counts(units, steps))
    results = {}
    for m, morf, lerf in zip(maps, curves[0::2], curves[1::2]):
        results[m.name] = {"morf_auc": Result(area(morf), morf), "lerf_auc": Result(area(lerf), lerf),
                           "flip_gap": Result(area(lerf) - area(morf))}
    return results


def road_masks(ranking, percentages):
    """ROAD's removed pixels, bool [2, len(percentages), H, W]: most relevant first (the first
    ⌊p·H·W/100⌋ ranked pixels) and least relevant first (all but the first ⌊(100-p)·H·W/100⌋)."""
    place = positions(ranking).reshape(ranking.shape)
    total = place.size
    morf = [place < total * p // 100 for p in percentages]
    lerf = [place >= total * (100 - p) // 100 for p in percentages]
    return np.array([morf, lerf])


def road(subject, maps, *, percentages=(10, 20, 30, 40, 50, 60, 70, 80, 90), noise=0.01, seed=0):
    """ROAD (Rong et al. 2022): the removed pixels imputed from their neighbours
    (imputation.linear_impute) plus Gaussian noise of std `noise` x the pixel range (their
    NoisyLinearImputer's 0.01 on 0..1 images), most and least relevant first at `percentages`
    (whole percents; their 10..90). Their LeRF indexes the same images by the share kept."""
    percentages = _percentages(percentages)
    sigma = (_fraction(noise, "noise") if noise != 0 else 0.0) * (PIXEL_RANGE[1] - PIXEL_RANGE[0])
    rng = np.random.default_rng([_whole(seed, "seed", 0), 5])
    masks = np.concatenate([road_masks(m.ranking(), percentages).reshape(-1, *m.ranking().shape)
                            for m in maps])
    scores = np.empty(len(masks))
    for begin, end in even_chunks(len(masks), subject.chunk):
        images = np.stack([linear_impute(subject.pixels, removed) for removed in masks[begin:end]])
        images += np.where(masks[begin:end, None], sigma * rng.standard_normal(images.shape), 0)
        scores[begin:end] = subject.scores(images)
        subject.progress(end / len(masks))
    results = {}
    for m, (morf, lerf) in zip(maps, scores.reshape(len(maps), 2, len(percentages))):
        morf_area, lerf_area = spaced_area(morf, percentages), spaced_area(lerf, percentages)
        results[m.name] = {"road_morf_auc": Result(morf_area, morf),
                           "road_lerf_auc": Result(lerf_area, lerf),
                           "road_gap": Result(lerf_area - morf_area)}
    return results


def spaced_area(curve, at):
    """Trapezoid mean of a curve sampled at the increasing points `at`."""
    curve, at = np.asarray(curve, np.float64), np.asarray(at, np.float64)
    return float(((curve[1:] + curve[:-1]) / 2 * np.diff(at)).sum() / (at[-1] - at[0]))


def infidelity_perturbations(shape, samples, noise, seed):
    """Infidelity's perturbations I, float64 [samples, *shape]: N(0, (noise · 255)^2)."""
    sigma = noise * (PIXEL_RANGE[1] - PIXEL_RANGE[0])
    return sigma * np.random.default_rng([seed, 2]).standard_normal((samples, *shape))


def infidelity(subject, maps, *, samples=10, noise=0.1, normalize=True, seed=0):
    """Captum's infidelity with Gaussian perturbations I and x - I the perturbed image."""
    samples = _whole(samples, "samples", 1)
    perturbations = infidelity_perturbations(subject.pixels.shape, samples,
                                             _fraction(noise, "noise"), _whole(seed, "seed", 0))
    drops = np.concatenate([subject.scores(subject.pixels - perturbations[a:b])
                            for a, b in even_chunks(samples, subject.chunk)])
    drops = subject.scores(subject.pixels[None])[0] - drops
    subject.progress(1.0)
    results = {}
    for m in maps:
        dots = np.tensordot(perturbations, m.attribution.astype(np.float64), axes=3)
        if normalize:
            square = (dots ** 2).sum()
            dots = dots * ((dots * drops).sum() / square if square else 1.0)
        results[m.name] = {"infidelity": Result(float(((dots - drops) ** 2).mean()))}
    return results


def sensitivity_perturbations(shape, samples, radius, seed):
    """Max-sensitivity's perturbations δ, float64 [samples, *shape]: uniform in ±radius · 255."""
    width = radius * (PIXEL_RANGE[1] - PIXEL_RANGE[0])
    return np.random.default_rng([seed, 3]).uniform(-width, width, (samples, *shape))


def max_sensitivity(subject, maps, *, samples=10, radius=0.02, seed=0):
    """Captum's sensitivity_max: the method rerun on uniformly perturbed images."""
    if subject.explain is None:
        raise OnnxAttrError("max-sensitivity reruns the method: give its name, not an "
                            "explanation")
    samples = _whole(samples, "samples", 1)
    deltas = sensitivity_perturbations(subject.pixels.shape, samples, _fraction(radius, "radius"),
                                       _whole(seed, "seed", 0))
    (own,) = maps
    reference = own.attribution.astype(np.float64)
    norm = np.linalg.norm(reference) or 1.0
    worst = 0.0
    for begin, end in even_chunks(samples, subject.chunk):
        perturbed = (subject.pixels + deltas[begin:end]).astype(np.float32)
        changed = subject.explain(perturbed).astype(np.float64) - reference
        worst = max(worst, float(np.linalg.norm(changed.reshape(end - begin, -1), axis=1).max()))
        subject.progress(end / samples)
    return {own.name: {"max_sensitivity": Result(float(worst / norm))}}


@dataclass(frozen=True)
class Metric:
    title: str
    measure: Callable  # (subject, maps, **options) -> {map name: {quantity: Result}}
    defaults: Mapping  # its options and their defaults
    controls: tuple = (RANDOM, INVERTED)  # the controls it measures beside the method


def _metric(title, measure, controls=(RANDOM, INVERTED)):
    defaults = measure.__kwdefaults__ or {}
    return Metric(title, measure, dict(defaults), controls)


METRICS = {
    "deletion": _metric("Deletion", deletion),
    "insertion": _metric("Insertion", insertion),
    "pixel-flipping": _metric("MoRF/LeRF pixel flipping", pixel_flipping),
    "road": _metric("ROAD (noisy linear imputation)", road),
    "infidelity": _metric("Infidelity", infidelity, (RANDOM,)),
    "max-sensitivity": _metric("Max-sensitivity", max_sensitivity, ()),
}


def parse_metrics(names):
    """The metric names of a list or a comma-separated text, checked."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(dict.fromkeys(names or []))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise OnnxAttrError(f"unknown metric {', '.join(map(repr, unknown)) or '(none given)'} "
                            f"(choose from {', '.join(METRICS)})")
    return names


def metric_options(names, options):
    """{metric: its options} from one flat dict of options; an option no metric takes fails."""
    options = dict(options or {})
    unknown = sorted(set(options) - {o for n in names for o in METRICS[n].defaults})
    if unknown:
        raise OnnxAttrError(f"no metric of {', '.join(names)} takes option "
                            f"{', '.join(unknown)}")
    return {n: {k: v for k, v in options.items() if k in METRICS[n].defaults} for n in names}


def control_maps(attribution, name, seed):
    """The random map (uniform, from `seed`) and `name`'s inverted map."""
    noise = np.random.default_rng([seed, 4]).uniform(size=attribution.shape).astype(np.float32)
    return {RANDOM: Map(RANDOM, noise), INVERTED: Map(name + INVERTED, attribution, True)}


def measure(subject, attribution, name, names, options=None, seed=0, progress=None):
    """{map name: {quantity: Result}} of the metrics `names` on one image's `attribution`
    (named `name`) and its controls; `options` as metric_options's."""
    chosen = metric_options(names, options)
    results = {}
    controls = control_maps(attribution, name, seed)
    for index, metric_name in enumerate(names):
        metric = METRICS[metric_name]
        maps = [Map(name, attribution), *(controls[c] for c in metric.controls)]
        if progress is not None:
            subject.progress = lambda share, i=index: progress((i + share) / len(names))
        for key, values in metric.measure(subject, maps, **chosen[metric_name]).items():
            results.setdefault(key, {}).update(values)
    return results


def _whole(value, name, least):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise OnnxAttrError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


def _fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not np.isfinite(value) or value <= 0:
        raise OnnxAttrError(f"{name} must be a number > 0 (a share of the pixel range), "
                            f"got {value!r}")
    return float(value)


def _percentages(values):
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if len(values) < 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or not 0 < v < 100 for v in values) \
            or any(b <= a for a, b in zip(values, values[1:])):
        raise OnnxAttrError("percentages must be two or more increasing whole percents "
                            f"between 0 and 100, got {values!r}")
    return values
