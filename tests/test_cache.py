"""The graph cache trusts nothing it finds on disk: an entry is used only when it is the entry
of this key with the bytes it was written with; anything else is rebuilt (and overwritten), and
a cache that cannot be written is a note, never a failure."""

import os
import shutil
import warnings

import numpy as np
import pytest

from onnxattr import Explainer
from onnxattr.errors import OnnxAttrNote
from onnxattr.graph.relu_rules import GUIDED, VANILLA

import small_models

W1 = next(t.raw_data for t in small_models.conv_relu_maxpool_lrn().graph.initializer
          if t.name == "w1")  # the first conv's weights, in every graph built from the model
PIXELS = np.random.default_rng(5).uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache_model")
    return small_models.save(small_models.conv_relu_maxpool_lrn(), folder / "m.onnx")


def attribution(model, cache, rule=VANILLA):
    """The gradient (with ReLU rule `rule`) of PIXELS for targets 0, 1 with a graph cache in
    `cache`."""
    engine = Explainer(model, cache_dir=cache, builder="native").engine
    return engine.gradient(PIXELS, [0, 1], rule=rule)[0]


@pytest.fixture(scope="module")
def fresh(model, tmp_path_factory):
    """The gradient and guided backprop, each from graphs built now; a cache holding only the
    gradient's entry."""
    cache = tmp_path_factory.mktemp("fresh")
    gradient = attribution(model, cache)
    [entry] = os.listdir(cache)
    guided = attribution(model, tmp_path_factory.mktemp("other"), GUIDED)
    assert not np.array_equal(gradient, guided)
    return gradient, guided, cache / entry


def damaged(fresh, tmp_path, damage):
    """A copy of the gradient's cache, its entry damaged by `damage(path)`."""
    cache = tmp_path / "cache"
    shutil.copytree(fresh[2].parent, cache)
    damage(cache / fresh[2].name)
    return cache, cache / fresh[2].name


def change_a_weight(path):
    """Give the first conv a different first weight: the entry still parses as a model."""
    data = path.read_bytes()
    assert W1[:4] in data
    path.write_bytes(data.replace(W1[:4], W1[4:8], 1))


@pytest.mark.parametrize("damage", [
    lambda path: path.write_bytes(b""),
    lambda path: path.write_bytes(b"\x08\x07"),  # parses as a model with no graph
    lambda path: path.write_bytes(path.read_bytes()[:-100]),
    lambda path: change_a_weight(path),
], ids=["empty", "2 bytes", "truncated", "a weight changed"])
def test_damaged_entry_is_rebuilt_and_overwritten(model, fresh, tmp_path, damage):
    cache, entry = damaged(fresh, tmp_path, damage)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged entry is repaired, nothing to say
        np.testing.assert_array_equal(attribution(model, cache), fresh[0])
    assert entry.read_bytes() == fresh[2].read_bytes()


def test_entry_of_another_key_is_not_used(model, fresh, tmp_path):
    """Guided backprop's entry copied over the gradient's: the gradient is built again."""
    other = tmp_path / "other"
    attribution(model, other, GUIDED)
    [guided_entry] = other.iterdir()
    cache, entry = damaged(fresh, tmp_path, lambda path: shutil.copy(guided_entry, path))
    np.testing.assert_array_equal(attribution(model, cache), fresh[0])
    assert entry.read_bytes() == fresh[2].read_bytes()


def test_unreadable_entry_is_rebuilt(model, fresh, tmp_path):
    cache, entry = damaged(fresh, tmp_path, lambda path: path.chmod(0))
    if os.access(entry, os.R_OK):
        pytest.skip("running as root: a mode-0 file is still readable")
    np.testing.assert_array_equal(attribution(model, cache), fresh[0])


def test_directory_at_the_entry_is_a_note(model, fresh, tmp_path):
    def directory(path):
        path.unlink()
        (path / "inside").mkdir(parents=True)
    cache, entry = damaged(fresh, tmp_path, directory)
    with pytest.warns(OnnxAttrNote, match=f"cannot write the graph cache entry {entry}"):
        np.testing.assert_array_equal(attribution(model, cache), fresh[0])
    assert (entry / "inside").is_dir()  # not ours to delete


def test_cache_directory_that_is_a_file_is_a_note(model, fresh, tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    with pytest.warns(OnnxAttrNote, match="cannot write the graph cache entry .* graphs are "
                                          "rebuilt"):
        np.testing.assert_array_equal(attribution(model, cache), fresh[0])
    assert cache.read_text() == "not a directory"


def test_read_only_cache_directory_is_a_note(model, fresh, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    if os.access(cache, os.W_OK):
        pytest.skip("running as root: a read-only directory is still writable")
    with pytest.warns(OnnxAttrNote, match="cannot write the graph cache entry"):
        np.testing.assert_array_equal(attribution(model, cache), fresh[0])
