"""Memory: one copy of the model's weights per process, whatever the number of graphs,
sessions and methods (onnxattr.io.weights; docs/scale.md)."""

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnxattr import Explainer
from onnxattr.errors import OnnxAttrError
from onnxattr.graph.builders import MemoryCache
from onnxattr.graph.engine import AttributionEngine
from onnxattr.io.model import load_model
from onnxattr.io.weights import SharedWeights

import small_models

WEIGHT_MB = 48  # one Gemm weight [4096, 3072]: the model is nearly all this one tensor


def wide_model():
    """Flatten -> Gemm (48 MB) -> Relu -> the 5-class head, on images [N, 3, 32, 32]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Flatten", ["image"], ["f0"], name="flatten"),
             helper.make_node("Gemm", ["f0", "wide_w"], ["h"], name="wide", transB=1),
             helper.make_node("Relu", ["h"], ["f"], name="relu")]
    wide = (rng.standard_normal((4096, 3 * 32 * 32)) * 0.02).astype(np.float32)
    return small_models.classifier(nodes, {"wide_w": wide, "__features__": 4096}, "f",
                                   size=(32, 32))


def test_weights_are_not_copied_per_graph_and_session(tmp_path):
    """In a child process: RSS growth after an Explainer ran gradient, guided backprop and
    integrated gradients (a forward graph and three gradient graphs, each run on one session
    and integrated gradients' on two more) stays under 4x the weights: the model as loaded,
    the shared weights and passing copies while a graph is built. Each graph and session
    holding its own copy (and a prepacked one) grew by 12x."""
    path = small_models.save(wide_model(), tmp_path / "wide.onnx")
    script = textwrap.dedent(f"""
        import numpy as np
        from onnxattr import Explainer
        def rss():
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * 4096
        photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
        before = rss()
        explainer = Explainer({str(path)!r}, cache_dir={str(tmp_path / "cache")!r},
                              builder="native", threads=2, workers=2)
        for method, options in (("gradient", {{}}), ("guided-backprop", {{}}),
                                ("integrated-gradients", {{"steps": 16}})):
            explainer.explain(photo, method, **options)
        print((rss() - before) / 2 ** 20)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = float(done.stdout.split()[-1])
    assert growth < 4 * WEIGHT_MB, f"RSS grew by {growth:.0f} MB for {WEIGHT_MB} MB of weights"


def test_the_loaded_model_references_the_shared_weights_instead_of_holding_them(tmp_path):
    """The loaded model's proto is a few kilobytes (it held the 48 MB weight beside the
    shared arrays); full_proto() gives the model back with its weights."""
    model = wide_model()
    classifier = load_model(small_models.save(model, tmp_path / "wide.onnx"))
    assert classifier.proto.ByteSize() < 2 ** 20
    full = {t.name: t for t in classifier.full_proto().graph.initializer}
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(full[tensor.name]),
                                      numpy_helper.to_array(tensor))


def test_a_pickled_model_references_the_arrays_of_the_process_that_reads_it(tmp_path):
    """A loaded model sent to another process gets its references pointed at the arrays
    unpickled there (they pointed at the sender's memory)."""
    classifier = load_model(small_models.save(wide_model(), tmp_path / "wide.onnx"))
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 3, 32, 32)).astype(np.float32)
    want = AttributionEngine(classifier, cache=MemoryCache()).forward(pixels)[1]
    script = textwrap.dedent(f"""
        import pickle, sys
        import numpy as np
        from onnxattr.graph.builders import MemoryCache
        from onnxattr.graph.engine import AttributionEngine
        classifier, pixels = pickle.loads(sys.stdin.buffer.read())
        np.save({str(tmp_path / "got.npy")!r},
                AttributionEngine(classifier, cache=MemoryCache()).forward(pixels)[1])
    """)
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps((classifier, pixels)),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), want)


def test_cache_entries_reference_the_weights_and_another_engine_reads_them(tmp_path):
    """A native gradient graph in the cache holds references to the shared weights, not the
    weights (48 MB each before); a second Explainer, whose arrays lie elsewhere, reads the
    entries and gets the same map."""
    path = small_models.save(wide_model(), tmp_path / "wide.onnx")
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    maps = [Explainer(path, cache_dir=tmp_path / "cache", builder="native")
            .explain(photo, "guided-backprop").attribution for _ in range(2)]
    entries = list((tmp_path / "cache").iterdir())
    assert entries and max(e.stat().st_size for e in entries) < 2 ** 20
    np.testing.assert_array_equal(maps[0], maps[1])


def test_a_reference_to_weights_the_model_lacks_is_refused():
    model = wide_model()
    weights = SharedWeights(model)
    stripped, names = weights.strip(model)
    assert "wide_w" in names
    restored = {t.name: t for t in weights.restore(weights.repoint(stripped)).graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(restored["wide_w"]),
                                  weights.arrays["wide_w"])
    next(t for t in stripped.graph.initializer if t.name == "wide_w").name = "other_w"
    with pytest.raises(OnnxAttrError, match="references weights 'other_w'"):
        weights.repoint(stripped)


def test_cpu_sessions_share_one_memory_arena():
    """Every CPU session allocates from the process's one arena: each session's own arena
    kept its largest run's activations (sessions x graphs x methods of them)."""
    from onnxattr.graph.runtime import make_session

    model = small_models.classifier([helper.make_node("Flatten", ["image"], ["f"])],
                                    {"__features__": 3 * 32 * 32}, "f", size=(32, 32))
    options = make_session(model).get_session_options()
    assert options.get_session_config_entry("session.use_env_allocators") == "1"


def test_native_forward_graphs_reference_the_weights(tmp_path):
    """The native builder's forward graph (and the forward session's) is prepared from the
    model with its weights as references: no full copy of the 48 MB per graph prepared."""
    explainer = Explainer(small_models.save(wide_model(), tmp_path / "wide.onnx"),
                          cache_dir=tmp_path / "cache", builder="native")
    assert explainer.engine.forward_graph(layer="h").ByteSize() < 2 ** 20
