"""The `onnxattr` command: a thin click layer over the public API."""

import os
import sys
from pathlib import Path

import click
import numpy as np

from . import render
from .errors import OnnxAttrError
from .explainer import DEFAULT_MODEL, Explainer
from .files import atomic_path
from .methods import METHODS

EXPORT_HINT = ("export it with: python scripts/export_googlenet.py --caffe "
               "../shared/models/bvlc_googlenet")


def open_explainer(model, device, threads=None):
    """An Explainer, with a hint on how to make the default model when it is missing."""
    if model == DEFAULT_MODEL and not Path(model).exists():
        raise OnnxAttrError(f"default model {model} not found; {EXPORT_HINT}")
    return Explainer(model, device=device, threads=threads)


model_option = click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                            help="ONNX image classifier.")
device_option = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
                             show_default=True)
images_argument = click.argument("images", nargs=-1, required=True,
                                 type=click.Path(path_type=Path))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxattr")
def cli():
    """Explain an image classifier's decisions with gradient attribution maps."""


@cli.command()
@images_argument
@model_option
@device_option
@click.option("--top", default=5, show_default=True, type=click.IntRange(1),
              help="How many classes to list.")
def classify(images, model, device, top):
    """Print the top classes for each image."""
    explainer = open_explainer(model, device)
    failed = 0
    for image in images:
        try:
            ranked = explainer.classify(image, top=top)
        except OnnxAttrError as err:
            failed += _report(err)
            continue
        click.echo(f"{image}:")
        for index, label, prob in ranked:
            click.echo(f"  {prob:7.4f}  {label} ({index})")
    sys.exit(1 if failed else 0)


@cli.command()
@images_argument
@model_option
@device_option
@click.option("--method", "methods", multiple=True, default=["gradient"], show_default=True,
              type=click.Choice([*METHODS, "all"]), help="Attribution method (repeatable).")
@click.option("--target", help="Class index or label to explain (default: the top-1 class).")
@click.option("--score", type=click.Choice(["prob", "logit"]), default="prob", show_default=True,
              help="Differentiate the softmax probability (as the example) or the logit.")
@click.option("--out", "out_dir", default="out", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--save-raw", is_flag=True, help="Also save each attribution as .npy.")
@click.option("--panel", is_flag=True, help="Also save the photo and every map in one PNG.")
def explain(images, model, device, methods, target, score, out_dir, save_raw, panel):
    """Write the example's figures for each image: the photo and one map per method."""
    explainer = open_explainer(model, device)
    if target is not None:
        explainer.target_index(target)  # a bad class fails once, before any work
    methods = list(METHODS) if "all" in methods else list(dict.fromkeys(methods))
    failed = 0
    with click.progressbar(length=len(images) * len(methods), label="explaining",
                           file=sys.stderr) as bar:
        for stem, image in zip(_unique_stems(images), images):
            try:
                written = explain_one(explainer, image, methods, target, score,
                                      out_dir / stem, save_raw, panel, bar.update)
            except OnnxAttrError as err:
                failed += _report(err)
                continue
            click.echo(f"{image}: " + ", ".join(str(p) for p in written))
    sys.exit(1 if failed else 0)


def explain_one(explainer, image, methods, target, score, prefix, save_raw, panel, advance):
    """Run every method on one image and write its figures; returns the paths written."""
    results = []
    for method in methods:
        results.append(explainer.explain(image, method=method, target=target, score=score))
        advance(1)
    first = results[0]
    photo_title = f"{first.label} ({first.score:.2f})"
    written = [Path(f"{prefix}_photo.png")]
    render.save_photo_figure(written[0], first.photo, photo_title)
    for result in results:
        path = Path(f"{prefix}_{result.method}.png")
        render.save_map_figure(path, render.colorize(result.map), result.title)
        written.append(path)
        if save_raw:
            written.append(_save_array(Path(f"{prefix}_{result.method}.npy"), result.attribution))
    if panel:
        written.append(Path(f"{prefix}_panel.png"))
        render.save_panel(written[-1], first.photo, photo_title,
                          [(r.title, render.colorize(r.map)) for r in results])
    return written


def _save_array(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    return path


def _unique_stems(images):
    """Output name prefixes: the file stems, numbered where two images share one."""
    seen, stems = {}, []
    for image in images:
        stem = Path(image).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _report(err):
    click.echo(f"error: {err}", err=True)
    return 1


def main():
    """Entry point: user errors are one line on stderr and exit code 1, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except OnnxAttrError as err:
        sys.exit(_report(err))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("ONNXATTR_DEBUG"):
            raise
        click.echo(f"internal error: {type(err).__name__}: {err} (set ONNXATTR_DEBUG=1 for "
                   "the traceback)", err=True)
        sys.exit(70)
