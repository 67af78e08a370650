"""The public API: `Explainer` classifies images and explains the decision with a method."""

import difflib
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import OnnxAttrError, OnnxAttrNote
from ..graph.builders import GraphCache, check_builder
from ..graph.engine import AttributionEngine
from ..graph.runtime import check_counts, provider_options
from ..io.image import check_fit, load_image, to_pixels
from ..io.model import load_model
from ..io.render import attribution_map
from .compile import CompiledEngine
from .figures import RenderOptions
from .metrics import DEFAULT_METRICS, Subject, measure, parse_metrics
from .table import CHUNK, get_method

DEFAULT_MODEL = "models/googlenet.onnx"


@dataclass
class Explanation:
    """One image's attribution for one target class.

    The method-specific numbers in `extras` read as attributes too: integrated gradients'
    `convergence_delta` and `relative_convergence_delta`, Grad-CAM's `layer` and `cam`.
    """

    method: str
    """The method's name, e.g. "gradient"."""
    title: str
    """The figure title, e.g. "Gradient Attribution Map (golden retriever)"."""
    class_index: int
    """The target class's index."""
    label: str
    """The target class's label."""
    score: float
    """Softmax probability of the target class."""
    attribution: np.ndarray
    """float32: the method's attribution per pixel in the model's own input layout, (C, H, W)
    for a channels-first model, (H, W, C) for a channels-last one; channels in RGB order (the
    image's), whatever order the model reads."""
    photo: np.ndarray
    """uint8 (H, W, 3): the image at model resolution, as the model saw it."""
    extras: dict = field(default_factory=dict)
    """Method-specific numbers (and a layer's name)."""
    render_defaults: dict = field(default_factory=dict)
    """The method's own drawing defaults."""
    builder: str | None = None
    """The gradient builder that made the method's graph ("onnxruntime" or "native"; None when
    the method runs no gradient graph of onnxattr's: occlusion, a compiled model)."""
    layout: str = "NCHW"
    """The model's input layout, and so the attribution's."""

    @property
    def channels_first(self):
        """float32 (C, H, W): the attribution channels-first, whatever the model's layout."""
        return self.attribution.transpose(2, 0, 1) if self.layout == "NHWC" else self.attribution

    @property
    def map(self):
        """float32 (H, W) in [0, 1]: channel sum of |attribution|, rescaled (the example's map)."""
        return attribution_map(self.channels_first)

    def render(self, reduction="sum", sign=None, clip="none", clip_value=None, cmap=None,
               style=None, alpha=0.5):
        """uint8 (H, W, 3) picture of the attribution (see `onnxattr.methods.figures.RenderOptions`):
        sign absolute|positive|negative|all, reduction sum|max-abs, clip none|percentile|
        outlier-mass (`clip_value`: its parameter), style map|overlay|masked, any colormap.
        `sign` and `style` None: the method's default (`render_defaults`), else absolute and
        map."""
        return RenderOptions(reduction, sign, clip, clip_value, cmap, style, alpha).render(self)

    def __getattr__(self, name):
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(name)


class Explainer:
    """Attribution maps for one ONNX image classifier.

    `model`: path to an ONNX classifier with one image input, channels-first [N, C, H, W] or
    channels-last [N, H, W, C] (`layout` "nchw" or "nhwc"; None: its onnxattr.input metadata's,
    else what the shape says, refused when it could be either), and a softmax or logits output
    (`output`: its name, for a model with several), or a compiled attribution model (onnxattr
    compile). `labels`: class names, a list or a file (one per line, or a JSON list), over the
    model's onnxattr.labels metadata. Images are RGB pixels 0..255; what the model expects
    (`channel_order` "rgb" or "bgr", `pixel_range` such as "0..1", "0..255" or "-1..1",
    per-channel `mean` and `std` in that range and the model's channel order) comes from its
    onnxattr.input metadata or these arguments, and is built into the graph in front of the
    model; a model that states nothing is assumed to take RGB 0..255 (with a note). An
    Explanation's `attribution` is in the model's own layout (channels-last for an NHWC model),
    its pictures the same whatever the layout.

    `device`: "cpu" or "cuda"; `precision`: "float32" (exact, default) or "tf32" (CUDA
    convolutions in TF32). `builder`: "auto", "onnxruntime" or "native"
    (onnxattr.graph.builders). `fit`: how images of another size reach the input size,
    "stretch" (the example's imresize) or "center-crop". `threads`: onnxruntime's threads (None: all cores);
    `workers`: sessions that share a batched run, each with threads / workers (None: 2 on a
    CPU with 2 or more cores, else 1; see onnxattr.graph.runtime.default_workers).
    """

    def __init__(self, model=DEFAULT_MODEL, device="cpu", cache_dir=None, threads=None,
                 fit="stretch", builder="auto", precision="float32", pixel_range=None,
                 mean=None, std=None, workers=None, layout=None, channel_order=None,
                 output=None, labels=None):
        provider_options(device, precision)  # a missing CUDA provider fails here, before images
        check_builder(builder)
        check_counts(threads=threads, workers=workers)
        check_fit(fit)
        self.model_path = str(model)
        self.options = {"model": model, "device": device, "cache_dir": cache_dir, "fit": fit,
                        "builder": builder, "precision": precision, "pixel_range": pixel_range,
                        "mean": mean, "std": std, "layout": layout,
                        "channel_order": channel_order, "output": output, "labels": labels}
        """The constructor's arguments but threads and workers: another process (a Ray worker)
        makes the same Explainer with `Explainer(**options, threads=..., workers=...)`."""
        self.classifier = load_model(model, layout, output).with_contract(
            pixel_range, mean, std, channel_order).with_labels(labels)
        if self.classifier.compiled:
            self.engine = CompiledEngine(self.classifier, device, threads, precision, workers)
        else:
            self.engine = AttributionEngine(self.classifier, device, GraphCache(cache_dir),
                                            threads, builder, precision, workers)
        try:
            self.engine.open()  # a graph onnxruntime refuses is the model's fault, said once
        except OnnxAttrError as err:
            raise OnnxAttrError(f"{self.model_path}: {err}") from None
        self.fit = fit
        self._contract_said = self.classifier.contract.stated or bool(self.classifier.compiled)

    def _say_contract(self):
        """Once, with the first result: the pixel contract assumed for a model that states none."""
        if not self._contract_said:
            self._contract_said = True
            warnings.warn(f"{self.model_path} states no pixel contract (onnxattr.input "
                          "metadata); assumed it takes RGB 0..255 (give --pixel-range 0..1, "
                          "--mean, --std if it expects normalised input)", OnnxAttrNote,
                          stacklevel=3)

    @property
    def labels(self):
        return self.classifier.labels

    @property
    def input_size(self):
        """(height, width) the model takes."""
        return self.classifier.size

    def pixels(self, images):
        """float32 [N, 3, H, W] at model resolution from a list of paths, PIL images or arrays."""
        return np.stack([to_pixels(load_image(image), self.input_size, self.fit)
                         for image in images])

    def classify(self, image, top=5):
        """[(class_index, label, probability), ...] best first; a list of images gives a list."""
        images, single = _as_list(image)
        prob, _ = self.engine.forward(self.pixels(images))
        ranked = [[(int(i), self.labels[i], float(p[i])) for i in np.argsort(-p)[:top]]
                  for p in prob]
        self._say_contract()
        return ranked[0] if single else ranked

    def target_index(self, target):
        """Class index for an index, a numeric string, or a label (case-insensitive)."""
        count = len(self.labels)
        if isinstance(target, str) and re.fullmatch(r"\s*[+-]?\d+\s*", target):
            target = int(target)
        elif isinstance(target, str) and _is_number(target) or isinstance(target, float):
            raise OnnxAttrError(f"target {target} is not a whole number: give a class index "
                                f"0..{count - 1} or a label")
        if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
            if not 0 <= target < count:
                raise OnnxAttrError(f"class index {target} is out of range 0..{count - 1}")
            return int(target)
        if not isinstance(target, str):
            raise OnnxAttrError(f"target must be a class index or label, not {target!r}")
        wanted = target.strip().lower()
        matches = [i for i, label in enumerate(self.labels) if label.lower() == wanted]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise OnnxAttrError(f"class name '{target}' is ambiguous: indices "
                                f"{', '.join(map(str, matches))}; give the index")
        if not self.classifier.has_labels:
            raise OnnxAttrError(f"unknown class name '{target}': the model has no class names "
                                f"(onnxattr.labels metadata); give a class index 0..{count - 1}")
        close = difflib.get_close_matches(wanted, [label.lower() for label in self.labels], 3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise OnnxAttrError(f"unknown class name '{target}'{hint}")

    def explain(self, image, method="gradient", target=None, score="prob", batch_size=None,
                progress=None, **options):
        """Attribution of `method` for each image's target class (None: the top-1 class).

        A list of images (with a list of targets, or one target for all) is one batch and
        gives a list of Explanations. `progress(share done)` is called as a long method
        (occlusion) advances.
        """
        images, single = _as_list(image)
        targets = target if isinstance(target, (list, tuple)) else [target] * len(images)
        if len(targets) != len(images):
            raise OnnxAttrError(f"{len(targets)} targets for {len(images)} images")
        chosen = get_method(method)
        check_counts(batch_size=batch_size)
        smooth = options.get("smooth")
        name = method if smooth is None else f"{smooth}-{method}"
        indices = [None if t is None else self.target_index(t) for t in targets]
        pixels = self.pixels(images)
        prob, _ = self.engine.forward(pixels, batch_size)
        indices = np.array([int(np.argmax(p)) if i is None else i for i, p in zip(indices, prob)])
        self.engine.last_builder = None
        with np.errstate(all="ignore"):
            attribution, extras = chosen.compute(self.engine, pixels, indices, score, batch_size,
                                                 progress=progress, **options)
        if not np.isfinite(attribution).all():
            given = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None)
            raise OnnxAttrError(f"{method} gave NaN or infinite attributions"
                                f"{f' with {given}' if given else ''}: the model overflows at "
                                "these inputs")
        results = [
            Explanation(name, f"{chosen.title_for(smooth)} ({self.labels[i]})", int(i),
                        self.labels[i],
                        float(p[i]), self._own_layout(a.astype(np.float32)),
                        pix.transpose(1, 2, 0).round().clip(0, 255).astype(np.uint8), extra,
                        dict(chosen.render or {}), self.engine.last_builder,
                        self.classifier.layout)
            for i, p, a, pix, extra in zip(indices, prob, attribution, pixels, extras)]
        self._say_contract()
        return results[0] if single else results

    def evaluate(self, image, explanation_or_method="gradient", metrics=DEFAULT_METRICS,
                 target=None, batch_size=None, progress=None, metric_options=None, seed=0,
                 **options):
        """Faithfulness metrics (onnxattr.methods.metrics) of a method's map on each image,
        with the random-map and inverted-map controls: per image {map name: {quantity:
        Result(value, curve)}}, e.g. `result["gradient"]["deletion_auc"].value`.

        `explanation_or_method`: a method name (run here with `target`, `**options`), or the
        Explanation(s) of these images. `metric_options`: one dict for every chosen metric
        that takes the option (steps, patch, percentages, samples, noise, radius, normalize)."""
        images, single = _as_list(image)
        names = parse_metrics(metrics)
        given = explanation_or_method
        if isinstance(given, str):
            explanations = self.explain(images, given, target, batch_size=batch_size, **options)
        else:
            explanations, _ = _as_list(given)
            if len(explanations) != len(images):
                raise OnnxAttrError(f"{len(explanations)} explanations for {len(images)} images")
        check_counts(batch_size=batch_size)
        pixels = self.pixels(images)
        results = []
        for n, (pix, explanation) in enumerate(zip(pixels, explanations)):
            subject = Subject(self.engine, pix, explanation.class_index, batch_size or CHUNK,
                              self._rerun(given, explanation, batch_size, options))
            share = None if progress is None else (lambda s, n=n: progress((n + s) / len(images)))
            results.append(measure(subject, explanation.attribution, explanation.method, names,
                                   metric_options, seed, share))
        return results[0] if single else results

    def _rerun(self, method, explanation, batch_size, options):
        """The method's attributions of perturbed copies of an image (max-sensitivity); None
        for a given Explanation."""
        if not isinstance(method, str):
            return None
        chosen = get_method(method)

        def explain(perturbed):
            targets = np.full(len(perturbed), explanation.class_index)
            with np.errstate(all="ignore"):
                return chosen.compute(self.engine, perturbed, targets, options.get("score", "prob"),
                                      batch_size, **{k: v for k, v in options.items()
                                                     if k != "score"})[0]
        return explain


    def _own_layout(self, attribution):
        """An attribution (C, H, W) in the model's input layout."""
        return attribution.transpose(1, 2, 0) if self.classifier.layout == "NHWC" else attribution


def _is_number(text):
    """Whether `text` reads as a finite number such as "285.0" or "1e3" (not a label)."""
    try:
        return bool(np.isfinite(float(text)))
    except ValueError:
        return False


def _as_list(image):
    if isinstance(image, (list, tuple)):
        if not image:
            raise OnnxAttrError("no images given")
        return list(image), False
    return [image], True
