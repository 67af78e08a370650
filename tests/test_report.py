"""Rendering options reaching render.py (CLI and API), and the audit: summary, resume, the page.

The numbers of each reduction, sign, clipping and style are tested in test_render.py; here only
the wiring. The audit runs on GoogLeNet with the shared photos, a truncated PNG and a text file,
and its page is opened in headless Chromium (skipped only when no Chromium is installed).
"""

import csv
import errno
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import run_cli

from onnxattr import Explainer
from onnxattr.app.cli import main
from onnxattr.app.report import collect_inputs, csv_rows, image_key, run_audit
from onnxattr.io import render
from onnxattr.io.files import LOCK_NAME, TEMPORARY_NAME, atomic_path
from onnxattr.methods.figures import RenderOptions

from small_models import random_photo

SCREENSHOT_COPY = "/tmp/audit_page.png"


def error_lines(err):
    return [line for line in err.splitlines()
            if line.strip() and "explaining" not in line and "auditing" not in line]


# --- rendering options: API and flags -----------------------------------------------------------

FLAGS = ["--reduction", "max-abs", "--sign", "positive", "--clip", "outlier-mass",
         "--clip-value", "5", "--cmap", "viridis", "--style", "overlay", "--alpha", "0.3"]
EXPECTED_MAP = {"reduction": "max-abs", "sign": "positive", "clip": "outlier-mass",
                "clip_value": 5.0}
EXPECTED_STYLE = {"style": "overlay", "cmap": "viridis", "alpha": 0.3, "signed": False}


def record_calls(monkeypatch):
    """Wrap render.attribution_map and render.styled; returns their recorded keyword args."""
    calls = {"map": [], "styled": []}
    real_map, real_styled = render.attribution_map, render.styled

    def attribution_map(attribution, **kwargs):
        calls["map"].append(kwargs)
        return real_map(attribution, **kwargs)

    def styled(map_, photo=None, **kwargs):
        calls["styled"].append(kwargs)
        return real_styled(map_, photo, **kwargs)

    monkeypatch.setattr(render, "attribution_map", attribution_map)
    monkeypatch.setattr(render, "styled", styled)
    return calls


@pytest.mark.parametrize("command", ["explain", "audit"])
def test_render_flags_reach_render(small_classifier, monkeypatch, capsys, command):
    tmp_path, model, photo = small_classifier
    calls = record_calls(monkeypatch)
    extra = ["--panel"] if command == "explain" else []
    code, _, err = run_cli(monkeypatch, capsys, command, photo, "--model", model, "--out",
                           tmp_path / "out", *FLAGS, *extra)
    assert code == 0, err
    # the early check, the method's figure and the panel: every call with the flags' values
    assert len(calls["map"]) >= 2 and len(calls["styled"]) >= 2
    assert all(call == EXPECTED_MAP for call in calls["map"])
    assert all(call == EXPECTED_STYLE for call in calls["styled"])


def test_default_flags_draw_the_example_map(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    calls = record_calls(monkeypatch)
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--out",
                           tmp_path / "out")
    assert code == 0, err
    assert calls["map"][-1] == {"reduction": "sum", "sign": "absolute", "clip": "none",
                                "clip_value": None}
    assert calls["styled"][-1] == {"style": "map", "cmap": "white-black", "alpha": 0.5,
                                   "signed": False}


def test_explanation_render_is_render_py(small_classifier):
    tmp_path, model, photo = small_classifier
    r = Explainer(model, cache_dir=tmp_path / "cache").explain(photo)
    assert np.array_equal(r.render(), render.colorize(r.map))  # the defaults: the example's map
    got = r.render(reduction="max-abs", sign="all", clip="percentile", clip_value=90,
                   cmap="coolwarm", style="overlay", alpha=0.7)
    want = render.styled(render.attribution_map(r.attribution, "max-abs", "all", "percentile",
                                                90), r.photo, "overlay", "coolwarm", 0.7, True)
    assert got.dtype == np.uint8 and got.shape == r.photo.shape
    assert np.array_equal(got, want)
    masked = r.render(style="masked")
    assert np.array_equal(masked, render.styled(r.map, r.photo, "masked"))


@pytest.mark.parametrize("flags, fragment", [
    (["--reduction", "mean"], "unknown reduction 'mean'"),
    (["--sign", "pos"], "unknown sign 'pos'"),
    (["--clip", "top"], "unknown clip 'top'"),
    (["--clip", "percentile", "--clip-value", "150"], "clip value for 'percentile'"),
    (["--clip-value", "lots"], "--clip-value must be a number, got 'lots'"),
    (["--cmap", "nosuchmap"], "unknown colormap 'nosuchmap'"),
    (["--style", "masked", "--cmap", "nosuchmap"], "unknown colormap 'nosuchmap'"),
    (["--style", "heat"], "unknown style 'heat'"),
    (["--alpha", "2"], "alpha must be a number in [0, 1]"),
    (["--alpha", "half"], "--alpha must be a number, got 'half'"),
])
@pytest.mark.parametrize("command", ["explain", "audit"])
def test_bad_render_flags_are_one_line_errors(small_classifier, monkeypatch, capsys, command, flags,
                                              fragment):
    tmp_path, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, command, photo, "--model", model, "--out",
                           tmp_path / "out", *flags)
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # checked before any work


def test_audit_unknown_method_is_one_line(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "audit", photo, "--model", model, "--methods",
                           "gradient,saliency", "--out", tmp_path / "out")
    assert code == 1
    assert error_lines(err) == [error_lines(err)[0]] and "unknown method 'saliency'" in err


def test_render_options_reject_bad_values_before_work():
    with pytest.raises(Exception, match="unknown sign"):
        RenderOptions(sign="up").check()


# --- the audit on small models: inputs, collisions, resume -------------------------------------


def test_inputs_recursive_by_extension_and_named_files(tmp_path):
    photos = tmp_path / "photos"
    (photos / "deep" / "deeper").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    wanted = [photos / "a.PNG", photos / "deep" / "b.jpeg", photos / "deep" / "deeper" / "c.webp"]
    for path in wanted + [photos / ".hidden" / "d.png", photos / ".e.png"]:
        path.write_bytes(b"x")
    (photos / "notes.txt").write_text("not an image")
    (photos / "out").mkdir()
    (photos / "out" / "old.png").write_bytes(b"x")  # our own outputs are never inputs
    named = tmp_path / "named.txt"
    named.write_text("tried anyway")
    found = collect_inputs([photos, named, photos / "a.PNG", tmp_path / "missing.png"],
                           exclude=photos / "out")
    assert found == [photos / "a.PNG", photos / "deep" / "b.jpeg",
                     photos / "deep" / "deeper" / "c.webp", named, tmp_path / "missing.png"]


def test_same_stems_in_different_folders_do_not_collide(small_classifier):
    tmp_path, model, _ = small_classifier
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = random_photo(tmp_path / "one" / "cat.png", seed=1)
    second = random_photo(tmp_path / "two" / "cat.png", seed=2)
    assert image_key(first) != image_key(second)
    explainer = Explainer(model, cache_dir=tmp_path / "cache")
    summary = run_audit(explainer, [tmp_path / "one", tmp_path / "two"], ["gradient"],
                        tmp_path / "out")
    keys = [e["key"] for e in summary["images"]]
    assert len(set(keys)) == 2 and all(k.startswith("cat-") for k in keys)
    for entry, source in zip(summary["images"], [first, second]):
        assert entry["status"] == "done" and entry["file"] == str(source)
        saved = np.load(tmp_path / "out" / entry["methods"]["gradient"]["npy"])
        assert np.array_equal(saved, explainer.explain(source).attribution)


def test_a_list_of_uris_is_audited_through_pyarrow(small_classifier, monkeypatch, capsys):
    """A CSV list may name images by URI (here file://, read by pyarrow's filesystems as s3://
    or gs:// would be): audited like the same files named by path, keyed on the URI; a URI that
    names nothing is a failed entry with its one-line reason. The command line takes URIs too
    (its "//" kept)."""
    pytest.importorskip("pyarrow")
    tmp_path, model, _ = small_classifier
    photo = random_photo(tmp_path / "cat.png", seed=1)
    missing = (tmp_path / "gone.png").as_uri()
    (tmp_path / "list.csv").write_text(f"path\n{photo.as_uri()}\ncat.png\n{missing}\n")
    assert collect_inputs([tmp_path / "list.csv"]) == [photo.as_uri(), photo, missing]
    explainer = Explainer(model, cache_dir=tmp_path / "cache")
    summary = run_audit(explainer, [tmp_path / "list.csv"], ["gradient"], tmp_path / "out")
    by_uri, by_path, gone = summary["images"]
    assert by_uri["file"] == photo.as_uri() and by_uri["key"] != by_path["key"]
    assert by_uri["status"] == by_path["status"] == "done"
    assert np.array_equal(*(np.load(tmp_path / "out" / e["methods"]["gradient"]["npy"])
                            for e in (by_uri, by_path)))
    assert gone["status"] == "failed" and gone["error"] == f"{missing}: not found"
    code, _, err = run_cli(monkeypatch, capsys, "audit", photo.as_uri(), "--model", model,
                           "--out", tmp_path / "cli")
    assert code in (0, None), err
    entries = json.loads((tmp_path / "cli" / "summary.json").read_text())["images"]
    assert [(e["file"], e["key"], e["status"]) for e in entries] == [
        (photo.as_uri(), by_uri["key"], "done")]


def test_resume_skips_done_images_and_redoes_the_rest(small_classifier, monkeypatch):
    tmp_path, model, _ = small_classifier
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        random_photo(photos / f"p{i}.png", seed=i)
    (photos / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    explainer = Explainer(model, cache_dir=tmp_path / "cache")
    calls = []
    real_explain = explainer.explain
    monkeypatch.setattr(explainer, "explain",
                        lambda image, **kw: calls.append(kw["method"]) or real_explain(image, **kw))
    out = tmp_path / "out"
    methods = ["gradient", "guided-backprop"]
    first = run_audit(explainer, [photos], methods, out)
    assert first["counts"] == {"images": 4, "done": 3, "failed": 1, "skipped": 0}
    assert len(calls) == 6
    done = [e for e in first["images"] if e["status"] == "done"]
    # one image's output went missing and one's summary entry says failed: both are redone
    (out / done[0]["methods"]["gradient"]["png"]).unlink()
    calls.clear()
    again = run_audit(explainer, [photos], methods, out, resume=True)
    assert again["counts"] == {"images": 4, "done": 3, "failed": 1, "skipped": 2}
    assert len(calls) == 2  # only the image with the missing file
    assert (out / done[0]["methods"]["gradient"]["png"]).is_file()
    # other settings (another style) make nothing reusable; without --resume all is redone
    calls.clear()
    run_audit(explainer, [photos], methods, out, RenderOptions(style="overlay"), resume=True)
    assert len(calls) == 6
    calls.clear()
    run_audit(explainer, [photos], methods, out)
    assert len(calls) == 6


def test_interrupted_audit_keeps_the_summary_of_what_was_done(small_classifier, monkeypatch):
    tmp_path, model, _ = small_classifier
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        random_photo(photos / f"p{i}.png", seed=i)
    explainer = Explainer(model, cache_dir=tmp_path / "cache")
    real_explain, count = explainer.explain, []

    def explain(image, **kwargs):
        count.append(1)
        if len(count) == 2:
            raise KeyboardInterrupt
        return real_explain(image, **kwargs)

    monkeypatch.setattr(explainer, "explain", explain)
    with pytest.raises(KeyboardInterrupt):
        run_audit(explainer, [photos], ["gradient"], tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [e["status"] for e in summary["images"]] == ["done"]
    leftovers = [p for p in (tmp_path / "out").rglob("*") if TEMPORARY_NAME.fullmatch(p.name)]
    assert leftovers == []  # no temporary (half-written) file left behind
    monkeypatch.setattr(explainer, "explain", real_explain)
    count.clear()
    resumed = run_audit(explainer, [photos], ["gradient"], tmp_path / "out", resume=True)
    assert resumed["counts"]["skipped"] == 1 and resumed["counts"]["done"] == 3


def test_all_done_exits_zero(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    code, out, err = run_cli(monkeypatch, capsys, "audit", photo, "--model", model, "--out",
                             tmp_path / "out")
    assert code == 0, err
    assert "1 done" in out and "0 failed" in out


def test_audit_passes_method_flags_to_the_methods_that_take_them(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "audit", photo, "--model", model, "--out", out,
                           "--methods", "gradient,integrated-gradients", "--steps", "3",
                           "--rule", "riemann_middle")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["method_options"] == {
        "gradient": {}, "integrated-gradients": {"steps": 3, "rule": "riemann_middle"}}
    record = summary["images"][0]["methods"]["integrated-gradients"]
    assert record["status"] == "done" and "relative_convergence_delta" in record
    code, _, err = run_cli(monkeypatch, capsys, "audit", photo, "--model", model, "--out", out,
                           "--methods", "gradient", "--steps", "3")
    assert code == 1 and "--steps does not apply to gradient" in err


def files_in(folder):
    """{relative path: (bytes, mtime)} of every file under `folder`."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Another process holding the output folder's lock, as a second audit would.
HOLD_LOCK = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def test_one_audit_at_a_time_per_output_folder(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    out = tmp_path / "out"
    audit = ("audit", photo, "--model", model, "--out", out)
    code, _, err = run_cli(monkeypatch, capsys, *audit)
    assert code == 0, err
    before = files_in(out)
    with subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)],
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "held\n"
            code, _, err = run_cli(monkeypatch, capsys, *audit, "--resume")
            assert code == 1
            lines = error_lines(err)
            assert len(lines) == 1 and "Traceback" not in err, err
            assert lines[0].startswith("error: another") and str(out) in lines[0]
            assert files_in(out) == before  # the second run wrote nothing
        finally:
            holder.kill()  # kill -9: the lock goes with the process, nothing stale stays
    code, _, err = run_cli(monkeypatch, capsys, *audit, "--resume")
    assert code == 0, err


@pytest.mark.parametrize("resume", [False, True])
def test_audit_removes_temporaries_of_a_killed_run(small_classifier, resume):
    tmp_path, model, photo = small_classifier
    out = tmp_path / "out"
    explainer = Explainer(model, cache_dir=tmp_path / "cache")
    folder = out / run_audit(explainer, [photo], ["gradient"], out)["images"][0]["key"]
    # a run killed (kill -9) inside atomic_path's block never removes its temporary
    pending = [atomic_path(path) for path in (out / "summary.json", folder / "panel.png",
                                              folder / "gradient.npy", out / "other" / "x.png")]
    leftovers = [writing.__enter__() for writing in pending]
    for path in leftovers:
        path.write_bytes(b"half written")
    assert all(TEMPORARY_NAME.fullmatch(path.name) for path in leftovers)
    others = [out / ".notes.txt", folder / "panel.0123abcd.tmp.png", out / ".x.png"]
    for path in others:
        path.write_bytes(b"not ours")
    summary = run_audit(explainer, [photo], ["gradient"], out, resume=resume)
    assert summary["counts"]["done"] == 1 and summary["counts"]["skipped"] == int(resume)
    assert not any(path.exists() for path in leftovers)
    assert all(path.read_bytes() == b"not ours" for path in others)
    assert (folder / "panel.png").is_file() and (out / "summary.json").is_file()
    del pending


def test_atomic_path_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "new" / "x.png") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "x.png").stat().st_mode & 0o777 == 0o640


def fail_on(monkeypatch, module, name, call, error, when=lambda *args: True):
    """Make `module.name` raise `error` on its `call`-th call (1-based) among those `when`
    accepts."""
    real, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        if when(*args):
            calls.append(args)
            if len(calls) == call:
                raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing, error, reason", [
    ("npy", ENOSPC, "No space left on device"),
    ("npy", OSError("150528 requested and 116704 written"), "150528 requested and 116704 written"),
    ("summary", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), os.strerror(errno.EDQUOT)),
])
def test_full_disk_is_one_line_and_keeps_what_was_written(small_classifier, monkeypatch, capsys,
                                                          failing, error, reason):
    tmp_path, model, _ = small_classifier
    photos = tmp_path / "photos"
    for i in range(3):
        random_photo(photos / f"p{i}.png", seed=i)
    out = tmp_path / "out"
    # the second image's raw map (np.save), or the summary.json written after it (its rename)
    if failing == "npy":
        fail_on(monkeypatch, np, "save", 2, error)
    else:
        fail_on(monkeypatch, os, "replace", 2, error, when=lambda src, dst: Path(dst).name == "summary.json")
    second = out / image_key(photos / "p1.png")
    target = second / "gradient.npy" if failing == "npy" else out / "summary.json"
    code, _, err = run_cli(monkeypatch, capsys, "audit", photos, "--model", model, "--out", out)
    assert code == 1
    lines = error_lines(err)
    assert lines == [f"error: cannot write {target}: {reason}; the 1 image already written is "
                     "kept"], err
    summary = json.loads((out / "summary.json").read_text())
    assert [e["key"] for e in summary["images"]] == [image_key(photos / "p0.png")]
    assert summary["images"][0]["status"] == "done"
    first = out / summary["images"][0]["key"]
    assert np.load(first / "gradient.npy").ndim == 3
    assert not any(TEMPORARY_NAME.fullmatch(p.name) for p in out.rglob("*"))
    assert not (out / image_key(photos / "p2.png")).exists()  # stopped at the full disk


def test_csv_cells_cannot_be_formulas(small_classifier, monkeypatch):
    tmp_path, model, _ = small_classifier
    photos = tmp_path / "photos"
    for i, name in enumerate(["=1+2.png", "@SUM(1+1).png", "+1.png"]):
        random_photo(photos / name, seed=i)
    (photos / "-x.png").write_text("not an image")
    monkeypatch.chdir(photos)
    explainer = Explainer(model, cache_dir=tmp_path / "cache")
    run_audit(explainer, ["."], ["gradient"], tmp_path / "out")
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == ["'+1.png", "'-x.png", "'=1+2.png", "'@SUM(1+1).png"]
    assert rows[1]["status"] == "failed" and rows[1]["error"].startswith("'-x.png: ")
    assert float(rows[0]["score"]) > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["images"][2]["file"] == \
        "=1+2.png"  # the JSON keeps the names as they are


def test_csv_neutralises_text_not_numbers():
    summary = {"methods": ["integrated-gradients", "grad-cam"], "images": [{
        "file": "\tx.png", "status": "done", "error": "\r=cmd", "top5": [],
        "predicted": {"index": 1, "label": "-dash", "prob": 0.5},
        "target": {"index": 1, "label": "-dash", "score": -0.25},
        "methods": {"integrated-gradients": {"time_s": 0.5, "convergence_delta": -0.5,
                                             "relative_convergence_delta": -1e-7,
                                             "error": "@err"},
                    "grad-cam": {"time_s": 1.0, "layer": "+conv", "error": None}}}]}
    header, row = csv_rows(summary)
    cells = dict(zip(header, row))
    assert cells["file"] == "'\tx.png" and cells["error"] == "'\r=cmd"
    assert cells["predicted_label"] == cells["target_label"] == "'-dash"
    assert cells["integrated-gradients_error"] == "'@err" and cells["grad-cam_layer"] == "'+conv"
    assert cells["target_score"] == "-0.25"
    assert cells["integrated-gradients_convergence_delta"] == "-0.5"
    assert cells["integrated-gradients_relative_convergence_delta"] == "-1e-07"


# --- the audit on GoogLeNet: summary, exit code, resume, the page in Chromium ------------------


@pytest.fixture(scope="module")
def audit_run(googlenet_path, shared_dir, tmp_path_factory):
    """`onnxattr audit` over the shared photos, a folder with a truncated PNG, and a text file
    named explicitly, with the gradient; returns (work dir, out dir, exit code, stderr)."""
    work = tmp_path_factory.mktemp("audit")
    extra = work / "extra"
    extra.mkdir()
    coffee = (shared_dir / "images" / "coffee.png").read_bytes()
    (extra / "truncated.png").write_bytes(coffee[: len(coffee) // 3])
    notes = work / "notes.txt"
    notes.write_text("a text file, not a picture\n")
    out = work / "out"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("ONNXATTR_CACHE", str(work / "cache"))
    monkeypatch.setattr(sys, "argv", ["onnxattr", "audit", str(shared_dir / "images"), str(extra),
                                      str(notes), "--model", str(googlenet_path), "--methods",
                                      "gradient", "--out", str(out)])
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        monkeypatch.undo()
    return work, out, exit_info.value.code


def test_audit_summary_records_done_and_failed(audit_run, capsys):
    work, out, code = audit_run
    assert code == 1  # some failed
    summary = json.loads((out / "summary.json").read_text())
    entries = summary["images"]
    assert [e["status"] for e in entries].count("done") == 4
    failed = {e["file"]: e["error"] for e in entries if e["status"] == "failed"}
    assert set(failed) == {str(work / "extra" / "truncated.png"), str(work / "notes.txt")}
    assert "truncated" in failed[str(work / "extra" / "truncated.png")]
    assert "not an image" in failed[str(work / "notes.txt")]
    assert summary["counts"] == {"images": 6, "done": 4, "failed": 2, "skipped": 0}
    for entry in entries:
        if entry["status"] != "done":
            continue
        top = entry["top5"]
        assert len(top) == 5 and top[0] == entry["predicted"]
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
        assert entry["target"]["index"] == entry["predicted"]["index"]
        record = entry["methods"]["gradient"]
        assert record["status"] == "done" and record["time_s"] > 0 and record["error"] is None
        for name in (entry["outputs"]["photo"], entry["outputs"]["panel"], record["png"]):
            with Image.open(out / name) as image:
                assert image.format == "PNG"
        assert np.load(out / record["npy"]).shape == (3, 224, 224)
    chelsea = next(e for e in entries if e["file"].endswith("chelsea.png"))
    assert chelsea["predicted"]["label"] == "Egyptian cat"
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == [e["status"] for e in entries]
    assert [r["file"] for r in rows] == [e["file"] for e in entries]
    assert {"gradient_time_s", "gradient_convergence_delta", "gradient_error", "top5",
            "score"} <= set(rows[0])
    assert all(r["error"] for r in rows if r["status"] == "failed")


def test_audit_resume_skips_the_done_images(audit_run, googlenet_path, shared_dir,
                                            monkeypatch, capsys):
    work, out, _ = audit_run
    summary = json.loads((out / "summary.json").read_text())
    pngs = sorted(out.rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in pngs}
    calls = []
    real = Explainer.explain
    monkeypatch.setattr(Explainer, "explain",
                        lambda self, *a, **kw: calls.append(a) or real(self, *a, **kw))
    monkeypatch.setenv("ONNXATTR_CACHE", str(work / "cache"))
    code, out_text, _ = run_cli(monkeypatch, capsys, "audit", shared_dir / "images",
                                work / "extra", work / "notes.txt", "--model", googlenet_path,
                                "--methods", "gradient", "--out", out, "--resume")
    assert code == 1 and calls == []
    assert "4 done (4 from an earlier run), 2 failed" in out_text
    assert {p: p.stat().st_mtime_ns for p in pngs} == stamps
    again = json.loads((out / "summary.json").read_text())
    assert [e["status"] for e in again["images"]] == [e["status"] for e in summary["images"]]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium installed (scripts/test.sh installs Debian's chromium as root)")


# Injected at the top of a copy of the page: records load errors, script errors and console
# errors, then checks every photo loaded, sorts, opens a panel, and writes the results as JSON
# into <pre id="probe"> for --dump-dom.
PROBE = """<script>
var probe = {errors: []};
window.addEventListener('error', function (e) {
  var t = e.target;
  probe.errors.push(t && t.tagName ? 'load failed: ' + (t.src || t.href) : 'script: ' + e.message);
}, true);
var realError = console.error;
console.error = function () { probe.errors.push('console: ' + [].join.call(arguments, ' ')); };
function finish() {
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
}
window.addEventListener('load', function () {
  var images = [].slice.call(document.querySelectorAll('#grid img'));
  probe.images = images.length;
  probe.broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                       .map(function (i) { return i.src; });
  var select = document.getElementById('sort');
  function order(key) {
    select.value = key;
    select.dispatchEvent(new Event('change'));
    return [].map.call(document.querySelectorAll('#grid .card'), function (c) {
      return key === 'class' ? c.dataset.label : Number(c.dataset.score);
    });
  }
  probe.scores = order('score-desc');
  probe.labels = order('class');
  probe.failedFirst = order('status').length;
  var box = document.getElementById('lightbox'), img = box.querySelector('img');
  img.addEventListener('load', function () {
    probe.panel = {shown: !box.hidden, width: img.naturalWidth, src: img.getAttribute('src')};
    finish();
  });
  img.addEventListener('error', function () { probe.panel = 'failed'; finish(); });
  document.querySelector('#grid a.panel').click();
});
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]


def chromium(binary, profile, *args):
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            capture_output=True, text=True, timeout=120)
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result, console


def test_audit_page_in_headless_chromium(audit_run, tmp_path):
    binary = find_chromium()
    work, out, _ = audit_run
    page = (out / "index.html").read_text()
    # self-contained: nothing fetched from a network, every link relative
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "<style>" in page and "<script>" in page
    probe_page = out / "probe.html"
    probe_page.write_text(page.replace("<head>", "<head>\n" + PROBE, 1))
    result, console = chromium(binary, tmp_path / "profile", "--dump-dom", probe_page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stdout[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    assert console == [] and probe["errors"] == [], (console, probe["errors"])
    assert probe["images"] == 4 and probe["broken"] == []  # every done image's photo loaded
    assert probe["scores"][:4] == sorted(probe["scores"][:4], reverse=True)
    assert probe["scores"][4:] == [-1, -1]  # the failed ones, without a score, last
    assert probe["labels"][:4] == sorted(probe["labels"][:4]) and probe["labels"][4:] == ["", ""]
    assert probe["failedFirst"] == 6
    assert probe["panel"]["shown"] and probe["panel"]["width"] > 0
    assert probe["panel"]["src"].endswith("/panel.png")
    probe_page.unlink()

    screenshot = tmp_path / "page.png"
    result, console = chromium(binary, tmp_path / "profile2", f"--screenshot={screenshot}",
                               "--window-size=1200,900", "--hide-scrollbars",
                               (out / "index.html").as_uri())
    assert result.returncode == 0 and console == [], result.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(screenshot) as shot:
        assert shot.size == (1200, 900)
        assert len(shot.convert("RGB").getcolors(1 << 24)) > 1000  # photos drawn, not blank
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
