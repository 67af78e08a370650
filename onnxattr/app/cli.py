"""The `onnxattr` command: a thin click layer over the public API."""

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import click

from ..errors import OnnxAttrError, OnnxAttrNote
from ..graph.builders import CHOICES as BUILDER_CHOICES
from ..graph.prepare import SCORES
from ..io.files import WriteError
from ..io.image import load_image
from ..io.model import parse_numbers, parse_range
from ..methods.compile import compile_model
from ..methods.figures import save_integration_path, write_figures
from ..methods.integration import DEFAULT_STEPS, MAX_STEPS
from ..methods.metrics import QUANTITIES
from ..methods.table import COMPLETENESS_TOLERANCE, METHODS, compilable_methods, get_method
from . import report
from . import sanity as sanity_check
from .cli_flags import (
    contract_flags,
    images_argument,
    method_flags,
    metric_flags,
    model_flags,
    open_explainer,
    options_per_method,
    render_flags,
    score_option,
)
from .cli_progress import ProgressBar, echo

BAR_STEPS = 100  # progress bar steps per method and image


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxattr")
def cli():
    """Explain an image classifier's decisions with gradient attribution maps."""


@cli.command()
@images_argument
@model_flags
@click.option("--top", default=5, show_default=True, type=click.IntRange(1),
              help="How many classes to list.")
def classify(images, explainer, top):
    """Print the top classes for each image."""
    failed = 0
    for image in images:
        try:
            ranked = explainer.classify(image, top=top)
        except OnnxAttrError as err:
            failed += _report(err, image)
            continue
        echo(f"{image}:")
        for index, label, prob in ranked:
            named = "" if label == f"class {index}" else f" ({index})"  # unlabelled: no twice
            echo(f"  {prob:7.4f}  {label}{named}")
    sys.exit(1 if failed else 0)


def _method_list(names):
    """The --method values (repeatable, or comma-separated; "all") as method names."""
    return report.parse_methods(",".join(names))


@cli.command()
@images_argument
@model_flags
@click.option("--method", "methods", multiple=True, default=["gradient"], show_default=True,
              metavar="NAME", help=f"Attribution method, repeatable: {', '.join(METHODS)}, or "
                                   "all.")
@click.option("--target", help="Class index or label to explain (default: the top-1 class).")
@score_option
@click.option("--out", "out_dir", default="out", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--save-raw", is_flag=True, help="Also save each attribution as .npy.")
@click.option("--panel", is_flag=True, help="Also save the photo and every map in one PNG.")
@click.option("--batch-size", type=click.IntRange(1),
              help="Images per run; integrated gradients' path images and --smooth's noisy "
                   "copies are made this many at a time [default: all; 16 for those].")
@click.option("--save-path", is_flag=True, help="integrated-gradients: also save images along "
              "the integration path (<stem>_path.png).")
@render_flags
@method_flags
def explain(images, explainer, methods, target, score, out_dir, save_raw, panel, options,
            batch_size, save_path, method_options):
    """Write the example's figures for each image: the photo and one map per method."""
    chosen = _method_list(methods)
    methods = _applicable(explainer, chosen, score) if "all" in methods else chosen
    if target is not None:
        explainer.target_index(target)  # a bad class fails once, before any work
    method_options = options_per_method(methods, method_options)
    if save_path and "integrated-gradients" not in methods:
        raise OnnxAttrError("--save-path needs --method integrated-gradients")
    check_output_folder(out_dir)
    failed, said = 0, set()
    with ProgressBar(len(images) * len(methods) * BAR_STEPS, "explaining") as bar:
        for stem, image in zip(_unique_stems(images), images):
            try:
                written = explain_one(explainer, image, methods, target, score,
                                      out_dir / stem, save_raw, panel, bar.update, options,
                                      method_options, batch_size, save_path)
            except OnnxAttrError as err:
                failed += _report(err, image)
                continue
            finally:
                _echo_builders(explainer, said)
            echo(f"{image}: " + ", ".join(str(p) for p in written))
    sys.exit(1 if failed else 0)


def _echo_builders(explainer, said):
    """One "builder:" line on stderr for each gradient builder the first time it has made a
    graph (`said`: the builders already named)."""
    if explainer.classifier.compiled:
        return
    for builder in dict.fromkeys(explainer.engine.builders_used.values()):
        if builder not in said:
            said.add(builder)
            echo(f"builder: {explainer.engine.describe_builder(builder)}", err=True)


def _applicable(explainer, methods, score):
    """`--method all` on this model: the methods whose gradient graph can be made, the others
    left out with one note (guided backpropagation on a model without ReLU, say)."""
    kept, skipped = [], []
    for method in methods:
        rule = METHODS[method].modified_rule
        try:
            if rule is not None and not explainer.classifier.compiled:
                explainer.engine.gradient_graph(rule, score)
        except OnnxAttrError as err:
            skipped.append((method, err))
            continue
        kept.append(method)
    if skipped:
        names = ", ".join(method for method, _ in skipped)
        echo(f"note: --method all leaves out {names}: {skipped[0][1]}", err=True)
    return kept


def check_output_folder(out_dir, flag="--out", given=None):
    """Refuse an output folder that is a file, lies under one, or cannot be created or
    written, before any work: a scratch folder made (and removed) in the nearest folder that
    exists tells, even as root or on /proc, where os.access says yes. The error names `flag`
    and what it was `given` (default: the folder)."""
    given = out_dir if given is None else given
    for folder in (Path(out_dir), *Path(out_dir).parents):
        if folder.exists():
            if not folder.is_dir():
                raise OnnxAttrError(f"{flag} {given}: {folder} is a file, not a folder")
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".onnxattr-", dir=folder))
            except OSError as err:
                raise OnnxAttrError(f"{flag} {given}: cannot create or write in {folder} "
                                    f"({err.strerror or err})") from None
            return


def explain_one(explainer, image, methods, target, score, prefix, save_raw, panel, advance,
                options=None, method_options=None, batch_size=None, save_path=False):
    """Run every method on one image (with its `method_options`) and write its figures
    (onnxattr.methods.figures); returns the paths written. The file is decoded once for all methods.
    `advance(n)` moves the progress bar, BAR_STEPS per method (a long method moves it as it
    goes)."""
    photo = load_image(image)
    results = []
    for method in methods:
        settings = (method_options or {}).get(method, {})
        steps = _Steps(advance)
        result = explainer.explain(photo, method=method, target=target, score=score,
                                   batch_size=batch_size, progress=steps.reach, **settings)
        results.append(result)
        _echo_completeness(image, result, settings)
        _echo_layer(image, result)
        steps.reach(1.0)
    written = list(write_figures(results, f"{prefix}_", options, save_raw, panel).values())
    if save_path:
        written.append(save_integration_path(explainer, photo, Path(f"{prefix}_path.png"),
                                             method_options["integrated-gradients"]))
    return written


class _Steps:
    """A method's share of the progress bar: `reach(share done)` advances it to that share of
    BAR_STEPS."""

    def __init__(self, advance):
        self.advance, self.done = advance, 0

    def reach(self, share):
        steps = int(share * BAR_STEPS) - self.done
        if steps > 0:
            self.advance(steps)
            self.done += steps


def _echo_layer(image, result):
    """The layer a layer method used, with its size."""
    if "layer" in result.extras:
        height, width = result.cam.shape
        echo(f"{image}: {result.method} at layer {result.layer} ({height}x{width})")


def _echo_completeness(image, result, settings):
    """Integrated gradients' completeness per image; a warning on stderr when it is off."""
    if "relative_convergence_delta" not in result.extras:
        return
    relative = result.relative_convergence_delta
    share = "" if relative is None else f", {relative:.2%} of S(I) - S(I0)"
    echo(f"{image}: {result.method} convergence delta {result.convergence_delta:+.3g} = "
               f"sum(attribution) - (S(I) - S(I0)){share} = {result.score_difference:.4g}")
    if relative is not None and relative > COMPLETENESS_TOLERANCE:
        echo(f"warning: {image}: the attribution misses S(I) - S(I0) by {relative:.1%} "
                   f"(over {COMPLETENESS_TOLERANCE:.0%}); use more --steps than "
                   f"{settings.get('steps', DEFAULT_STEPS)}", err=True)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())  # str: a URI keeps its "//"
@model_flags
@click.option("--methods", default="gradient", show_default=True,
              help=f"Comma-separated methods ({', '.join(METHODS)}) or 'all'.")
@click.option("--target", help="Class index or label to explain (default: each top-1 class).")
@score_option
@click.option("--out", "out_dir", default="audit", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--resume", is_flag=True,
              help="Skip images an earlier run into --out already did with the same settings.")
@click.option("--engine", type=click.Choice(report.ENGINES), default="local", show_default=True,
              help="Where the images run: this process, or Ray actors (pip install "
                   "'onnxattr[ray]'; docs/scale.md).")
@click.option("--ray-address", metavar="ADDR",
              help="The Ray cluster to join (auto, ray://head:10001) [default: a local one].")
@click.option("--workers", type=click.IntRange(1),
              help="Ray actors, each with one model [default: one per 2 CPUs of the cluster].")
@metric_flags("--metrics")
@render_flags
@method_flags
def audit(paths, explainer, methods, target, score, out_dir, resume, engine, ray_address,
          workers, options, method_options, metrics, metric_options):
    """Every method on every image (files, folders recursively, globs, a .csv or .parquet
    list with a `path` column): figures, raw .npy, summary.json/.csv and index.html in --out.
    Exit code 1 if some image failed."""
    methods = report.parse_methods(methods)
    method_options = options_per_method(methods, method_options)
    if target is not None:
        explainer.target_index(target)  # a bad class fails once, before any work
    check_output_folder(out_dir)
    files = report.collect_inputs(paths, exclude=out_dir)
    # Ray Data draws its own progress bars
    bar = ProgressBar(len(files) * len(methods), "auditing") if engine == "local" else None
    with bar or contextlib.nullcontext():
        summary = report.run_audit(explainer, paths, methods, out_dir, options, target, score,
                                   resume, bar and bar.update, method_options, metrics,
                                   metric_options, engine, ray_address, workers)
    _echo_builders(explainer, set())
    for entry in summary["images"]:
        if entry["status"] == "failed":
            where = "" if entry["file"] in entry["error"] else f"{entry['file']}: "
            echo(f"failed: {where}{entry['error']}", err=True)
    counts = summary["counts"]
    echo(f"{counts['done']} done ({counts['skipped']} from an earlier run), "
         f"{counts['failed']} failed; open {out_dir / 'index.html'}")
    sys.exit(1 if counts["failed"] else 0)


@cli.command()
@images_argument
@model_flags
@click.option("--method", "methods", multiple=True, default=["gradient"], show_default=True,
              metavar="NAME", help="Attribution method, repeatable (or comma-separated).")
@click.option("--target", help="Class index or label to explain (default: the top-1 class).")
@score_option
@click.option("--batch-size", type=click.IntRange(1),
              help="Images per forward pass [default: 16].")
@metric_flags("--metric")
@method_flags
def evaluate(images, explainer, methods, target, score, batch_size, method_options, metrics,
             metric_options):
    """Faithfulness of each method's map on each image (docs/faithfulness.md), beside the
    random-map and the inverted-map controls: one table row per image and map."""
    methods = _method_list(methods)
    metrics = metrics or ["deletion", "insertion"]
    method_options = options_per_method(methods, method_options)
    if target is not None:
        explainer.target_index(target)
    failed, header = 0, None
    with ProgressBar(len(images) * len(methods) * BAR_STEPS, "evaluating") as bar:
        for image in images:
            for method in methods:
                steps = _Steps(bar.update)
                try:
                    result = explainer.evaluate(image, method, metrics, target, batch_size,
                                                steps.reach, metric_options, score=score,
                                                **method_options[method])
                except OnnxAttrError as err:
                    failed += _report(err, image)
                    continue
                names = [q for q in QUANTITIES if q in result[method]]
                if header is None:
                    header = "  ".join(f"{q:>15}" for q in names)
                    echo(f"{'image':<24} {'map':<32} {header}")
                for name, values in result.items():
                    cells = "  ".join(f"{values[q].value:>15.4g}" if q in values else
                                      f"{'':>15}" for q in names)
                    echo(f"{Path(image).name[:24]:<24} {name[:32]:<32} {cells}")
    sys.exit(1 if failed else 0)


@cli.command(short_help="Model-parameter randomization test (Adebayo et al. 2018) of "
                        "the methods' maps.")
@click.argument("image", type=click.Path(path_type=Path))
@model_flags
@click.option("--methods", default="gradient,guided-backprop", show_default=True,
              help=f"Comma-separated methods ({', '.join(METHODS)}) or 'all'.")
@click.option("--mode", type=click.Choice([*sanity_check.MODES, "both"]), default="both",
              show_default=True, help="Cascading (top layer down, cumulative) and/or "
              "independent (one layer at a time) randomization.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1),
              help="Random draws to repeat the test with; the curve shows their spread.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="First seed.")
@click.option("--group", "grouping", type=click.Choice(["prefix", "node"]), default="prefix",
              show_default=True, help="One step per node-name prefix (before the first '/'), "
              "or per parameterised node.")
@click.option("--distribution", type=click.Choice(["own-std", "he"]), default="own-std",
              show_default=True, help="Random weights: truncated normal with the layer's own "
              "weight std, or He's sqrt(2 / fan_in).")
@click.option("--target", help="Class index or label (default: the original top-1 class).")
@click.option("--score", type=click.Choice(list(SCORES)), default="logit",
              show_default=True, help="Differentiate the logit or the softmax probability.")
@click.option("--ig-steps", default=16, show_default=True, type=click.IntRange(2, MAX_STEPS),
              help="Integration steps of integrated-gradients (when it is among the methods).")
@click.option("--out", "out_dir", default="sanity", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
def sanity(image, explainer, methods, mode, seeds, seed, grouping, distribution, target,
           score, ig_steps, out_dir):
    """Model-parameter randomization test (Adebayo et al. 2018): how similar each method's map
    stays as the model's layers are randomized. Writes the maps figure per mode, the
    similarity curve and a JSON of all numbers to --out."""
    methods = report.parse_methods(methods)
    explainer.pixels([image])  # a bad image or class fails before any work
    if target is not None:
        explainer.target_index(target)
    check_output_folder(out_dir)
    options = ({"integrated-gradients": {"steps": ig_steps}}
               if "integrated-gradients" in methods else {})
    modes = list(sanity_check.MODES) if mode == "both" else [mode]
    steps = len(sanity_check.parameter_layers(explainer.classifier.proto,
                                              explainer.classifier.logits_output, grouping))
    with ProgressBar(len(methods) * (1 + seeds * steps * len(modes)), "randomizing") as bar:
        result = sanity_check.run_sanity(explainer, image, methods, mode, seeds, seed, target,
                                         score, grouping, distribution, options,
                                         progress=bar.update)
    _echo_builders(explainer, set())
    written = sanity_check.write_outputs(result, out_dir, Path(image).stem or "image")
    echo(sanity_check.format_table(result))
    echo(", ".join(str(p) for p in written))
    sys.exit(0)


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--method", default="gradient", show_default=True, metavar="NAME",
              help=f"Backward rule to compile in: {', '.join(compilable_methods())}.")
@score_option
@click.option("--builder", type=click.Choice(BUILDER_CHOICES), default="auto",
              show_default=True, help="Gradient builder (see explain --help).")
@click.option("--pixel-range", metavar="0..1|0..255", help="As for explain.")
@click.option("--mean", metavar="M[,M,M]", help="As for explain.")
@click.option("--std", metavar="S[,S,S]", help="As for explain.")
@contract_flags
@click.option("--model-output", metavar="NAME", help="The class output to compile, for a "
              "model with several (explain's --output).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The attribution model to write.")
def compile_command(model, method, score, builder, pixel_range, mean, std, layout,
                    channel_order, labels, model_output, output):
    """Write a portable attribution model (standard ONNX ops: stock onnxruntime, onnxruntime-gpu,
    onnxruntime-node): inputs image, target; outputs prob or logits, attribution."""
    get_method(method)
    check_output_folder(output.parent, "--output", output)
    classifier = open_explainer(model, "cpu", builder=builder,
                                pixel_range=parse_range(pixel_range, "--pixel-range"),
                                mean=parse_numbers(mean, "--mean"),
                                std=parse_numbers(std, "--std"), layout=layout,
                                channel_order=channel_order, output=model_output,
                                labels=labels).classifier
    compile_model(classifier, method, score, output, builder=builder)
    echo(f"{output}: {method} ({score}), {output.stat().st_size / 2**20:.1f} MiB")


def _unique_stems(images):
    """Output name prefixes: the file stems, numbered where two images share one."""
    seen, stems = {}, []
    for image in images:
        stem = Path(image).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _report(err, image=None):
    """One error line on stderr (naming the image when the message does not); returns 1."""
    where = f"{image}: " if image is not None and str(image) not in str(err) else ""
    echo(f"error: {where}{err}", err=True)
    return 1


def _show_note(message, category, filename, lineno, file=None, line=None):
    """Notes (OnnxAttrNote) as one "note:" line on stderr; other warnings likewise, once."""
    text = " ".join(str(message).split())
    echo(f"{'note' if issubclass(category, OnnxAttrNote) else 'warning'}: {text}", err=True)


def main():
    """Entry point: user errors are one line on stderr and exit code 1, never a traceback."""
    warnings.showwarning = _show_note
    warnings.simplefilter("once")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (OnnxAttrError, WriteError) as err:  # WriteError: a full disk, a read-only folder
        sys.exit(_report(err))
    except KeyboardInterrupt:
        echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("ONNXATTR_DEBUG"):
            raise
        echo(f"internal error: {type(err).__name__}: {err} (set ONNXATTR_DEBUG=1 for "
             "the traceback)", err=True)
        sys.exit(70)
