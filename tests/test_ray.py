"""The audit on Ray Data (app/ray_audit.py) against the local audit, on one local Ray cluster
for the module: the same maps bit for bit and the same summary rows, with a worker killed on
the way (Ray redoes its batch), resume, and the embeddable stage (onnxattr.ray.Attribute).
Every wait on Ray runs under an alarm, so a stuck cluster fails the test instead of hanging."""

import contextlib
import csv
import importlib
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
from test_cli import assert_one_line_error, run_cli

from onnxattr import Explainer, run_audit
from onnxattr.app import ray_audit, report
from onnxattr.app.report import collect_inputs, image_key
from onnxattr.ray import Attribute

import small_models

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
METHODS = ["gradient"]
AS_THE_CLI = {method: {} for method in METHODS}  # the method options the CLI records
IMAGES = 12
RAY_TIMEOUT_S = 180


@contextlib.contextmanager
def deadline(seconds=RAY_TIMEOUT_S):
    """Fail (TimeoutError) instead of waiting on Ray for more than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"Ray took over {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model, a dozen small photos, and the local audit of them."""
    tmp = tmp_path_factory.mktemp("ray")
    model = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp / "m.onnx")
    for i in range(IMAGES):
        small_models.random_photo(tmp / "photos" / f"p{i:02d}.png", seed=i)
    explainer = Explainer(model, cache_dir=tmp / "cache")
    local = run_audit(explainer, [tmp / "photos"], METHODS, tmp / "local",
                      method_options=AS_THE_CLI)
    return tmp, explainer, local


@pytest.fixture(scope="module")
def cluster(work):
    """One local Ray cluster (2 CPUs) for the module; its workers see the kill marker's name."""
    marker = work[0] / "kill-marker"
    os.environ[ray_audit.KILL_MARKER] = str(marker)  # before ray.init: the workers inherit it
    try:
        with deadline():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield marker
    finally:
        ray.shutdown()
        os.environ.pop(ray_audit.KILL_MARKER, None)


def without_times(entry):
    return {**entry, "methods": {m: {k: v for k, v in r.items() if k != "time_s"}
                                 for m, r in entry["methods"].items()}}


def assert_same_audit(tmp, local, out_dir):
    """Every map bit-equal to the local audit's, the summary the same but for the timings."""
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["counts"]["done"] == IMAGES == len(local["images"])
    assert list(map(without_times, summary["images"])) == list(map(without_times, local["images"]))
    for entry in local["images"]:
        for method in METHODS:
            npy = entry["methods"][method]["npy"]
            assert np.array_equal(np.load(tmp / "local" / npy), np.load(out_dir / npy)), npy
    return summary


def test_cli_ray_audit_equals_the_local_one_with_a_worker_killed(work, cluster, monkeypatch,
                                                                   capsys):
    """`onnxattr audit DIR --engine ray --workers 2`: a worker kills itself on its first image
    (the marker), Ray restarts it and redoes the batch; every map equals the local audit's."""
    tmp, explainer, local = work
    cluster.write_text("kill one worker")
    out_dir = tmp / "ray-cli"
    with deadline():
        code, out, err = run_cli(monkeypatch, capsys, "audit", tmp / "photos", "--model",
                                 explainer.model_path, "--methods", ",".join(METHODS), "--out",
                                 out_dir, "--engine", "ray", "--workers", 2)
    assert code == 0, err
    assert not cluster.exists()  # a worker died on it
    assert f"{IMAGES} done (0 from an earlier run), 0 failed" in out
    assert_same_audit(tmp, local, out_dir)
    with open(out_dir / "summary.csv", newline="") as a, open(tmp / "local" / "summary.csv",
                                                              newline="") as b:
        ray_rows, local_rows = list(csv.reader(a)), list(csv.reader(b))
    timed = [i for i, name in enumerate(local_rows[0]) if name.endswith("_time_s")]
    assert [[c for i, c in enumerate(r) if i not in timed] for r in ray_rows] == \
        [[c for i, c in enumerate(r) if i not in timed] for r in local_rows]
    table = ray_audit.parquet.read_table(out_dir / "summary.parquet").to_pylist()
    assert len(table) == IMAGES * len(METHODS)
    assert {(r["key"], r["method"], r["status"], r["npy"]) for r in table} == {
        (e["key"], m, "done", e["methods"][m]["npy"]) for e in local["images"] for m in METHODS}


def test_ray_resume_redoes_only_what_is_missing(work, cluster):
    tmp, explainer, local = work
    out_dir = tmp / "ray-resume"
    shutil.copytree(tmp / "local", out_dir)
    lost = local["images"][3]
    (out_dir / lost["methods"]["gradient"]["npy"]).unlink()
    with deadline():
        summary = run_audit(explainer, [tmp / "photos"], METHODS, out_dir, resume=True,
                            method_options=AS_THE_CLI, engine="ray", workers=1)
    assert summary["counts"] == {"images": IMAGES, "done": IMAGES, "failed": 0,
                                 "skipped": IMAGES - 1}
    assert_same_audit(tmp, local, out_dir)


def test_a_worker_that_cannot_write_stops_the_audit_with_one_line(work, cluster):
    """A worker's WriteError (here: a file where the image's folder goes) ends the Ray audit as
    it ends the local one: OnnxAttrError naming the file, what was written kept."""
    tmp, explainer, _ = work
    photo = tmp / "photos" / "p00.png"
    out_dir = tmp / "ray-blocked"
    out_dir.mkdir()
    (out_dir / image_key(photo)).write_text("in the way")
    with deadline(), pytest.raises(report.OnnxAttrError) as info:
        run_audit(explainer, [photo], METHODS, out_dir, engine="ray", workers=1)
    assert str(info.value).startswith(f"cannot write {out_dir / image_key(photo)}/")
    assert str(info.value).endswith("; no image was written")
    assert (out_dir / image_key(photo)).read_text() == "in the way"


def test_a_batch_whose_worker_always_dies_stops_the_audit_with_one_line(work, cluster):
    """Ray Data alone would restart the worker and retry its batch forever: after MAX_RETRIES
    the audit stops with one line (the marker says "always": every try ends the process)."""
    tmp, explainer, _ = work
    cluster.write_text("always")
    try:
        with deadline(), pytest.raises(report.OnnxAttrError) as info:
            run_audit(explainer, [tmp / "photos" / "p00.png"], ["gradient"], tmp / "ray-dies",
                      engine="ray", workers=1)
    finally:
        cluster.unlink(missing_ok=True)
    assert str(info.value).startswith(
        f"a Ray worker died on each of {ray_audit.MAX_RETRIES + 1} tries of one batch (")
    assert "\n" not in str(info.value)


def test_attribute_stage_in_a_ray_data_pipeline(work, cluster):
    """onnxattr.ray.Attribute in map_batches gives each row the Explainer's own results (one
    batch of the three images, as the Explainer's: a batched run's numbers are its own)."""
    tmp, explainer, _ = work
    paths = [str(p) for p in sorted((tmp / "photos").glob("*.png"))[:3]]
    with deadline():
        rows = ray.data.from_items([{"path": p} for p in paths]).map_batches(
            Attribute, fn_constructor_kwargs={"model": explainer.model_path, "methods": METHODS,
                                              "threads": 1},
            concurrency=1, batch_size=len(paths), num_cpus=0.5).take_all()
    assert [r["path"] for r in rows] == paths
    for method in METHODS:
        for row, expected in zip(rows, explainer.explain(paths, method)):
            assert np.array_equal(row[method], expected.attribution)
            assert np.array_equal(row[f"{method}_map"], expected.map)
            assert (row["class_index"], row["score"]) == (expected.class_index,
                                                          np.float32(expected.score))


def test_lists_of_paths_are_inputs(work, tmp_path):
    """A CSV or Parquet file with a `path` column lists the images (relative to the list)."""
    tmp = work[0]
    names = ["p03.png", "p01.png"]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{tmp}/photos/{n},x\n"
                                                                for n in names))
    ray_audit.parquet.write_table(ray_audit.pyarrow.table({"path": [f"photos/{n}" for n in names]}),
                                  tmp / "list.parquet")
    assert [p.name for p in collect_inputs([tmp_path / "list.csv"])] == names
    assert [p.name for p in collect_inputs([tmp / "list.parquet"])] == names
    assert [p.name for p in collect_inputs([f"{tmp}/photos/p0[12].png"])] == ["p01.png", "p02.png"]
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(report.OnnxAttrError, match="no 'path' column"):
        collect_inputs([tmp_path / "bad.csv"])


def test_engine_ray_without_ray_says_how_to_install_it(work, monkeypatch, capsys):
    tmp, explainer, _ = work
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    importlib.reload(ray_audit)
    try:
        code, _, err = run_cli(monkeypatch, capsys, "audit", tmp / "photos", "--model",
                               explainer.model_path, "--out", tmp / "no-ray", "--engine", "ray")
    finally:
        monkeypatch.undo()
        importlib.reload(ray_audit)
    assert_one_line_error(code, err, "pip install 'onnxattr[ray]'")
