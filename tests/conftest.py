"""Shared fixtures: the read-only shared data, the exported BVLC GoogLeNet, its torch reference."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STOCK_VENV = REPO / ".pytest_cache" / "stock-ort-venv"
# A runtime-only environment: stock onnxruntime (pinned: tests must not change with a release),
# onnxattr's other dependencies, and onnxattr from this checkout; no training build, no torch.
STOCK_PACKAGES = ["onnxruntime==1.32.0", "numpy==2.3.5", "onnx==1.23.2", "pillow==12.1.0",
                  "matplotlib==3.10.8", "click==8.3.1"]


GRADIENT_BUILDERS = ["onnxruntime", "native"]


@pytest.fixture(params=GRADIENT_BUILDERS)
def builder(request):
    """Each gradient builder in turn (onnxattr.graph.builders): tests of what both must do."""
    return request.param


def _main_checkout():
    """The main checkout of a git worktree (whose .git is a file naming its git directory),
    else this repository."""
    git = REPO / ".git"
    if git.is_file():
        text = git.read_text().strip()
        if text.startswith("gitdir:"):
            gitdir = (REPO / text.split(":", 1)[1].strip()).resolve()
            if gitdir.parent.name == "worktrees":  # <main>/.git/worktrees/<name>
                return gitdir.parent.parent.parent
    return REPO


@pytest.fixture(scope="session")
def shared_dir():
    """The shared data directory (../shared beside the repository, or beside the main checkout
    of a git worktree); skips when absent."""
    for path in dict.fromkeys([REPO.parent / "shared", _main_checkout().parent / "shared"]):
        if path.is_dir():
            return path
    pytest.skip(f"no shared data at {REPO.parent / 'shared'}")


@pytest.fixture(scope="session")
def googlenet_caffe_dir(shared_dir):
    """BVLC GoogLeNet in the Caffe layout onnxattr.io.caffe converts; skips when absent."""
    path = shared_dir / "models" / "bvlc_googlenet"
    if not (path / "deploy.prototxt").is_file():
        pytest.skip(f"no BVLC GoogLeNet at {path}")
    return path


@pytest.fixture(scope="session")
def googlenet_path(googlenet_caffe_dir, tmp_path_factory):
    """BVLC GoogLeNet exported once per session to ONNX; the file's path."""
    from onnxattr.io import caffe

    return caffe.export(googlenet_caffe_dir, tmp_path_factory.mktemp("models") / "googlenet.onnx")


@pytest.fixture(scope="session")
def torch_reference(googlenet_caffe_dir):
    """The float64 PyTorch model of BVLC GoogLeNet (tests/torch_googlenet.py)."""
    pytest.importorskip("torch")
    from torch_googlenet import build_reference

    return build_reference(googlenet_caffe_dir)


@pytest.fixture(scope="session")
def photos(shared_dir):
    """The shared photos (png and jpg), sorted by name."""
    paths = sorted(p for p in (shared_dir / "images").iterdir() if p.suffix in (".png", ".jpg"))
    if not paths:
        pytest.skip("no shared photos")
    return paths


@pytest.fixture(scope="session")
def googlenet(googlenet_path, tmp_path_factory):
    """An Explainer of the exported GoogLeNet with a graph cache of its own."""
    from onnxattr import Explainer

    return Explainer(googlenet_path, cache_dir=tmp_path_factory.mktemp("googlenet_cache"))


@pytest.fixture
def small_classifier(tmp_path, monkeypatch):
    """(tmp_path, a small labelled classifier's path, a photo for it); a private graph cache."""
    from onnx import helper

    import small_models

    monkeypatch.setenv("ONNXATTR_CACHE", str(tmp_path / "cache"))
    model = small_models.conv_relu_maxpool_lrn()
    helper.set_model_props(model, {"onnxattr.labels": json.dumps(small_models.LABELS),
                                   "onnxattr.input": json.dumps({"range": [0, 255]})})
    model_path = small_models.save(model, tmp_path / "small.onnx")
    return tmp_path, model_path, small_models.random_photo(tmp_path / "photo.png")


def _stock_interpreter():
    """Python 3.13 where one is installed and runs (onnxattr must install there; pyenv's shim
    may name one it cannot run), else this one."""
    found = [shutil.which("python3.13"), *sorted(map(str, Path.home().glob(
        ".pyenv/versions/3.13*/bin/python3.13")))]
    for candidate in filter(None, found):
        if subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    return sys.executable


def _pip(python, *args):
    return subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def stock_python():
    """Python of a virtual environment (kept in .pytest_cache) where onnxattr is installed
    from this checkout with stock onnxruntime and no training build: on Python 3.13, through
    pyproject's own dependencies (pinned by STOCK_PACKAGES as constraints). Skips when pip
    cannot install them."""
    interpreter = _stock_interpreter()
    wanted = {"interpreter": interpreter, "packages": STOCK_PACKAGES,
              "pyproject": (REPO / "pyproject.toml").read_text()}

    def install(python):
        constraints = STOCK_VENV / "constraints.txt"
        constraints.write_text("\n".join(STOCK_PACKAGES) + "\n")
        version = subprocess.run([str(python), "-c", "import sys; print(sys.version_info >= "
                                  "(3, 13))"], capture_output=True, text=True).stdout.strip()
        if version == "True":  # pyproject's markers pick stock onnxruntime on 3.13
            return _pip(python, "-c", str(constraints), "-e", str(REPO))
        done = _pip(python, *STOCK_PACKAGES)
        return done if done.returncode else _pip(python, "--no-deps", "-e", str(REPO))

    return _kept_venv(STOCK_VENV, interpreter, wanted, install)


def _kept_venv(venv, interpreter, wanted, install):
    """The Python of virtual environment `venv`: kept while its marker says it holds `wanted`,
    else made anew with `interpreter` and `install(python)` (a pip run); skips when pip fails."""
    python, marker = venv / "bin" / "python", venv / "onnxattr-installed.json"
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return python
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
    done = install(python)
    if done.returncode:
        pytest.skip(f"pip cannot install {venv.name}: {done.stderr.strip().splitlines()[-1:]}")
    marker.write_text(json.dumps(wanted))
    return python


# The exporter frameworks' own environments (docs/bring-your-model.md), kept out of .venv so that
# they never mix with the training build: .venv-NAME in the repository, ignored by git.
FRAMEWORKS = {"tf": ["tensorflow-cpu==2.21.0", "keras==3.15.1", "tf2onnx==1.17.0"],
              "jax": ["jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "jax2onnx==0.17.1"]}


@pytest.fixture(scope="session")
def framework_python():
    """get(name) -> the Python of .venv-NAME, an environment with one of FRAMEWORKS: made here
    (minutes, then kept) when $ONNXATTR_MAKE_VENVS names it (scripts/test.sh: jax), else the one
    already there (as the page makes it by hand); skips with the way to make it when absent."""
    def get(name):
        venv, wanted = REPO / f".venv-{name}", FRAMEWORKS[name]
        python = venv / "bin" / "python"
        asked = name in os.environ.get("ONNXATTR_MAKE_VENVS", "").split(",")
        if not asked and python.is_file():
            return python
        if not asked:
            pytest.skip(f"no {venv.name}: set ONNXATTR_MAKE_VENVS={name} to make it here, or "
                        f"python3 -m venv {venv.name} && {venv.name}/bin/pip install "
                        + " ".join(wanted))
        return _kept_venv(venv, sys.executable, wanted, lambda python: _pip(python, *wanted))

    return get


# pip or npm install on their first use
NETWORK_FIXTURES = {"stock_python", "node_example", "framework_python"}


def pytest_collection_modifyitems(items):
    """Mark the tests that need a package registry (through their fixtures) `network`."""
    for item in items:
        if NETWORK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.network)


@pytest.fixture(scope="session")
def googlenet_float32(torch_reference, googlenet_path, photos):
    """GoogLeNet's float32 error (tests/tolerance.py): float32 PyTorch of the same network
    against float64, on every photo's top-1 class under each ReLU rule (vanilla, guided,
    zeiler-fergus), the largest relative L2. Returns (error, {rule: (targets, float64
    attributions)}) so that tests reuse the float64 references."""
    import copy

    import numpy as np
    import torch
    from test_relu_rules import relu_modules_rule, torch_attribution

    from onnxattr.io.image import load_pixels

    from tolerance import rel_l2

    pixels = np.stack([load_pixels(p, (224, 224)) for p in photos])
    with torch.no_grad():
        targets = torch_reference(torch.from_numpy(pixels).double()).argmax(1).numpy()
    errors, references = [], {}
    for rule in ("vanilla", "guided", "zeiler-fergus"):
        with relu_modules_rule(torch_reference, rule):
            want = torch_attribution(torch_reference, pixels, targets)
            got = torch_attribution(copy.deepcopy(torch_reference).float(), pixels, targets,
                                    dtype=torch.float32)
        errors += [rel_l2(g, w) for g, w in zip(got, want)]
        references[rule] = (targets, want)
    print(f"\nGoogLeNet float32 errors (PyTorch float32 vs float64, photos x rules): "
          f"{' '.join(f'{e:.1e}' for e in errors)}")
    return max(errors), references
