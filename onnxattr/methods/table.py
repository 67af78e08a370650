"""Attribution methods: numpy around the engine's forward passes and gradients.

`METHODS` is the single source of a method's identity: its figure title, its function
`(engine, pixels, targets, score, batch_size, *, <its options>) -> (attribution, extras)` where
`attribution` is float32 [N, C, H, W] and `extras` is a list of per-image dicts of numbers
(e.g. a completeness delta; a layer method adds its layer's name and its map before
upsampling), for a method that is one gradient with a ReLU backward rule, that rule (such
methods can be compiled, onnxattr.methods.compile), and how its pictures are drawn unless the user
says otherwise (`render`: RenderOptions fields, e.g. Grad-CAM as an overlay). The
gradient-like methods come from the ReLU rule table itself (relu_rules.RELU_RULES, read live:
a new rule is a new method with nothing else to touch); the others are one function and one
entry of `OTHER_METHODS`; their keyword-only parameters are their options. A method that can
say how far it is (occlusion: hundreds of forward passes; integrated gradients: its path
images' chunks) also takes `progress`, a callable
of the share of its work done; that is not an option. The CLI's and compile's choices derive
from here.

A method whose result is one map per image (Grad-CAM, occlusion) returns it as the map / C in
every channel, so the channel sum the pictures are drawn from is the map itself.

`Method.compute` runs a method as it is, or averaged over noisy copies of the images
(`smooth=`, see `SMOOTHINGS`) for every method alike:

- SmoothGrad (Smilkov et al. 2017): the mean of the attributions of `samples` copies
  I + N(0, sigma^2), sigma = `noise` * (max - min of the image's pixels; the model's pixel
  range for a flat image);
- SmoothGrad² ("smoothgrad-squared"): the mean of their squares;
- VarGrad (Adebayo et al. 2018): their variance (population, 1/samples).

Noisy copies, like integrated gradients' path images, are made `batch_size` at a time (`CHUNK`
when batch_size is None), so memory depends on batch_size, not on `samples` or `steps`.
"""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import OnnxAttrError
from ..graph.relu_rules import GUIDED, RELU_RULES, VANILLA
from ..graph.runtime import even_chunks
from ..io.model import PIXEL_RANGE
from .cam import grad_cam_maps, upsample
from .integration import DEFAULT_RULE, DEFAULT_STEPS, integration_rule, make_baselines, path_chunks
from .occlusion import coverage, mask_positions, mask_values, masked_chunks, occlusion_geometry

PROGRESS = "progress"  # the keyword of a method that reports its progress (not an option)

CHUNK = 16  # images per gradient run for path images and noisy copies when batch_size is None
# (GoogLeNet on 2 cores: the same speed per image as 32 or 50, 0.6x the memory of 32)
COMPLETENESS_TOLERANCE = 0.05  # relative convergence delta above which more steps are advised
RELATIVE_FLOOR = 1e-6  # |S(I) - S(I0)| below this share of the scores has no relative delta
DEFAULT_SAMPLES = 25
DEFAULT_NOISE = 0.15
SMOOTH_OPTIONS = ("smooth", "samples", "noise", "seed")


@dataclass(frozen=True)
class Smoothing:
    prefix: str  # before the method's title: "SmoothGrad Guided Backpropagation"
    combine: Callable  # (mean, variance) of the noisy attributions -> attribution


SMOOTHINGS = {
    "smoothgrad": Smoothing("SmoothGrad", lambda mean, variance: mean),
    "smoothgrad-squared": Smoothing("SmoothGrad²", lambda mean, variance: variance + mean ** 2),
    "vargrad": Smoothing("VarGrad", lambda mean, variance: variance),
}


@dataclass(frozen=True)
class Method:
    title: str  # figure title, "<title> (<class>)"
    attribute: Callable  # the method itself, see the module docstring
    relu_rule: str = None  # the ReLU backward rule, when the method is one such gradient
    render: Mapping = None  # its default RenderOptions fields, where the user gives none
    uses: str = None  # a modified ReLU rule the method needs besides (guided Grad-CAM)

    @property
    def modified_rule(self):
        """The modified ReLU rule the method's gradients need (None: the plain gradient)."""
        rule = self.uses or self.relu_rule
        return None if rule in (None, VANILLA) else rule

    @property
    def own_options(self):
        """The options of the method itself: the keyword-only parameters of `attribute`."""
        return tuple(name for name, p in inspect.signature(self.attribute).parameters.items()
                     if p.kind is p.KEYWORD_ONLY and name != PROGRESS)

    @property
    def reports_progress(self):
        return PROGRESS in inspect.signature(self.attribute).parameters

    @property
    def options(self):
        """Every option `compute` takes for this method: its own and the smoothing ones."""
        return tuple(dict.fromkeys([*self.own_options, *SMOOTH_OPTIONS]))

    def title_for(self, smooth=None):
        """The title with the smoothing's prefix, e.g. "SmoothGrad Gradient Attribution Map"."""
        return self.title if smooth is None else f"{_smoothing(smooth).prefix} {self.title}"

    def compute(self, engine, pixels, targets, score, batch_size, smooth=None, samples=None,
                noise=None, seed=None, progress=None, **options):
        """(attribution, extras) of the method, smoothed when `smooth` names a SMOOTHINGS entry.
        `progress(share done)` is called as the method advances, if it reports progress
        (unsmoothed)."""
        unknown = sorted(set(options) - set(self.own_options))
        if seed is not None and smooth is None and "seed" not in self.own_options:
            unknown.append("seed (it needs smooth=...)")
        if unknown:
            raise OnnxAttrError(f"{self.title} takes no option {', '.join(unknown)} "
                                f"(its options: {', '.join(self.options)})")
        targets = np.asarray(targets)
        if smooth is None:
            if samples is not None or noise is not None:
                raise OnnxAttrError("samples and noise need smooth= (one of "
                                    f"{', '.join(SMOOTHINGS)})")
            if seed is not None:
                options["seed"] = seed
            if progress is not None and self.reports_progress:
                options[PROGRESS] = progress
            return self.attribute(engine, pixels, targets, score, batch_size, **options)
        return self._smoothed(_smoothing(smooth), engine, pixels, targets, score, batch_size,
                              DEFAULT_SAMPLES if samples is None else samples,
                              DEFAULT_NOISE if noise is None else noise, seed, options)

    def _smoothed(self, smoothing, engine, pixels, targets, score, batch_size, samples, noise,
                  seed, options):
        """`smoothing` of the attributions of `samples` noisy copies of each image."""
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise OnnxAttrError(f"samples must be a whole number of at least 1, got {samples!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float, np.number)) \
                or not np.isfinite(noise) or noise < 0:
            raise OnnxAttrError(f"noise must be a number >= 0 (a fraction of the pixel range), "
                                f"got {noise!r}")
        seed = np.random.SeedSequence().entropy if seed is None else _checked_seed(seed)
        if "seed" in self.own_options:
            options["seed"] = seed
        spread = pixels.max(axis=(1, 2, 3)) - pixels.min(axis=(1, 2, 3))
        low, high = PIXEL_RANGE
        sigma = noise * np.where(spread > 0, spread, high - low)
        moments = _Moments(pixels.shape)
        for image, copies in noisy_copies(pixels, sigma, samples, batch_size or CHUNK, seed):
            attribution, _ = self.attribute(engine, copies, targets[image], score, batch_size,
                                            **options)
            moments.add(image, attribution)
        attribution = smoothing.combine(moments.mean, moments.variance).astype(np.float32)
        return attribution, [{"samples": int(samples), "noise_sigma": float(s)} for s in sigma]


def noisy_copies(pixels, sigma, samples, batch_size, seed):
    """`samples` copies of each image plus Gaussian noise of std `sigma[image]`, made at most
    `batch_size` at a time (chunks of even size): yields (image index per row, copies). The
    noise depends on `seed` alone, not on batch_size (one random stream, drawn in row
    order)."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the method's own use of seed
    for start, end in even_chunks(len(pixels) * samples, batch_size):
        image = np.arange(start, end) // samples
        noise = rng.standard_normal((len(image), *pixels.shape[1:]), np.float32)
        yield image, pixels[image] + (sigma[image].reshape(-1, 1, 1, 1) * noise).astype(np.float32)


class _Moments:
    """Running mean and variance (Welford) of the attributions of each image, in float64."""

    def __init__(self, shape):
        self.count = np.zeros(shape[0])
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)

    def add(self, images, values):
        for n, value in zip(images, values.astype(np.float64)):
            self.count[n] += 1
            delta = value - self.mean[n]
            self.mean[n] += delta / self.count[n]
            self.m2[n] += delta * (value - self.mean[n])

    @property
    def variance(self):
        return self.m2 / self.count.reshape(-1, 1, 1, 1)


def _smoothing(name):
    if not isinstance(name, str) or name not in SMOOTHINGS:
        raise OnnxAttrError(f"unknown smoothing {name!r} (choose from {', '.join(SMOOTHINGS)})")
    return SMOOTHINGS[name]


def _checked_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or seed < 0):
        raise OnnxAttrError(f"seed must be a whole number >= 0, got {seed!r}")
    return seed


# --- the methods -------------------------------------------------------------------------------


def _backprop(rule):
    """The gradient with the given ReLU backward rule (`vanilla` is the plain gradient)."""
    def attribute(engine, pixels, targets, score, batch_size):
        attribution, _, _ = engine.gradient(pixels, targets, rule, score, batch_size)
        return attribution, [{} for _ in pixels]
    return attribute


def input_x_gradient(engine, pixels, targets, score, batch_size):
    """The gradient times the input, pixel by pixel."""
    gradient, _, _ = engine.gradient(pixels, targets, VANILLA, score, batch_size)
    return pixels * gradient, [{} for _ in pixels]


def integrated_gradients(engine, pixels, targets, score, batch_size, progress=None, *,
                         steps=DEFAULT_STEPS, baseline="black", rule=DEFAULT_RULE, seed=None):
    """(I - I0) * sum_k w_k dS/dI(I0 + a_k (I - I0)), the rule's (a_k, w_k) (integration.py).

    Path images of all images are made and run `batch_size` at a time, `progress(share
    done)` called after each chunk. Extras per image:
    `convergence_delta` = sum(attribution) - (S(I) - S(I0)) (signed, in score units),
    `relative_convergence_delta` = |delta| / |S(I) - S(I0)| (None where S(I) = S(I0) to float32
    precision) and `score_difference` S(I) - S(I0),
    with S the same score (prob or logit) at the end points, from forward passes.
    """
    alphas, weights = integration_rule(rule, steps)
    baselines = make_baselines(baseline, pixels, PIXEL_RANGE, _checked_seed(seed))
    mean_gradient = np.zeros(pixels.shape)
    total, done = len(pixels) * len(alphas), 0
    for image, step, path in path_chunks(pixels, baselines, alphas, batch_size or CHUNK):
        gradient, _, _ = engine.gradient(path, targets[image], VANILLA, score,
                                         batch_size or CHUNK)
        for n in np.unique(image):
            rows = image == n
            mean_gradient[n] += np.tensordot(weights[step[rows]], gradient[rows], axes=1)
        done += len(image)
        if progress is not None:
            progress(done / total)
    attribution = (pixels.astype(np.float64) - baselines) * mean_gradient
    scores = engine.target_scores(np.concatenate([pixels, baselines]), np.tile(targets, 2),
                                  score, batch_size)
    difference = scores[:len(pixels)] - scores[len(pixels):]
    delta = attribution.sum(axis=(1, 2, 3)) - difference
    ends = zip(scores[:len(pixels)], scores[len(pixels):])
    return attribution.astype(np.float32), [
        {"convergence_delta": float(d), "relative_convergence_delta": _relative(d, s, e),
         "score_difference": float(s)} for d, s, e in zip(delta, difference, ends)]


def _relative(delta, difference, ends):
    """|delta| / |S(I) - S(I0)|; None when S(I) and S(I0) agree to float32 precision (the
    ratio then says nothing: an attribution summing to about 0 is right)."""
    if abs(difference) <= RELATIVE_FLOOR * max(1.0, *np.abs(ends)):
        return None
    return float(abs(delta) / abs(difference))


def grad_cam(engine, pixels, targets, score, batch_size, *, layer=None):
    """Grad-CAM (Selvaraju et al. 2017) at `layer` (default: the last spatial feature map
    before the classifier, onnxattr.graph.layers): ReLU(sum_k alpha_k A_k), alpha_k the spatial mean
    of dS/dA_k, upsampled bilinearly to the image (onnxattr.methods.cam), as map / C per channel.
    Extras per image: `layer` and `cam`, the float32 [h, w] map before upsampling."""
    maps, extras = _upsampled_cams(engine, pixels, targets, score, batch_size, layer)
    return _per_channel(maps, pixels.shape[1]), extras


def guided_grad_cam(engine, pixels, targets, score, batch_size, *, layer=None):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation times the upsampled
    Grad-CAM map, channel by channel. Extras as Grad-CAM's."""
    maps, extras = _upsampled_cams(engine, pixels, targets, score, batch_size, layer)
    guided, _, _ = engine.gradient(pixels, targets, GUIDED, score, batch_size)
    return (guided * maps[:, None]).astype(np.float32), extras


def _upsampled_cams(engine, pixels, targets, score, batch_size, layer):
    """Grad-CAM maps at the image's size (float64 [N, H, W], from the float32 maps at the
    layer's size), and the extras."""
    layer = engine.resolve_layer(layer)
    activation, gradient, _, _ = engine.layer_gradient(pixels, targets, layer, score,
                                                       batch_size)
    cams = grad_cam_maps(activation, gradient).astype(np.float32)
    return upsample(cams, pixels.shape[2:]), [{"layer": layer, "cam": cam} for cam in cams]


def occlusion(engine, pixels, targets, score, batch_size, progress=None, *, mask_size=None,
              stride=None, mask_value="mean"):
    """Occlusion sensitivity (onnxattr.methods.occlusion): per pixel, the mean drop of the target's
    score over the mask positions covering it, as map / C per channel. Forward passes only,
    `batch_size` masked images at a time. Extras per image: mask_size, stride, positions."""
    size = pixels.shape[2:]
    mask_size, stride = occlusion_geometry(size, mask_size, stride)
    values = mask_values(pixels, mask_value)
    positions = mask_positions(size, mask_size, stride)
    original = engine.target_scores(pixels, targets, score, batch_size)
    drops = np.zeros((len(pixels), *size))
    total, done = len(pixels) * len(positions), 0
    for image, position, masked in masked_chunks(pixels, values, positions, mask_size,
                                                 batch_size or CHUNK):
        drop = original[image] - engine.target_scores(masked, targets[image], score,
                                                      batch_size or CHUNK)
        for n, (top, left), value in zip(image, positions[position], drop):
            drops[n, top:top + mask_size, left:left + mask_size] += value
        done += len(image)
        if progress is not None:
            progress(done / total)
    sensitivity = drops / coverage(size, mask_size, positions)
    return _per_channel(sensitivity, pixels.shape[1]), [
        {"mask_size": mask_size, "stride": stride, "positions": len(positions)}
        for _ in pixels]


def _per_channel(maps, channels):
    """float32 [N, C, H, W] attribution of one map [N, H, W] per image: map / C per channel."""
    return np.repeat((maps / channels)[:, None], channels, axis=1).astype(np.float32)


OTHER_METHODS = {
    "integrated-gradients": Method("Integrated Gradients", integrated_gradients),
    "input-x-gradient": Method("Input X Gradient", input_x_gradient),
    # a coarse map is read against the photo beneath it
    "grad-cam": Method("Grad-CAM", grad_cam, render={"style": "overlay"}),
    "guided-grad-cam": Method("Guided Grad-CAM", guided_grad_cam, uses=GUIDED),
    # signed: occluding some regions raises the score (a third of the map's mass on GoogLeNet
    # and the sample photo), which |map| would show as evidence for the class
    "occlusion": Method("Occlusion Sensitivity", occlusion,
                        render={"style": "overlay", "sign": "all"}),
}


class _MethodTable(Mapping):
    """Every method by name: one gradient method per ReLU backward rule (read live from
    relu_rules.RELU_RULES), then `OTHER_METHODS`."""

    def _table(self):
        rules = {rule.method: Method(rule.title, _backprop(name), name)
                 for name, rule in RELU_RULES.items()}
        return {**rules, **OTHER_METHODS}

    def __getitem__(self, name):
        return self._table()[name]

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())


METHODS = _MethodTable()


def compilable_methods():
    """The methods a compiled attribution model can hold: one gradient with a ReLU rule."""
    return [name for name, method in METHODS.items() if method.relu_rule is not None]


def get_method(name):
    """The method called `name`, or an error listing the known ones."""
    if name not in METHODS:
        raise OnnxAttrError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]
