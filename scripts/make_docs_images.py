"""Regenerate the documentation's pictures in docs/: one per rendering style, a panel, the map of each
method that is drawn its own way (Grad-CAM, guided Grad-CAM, occlusion), the audit page.

    .venv/bin/python scripts/make_docs_images.py [--model models/googlenet.onnx]
                                                 [--only styles|methods|audit ...]

Needs the exported GoogLeNet (scripts/export_googlenet.py); the audit screenshot needs Chromium
(skipped with a note when it is missing). The pictures are compressed to stay small.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from PIL import Image

from onnxattr import Explainer
from onnxattr.app.report import run_audit
from onnxattr.methods.figures import RenderOptions, write_figures

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "samples" / "chelsea.png"
SHARED_IMAGES = REPO.parent / "shared" / "images"

# (file, method, options) for the style pictures: the flags are in docs/guide/explain.md beside each
STYLES = [
    ("style-map.png", "gradient", RenderOptions()),
    ("style-overlay.png", "guided-backprop", RenderOptions(style="overlay", clip="percentile")),
    ("style-masked.png", "guided-backprop",
     RenderOptions(style="masked", clip="percentile", clip_value=95)),
    ("style-signed.png", "gradient", RenderOptions(sign="all", clip="percentile")),
]
# methods pictured with their own defaults (docs/<method>.png)
OWN_PICTURES = ["grad-cam", "guided-grad-cam", "occlusion"]


def shrink(path, palette=False):
    """Re-save a PNG maximally compressed; with `palette`, as 256 dithered colors (a fraction of
    the size, but it would band the colorbars, so only for pictures without one)."""
    image = Image.open(path).convert("RGB")
    if palette:
        image = image.quantize(256, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)


def style_pictures(explainer, docs):
    for name, method, options in STYLES:
        result = explainer.explain(PHOTO, method=method)
        with tempfile.TemporaryDirectory() as tmp:
            written = write_figures([result], f"{tmp}/", options)
            shutil.copyfile(written[method], docs / name)
        shrink(docs / name)
        print(docs / name)
    results = [explainer.explain(PHOTO, method=m) for m in ("gradient", "guided-backprop")]
    with tempfile.TemporaryDirectory() as tmp:
        written = write_figures(results, f"{tmp}/", RenderOptions(), panel=True)
        shutil.copyfile(written["panel"], docs / "panel.png")
    shrink(docs / "panel.png")
    print(docs / "panel.png")


def method_pictures(explainer, docs):
    """Each of OWN_PICTURES as `explain` draws it by default."""
    for method in OWN_PICTURES:
        result = explainer.explain(PHOTO, method=method)
        with tempfile.TemporaryDirectory() as tmp:
            written = write_figures([result], f"{tmp}/", RenderOptions())
            shutil.copyfile(written[method], docs / f"{method}.png")
        shrink(docs / f"{method}.png")
        print(docs / f"{method}.png")


def audit_screenshot(explainer, docs):
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                    "google-chrome"))), None)
    if chromium is None or not SHARED_IMAGES.is_dir():
        print("no chromium or no shared images: docs/audit.png not made", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(SHARED_IMAGES, tmp / "photos", ignore=shutil.ignore_patterns("*.md"))
        broken = tmp / "photos" / "inbox" / "broken.png"
        broken.parent.mkdir()
        broken.write_bytes((SHARED_IMAGES / "coffee.png").read_bytes()[:3000])
        here = Path.cwd()
        os.chdir(tmp)  # relative paths, as a user would type them, show on the page
        try:
            run_audit(explainer, ["photos"], ["gradient", "guided-backprop"], "audit")
        finally:
            os.chdir(here)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
                        "--hide-scrollbars", "--virtual-time-budget=5000",
                        f"--screenshot={docs / 'audit.png'}", "--window-size=1200,760",
                        (tmp / "audit" / "index.html").as_uri()],
                       check=True, capture_output=True)
    shrink(docs / "audit.png", palette=True)
    print(docs / "audit.png")


PICTURES = {"styles": style_pictures, "methods": method_pictures, "audit": audit_screenshot}


@click.command()
@click.option("--model", default=str(REPO / "models" / "googlenet.onnx"), show_default=True)
@click.option("--docs", default=str(REPO / "docs"), show_default=True)
@click.option("--only", multiple=True, type=click.Choice(list(PICTURES)),
              help="Make only these pictures (repeatable) [default: all].")
def main(model, docs, only):
    docs = Path(docs)
    docs.mkdir(exist_ok=True)
    explainer = Explainer(model)
    for name, make in PICTURES.items():
        if not only or name in only:
            make(explainer, docs)


if __name__ == "__main__":
    main()
