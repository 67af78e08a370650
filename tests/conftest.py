"""Shared fixtures: the read-only shared data, the exported BVLC GoogLeNet, its torch reference."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    """BVLC GoogLeNet in the Caffe layout onnxattr.caffe converts; skips when absent."""
    path = shared_dir / "models" / "bvlc_googlenet"
    if not (path / "deploy.prototxt").is_file():
        pytest.skip(f"no BVLC GoogLeNet at {path}")
    return path


@pytest.fixture(scope="session")
def googlenet_path(googlenet_caffe_dir, tmp_path_factory):
    """BVLC GoogLeNet exported once per session to ONNX; the file's path."""
    from onnxattr import caffe

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
    import json

    from onnx import helper

    import small_models

    monkeypatch.setenv("ONNXATTR_CACHE", str(tmp_path / "cache"))
    model = small_models.conv_relu_maxpool_lrn()
    helper.set_model_props(model, {"onnxattr.labels": json.dumps(small_models.LABELS)})
    model_path = small_models.save(model, tmp_path / "small.onnx")
    return tmp_path, model_path, small_models.random_photo(tmp_path / "photo.png")
