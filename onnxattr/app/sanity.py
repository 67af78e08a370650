"""Model-parameter randomization test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

If a map explains the model, it must change when the model's learned weights are replaced by
random ones. `run_sanity` randomizes the classifier's layers (onnxattr.graph.randomize: which layers,
how, and the engines of the randomized copies) and measures how similar each method's map stays
to the map of the original model (onnxattr.app.similarity):

- **cascading**: randomize the top layer (the classifier), then also the one below, and so on
  down to the first convolution; step k has the k + 1 layers closest to the output randomized.
- **independent**: randomize each layer alone, the rest keeping the trained weights.

Writes the maps figure per mode, the similarity curve and a JSON of every number.
"""

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OnnxAttrError
from ..graph.engine import AttributionEngine
from ..graph.prepare import check_score
from ..graph.randomize import OriginalGraphs, parameter_layers, randomize_proto, randomized_engine
from ..io import render
from ..io.files import atomic_path
from ..methods.explainer import Explainer
from ..methods.table import get_method
from .similarity import METRICS, similarity

MODES = ("cascading", "independent")
CELL_INCHES = 1.05  # one map of the maps figure


@dataclass
class SanityResult:
    """All numbers of a randomization test, and the seed-0 maps for the figures."""

    model: str
    image: str
    target: int
    label: str
    score: str
    methods: list
    modes: list
    seeds: list
    grouping: str
    distribution: str
    layers: list  # [Layer], output first
    original: dict  # method -> attribution (C, H, W) of the original model
    maps: dict  # mode -> method -> [attribution per step] for the first seed
    metrics: dict  # mode -> method -> metric -> float array (seeds, steps)
    seconds: float = 0.0
    swap: bool = True

    def steps(self, mode):
        """Column names of a mode: the layer randomized at each step."""
        return [layer.name for layer in self.layers]

    def summary(self, mode, method, metric):
        """(mean, std) over seeds per step."""
        values = self.metrics[mode][method][metric]
        return np.nanmean(values, axis=0), np.nanstd(values, axis=0)

    def to_dict(self):
        def clean(values):
            return [[None if not np.isfinite(v) else round(float(v), 6) for v in row]
                    for row in np.atleast_2d(values)]

        results = {}
        for mode in self.modes:
            per_method = {}
            for method in self.methods:
                per_metric = {}
                for metric in METRICS:
                    mean, std = self.summary(mode, method, metric)
                    per_metric[metric] = {"per_seed": clean(self.metrics[mode][method][metric]),
                                          "mean": clean(mean)[0], "std": clean(std)[0]}
                per_method[method] = per_metric
            names = self.steps(mode)
            randomized = ([names[:k + 1] for k in range(len(names))] if mode == "cascading"
                          else [[n] for n in names])
            results[mode] = {"steps": names, "randomized": randomized, "methods": per_method}
        return {
            "model": self.model, "image": self.image, "target": self.target,
            "label": self.label, "score": self.score, "methods": self.methods,
            "modes": self.modes, "seeds": self.seeds, "grouping": self.grouping,
            "distribution": self.distribution, "swap": self.swap,
            "seconds": round(self.seconds, 2),
            "metrics": {k: v for k, v in METRICS.items()},
            "layers": [{"name": layer.name, "nodes": layer.nodes,
                        "parameters": layer.weights + layer.biases + layer.affine}
                       for layer in self.layers],
            "results": results,
        }


def _parse_modes(mode):
    if mode in ("both", None):
        return list(MODES)
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        if m not in MODES:
            raise OnnxAttrError(f"unknown mode '{m}' (choose cascading, independent or both)")
    return modes


def run_sanity(model, image, methods=("gradient",), mode="both", seeds=1, seed=0, target=None,
               score="logit", grouping="prefix", distribution="own-std", method_options=None,
               device="cpu", cache_dir=None, threads=None, swap=True, progress=None):
    """Run the model-parameter randomization test for one image; returns a SanityResult.

    `model`: a path or an Explainer. `methods`: names from onnxattr.methods.table.METHODS.
    `mode`: "cascading", "independent" or "both". `seeds`: how many random draws (seeds
    `seed`, `seed` + 1, ...). `target`: class to explain (default: the original model's top-1
    class), fixed for every randomized model. `score`: "logit" (default; a randomized top layer
    can push the softmax probability of the class so low that its gradient underflows) or
    "prob". `method_options`: {method: {option: value}}. `progress(n)` is called after each
    map with the number of maps done since the last call; the total is
    `len(methods) * (1 + seeds * steps * len(modes))`.
    """
    started = time.perf_counter()
    explainer = model if isinstance(model, Explainer) else Explainer(
        model, device=device, cache_dir=cache_dir, threads=threads)
    run = _SanityRun(explainer, image, methods, target, score, method_options or {},
                     progress or (lambda n: None))
    modes = _parse_modes(mode)
    if int(seeds) < 1:
        raise OnnxAttrError("seeds must be at least 1")
    layers = parameter_layers(explainer.classifier.proto, explainer.classifier.logits_output,
                              grouping)
    seed_list = [int(seed) + k for k in range(int(seeds))]
    metrics = {md: {m: {k: np.full((len(seed_list), len(layers)), np.nan) for k in METRICS}
                    for m in run.methods} for md in modes}
    maps = {md: {m: [] for m in run.methods} for md in modes}
    for s, current_seed in enumerate(seed_list):
        for md in modes:
            for step in range(len(layers)):
                chosen = list(range(step + 1)) if md == "cascading" else [step]
                randomized = randomize_proto(explainer.classifier.proto,
                                             [layers[i] for i in chosen], current_seed,
                                             distribution, chosen, explainer.classifier.weights)
                tag = f"{distribution}|seed={current_seed}|{md}|step={step}"
                engine = randomized_engine(run.base, randomized, tag, swap, run.originals)
                for m, values in run.compare(engine).items():
                    for k, v in values[0].items():
                        metrics[md][m][k][s, step] = v
                    if s == 0:
                        maps[md][m].append(values[1])
                del engine, randomized
                gc.collect()  # free the step's sessions before the next one is made
    return SanityResult(explainer.model_path, str(image), run.index, explainer.labels[run.index], score,
                        run.methods, modes, seed_list, grouping, distribution, layers,
                        run.original, maps, metrics, time.perf_counter() - started, swap)


class _SanityRun:
    """The fixed parts of one test: the image, the class, the methods and the original maps."""

    def __init__(self, explainer, image, methods, target, score, options, progress):
        self.methods = list(dict.fromkeys(methods))
        if not self.methods:
            raise OnnxAttrError("no methods given")
        self.chosen = {m: get_method(m) for m in self.methods}
        unknown = set(options) - set(self.methods)
        if unknown:
            raise OnnxAttrError(f"options given for methods not run: {', '.join(sorted(unknown))}")
        self.score, self.options, self.progress = check_score(score), options, progress
        self.base = explainer.engine
        if not isinstance(self.base, AttributionEngine):
            raise OnnxAttrError("the sanity check randomizes the source model's weights; give "
                                "the source ONNX classifier, not a compiled attribution model")
        self.pixels = explainer.pixels([image])
        self.index = (int(np.argmax(self.base.forward(self.pixels)[0][0])) if target is None
                      else explainer.target_index(target))
        self.originals = OriginalGraphs(self.base)
        self.original = {m: self.attribute(self.base, m) for m in self.methods}

    def attribute(self, engine, method):
        attribution, _ = self.chosen[method].compute(engine, self.pixels, np.array([self.index]),
                                                     self.score, None,
                                                     **self.options.get(method, {}))
        self.progress(1)
        return np.asarray(attribution[0], np.float32)

    def compare(self, engine):
        """{method: (similarities to the original map, the map)} for a randomized engine."""
        results = {}
        for m in self.methods:
            attribution = self.attribute(engine, m)
            results[m] = (similarity(self.original[m], attribution), attribution)
        return results


# --- outputs -----------------------------------------------------------------------------------

def save_maps_figure(path, result, mode="cascading"):
    """The paper's figure: rows = methods, columns = the original map and each step's map
    (seed 0), each column titled by the layer randomized at that step."""
    steps = result.steps(mode)
    columns = 1 + len(steps)
    rows = len(result.methods)
    fig = render.blank_figure(CELL_INCHES * columns + 0.8, rows * CELL_INCHES + 0.9)
    axes = fig.subplots(rows, columns, squeeze=False)
    what = ("cascading randomization, from the output down" if mode == "cascading"
            else "independent randomization, one layer at a time")
    fig.suptitle(f"Model-parameter randomization ({what}); class: {result.label}", fontsize=9)
    for r, method in enumerate(result.methods):
        cells = [result.original[method]] + result.maps[mode][method]
        for c, attribution in enumerate(cells):
            ax = axes[r, c]
            render.show(ax, render.colorize(render.attribution_map(attribution)),
                        interpolation="auto")
            if r == 0:
                ax.set_title("original" if c == 0 else steps[c - 1], fontsize=6,
                             rotation=30 if max(map(len, steps)) > 10 else 0)
            if c == 0:
                ax.set_ylabel(get_method(method).title, fontsize=6)
    return render.save_figure(fig, path)


def save_curve_figure(path, result):
    """Similarity to the original map against randomization depth: one subplot per metric
    (a row per mode), a line per method (mean over seeds, band mean +/- std when seeds > 1)."""
    rows, columns = len(result.modes), len(METRICS)
    fig = render.blank_figure(3.3 * columns, 2.9 * rows + 0.4)
    axes = fig.subplots(rows, columns, squeeze=False)
    colors = [f"C{i}" for i in range(len(result.methods))]
    for r, mode in enumerate(result.modes):
        steps = result.steps(mode)
        x = np.arange(len(steps) + 1)
        for c, (metric, label) in enumerate(METRICS.items()):
            ax = axes[r, c]
            for method, color in zip(result.methods, colors):
                mean, std = result.summary(mode, method, metric)
                mean = np.concatenate([[1.0], mean])
                std = np.concatenate([[0.0], std])
                ax.plot(x, mean, "o-", color=color, markersize=2.5, linewidth=1.2,
                        label=get_method(method).title)
                if len(result.seeds) > 1:
                    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2,
                                    linewidth=0)
            ax.axhline(0.0, color="0.6", linewidth=0.6)
            ax.set_ylim(-0.5, 1.05)
            ax.set_xticks(x)
            ax.set_xticklabels(["original", *steps], rotation=90, fontsize=6)
            ax.tick_params(axis="y", labelsize=7)
            ax.set_title(f"{label}\n({mode})", fontsize=8)
            ax.grid(alpha=0.3, linewidth=0.5)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(result.methods),
               fontsize=7, frameon=False)
    spread = " (band: mean ± std over seeds)" if len(result.seeds) > 1 else ""
    fig.suptitle(f"Similarity to the original map vs randomization depth; "
                 f"{len(result.seeds)} seed(s){spread}", fontsize=9)
    return render.save_figure(fig, path)


def save_json(path, result):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return path


def write_outputs(result, out_dir, stem="sanity"):
    """Write `<stem>_sanity_<mode>.png` per mode, `<stem>_sanity_curve.png` and
    `<stem>_sanity.json` under `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    written = [save_maps_figure(out_dir / f"{stem}_sanity_{mode}.png", result, mode)
               for mode in result.modes]
    written.append(save_curve_figure(out_dir / f"{stem}_sanity_curve.png", result))
    written.append(save_json(out_dir / f"{stem}_sanity.json", result))
    return written


def format_table(result, metrics=("spearman_abs",)):
    """Plain-text tables (a row per step, a column per method) of the mean over seeds."""
    lines = []
    width = max(12, *(len(m) + 1 for m in result.methods))
    for mode in result.modes:
        steps = result.steps(mode)
        name_width = max(10, *(len(s) for s in steps))
        for metric in metrics:
            lines.append(f"{mode}: {METRICS[metric]} (mean over {len(result.seeds)} seed(s))")
            lines.append("step".ljust(name_width) + "".join(m.rjust(width)
                                                           for m in result.methods))
            means = [result.summary(mode, m, metric)[0] for m in result.methods]
            for i, step in enumerate(steps):
                lines.append(step.ljust(name_width)
                             + "".join(f"{mean[i]:{width}.3f}" for mean in means))
    return "\n".join(lines)
