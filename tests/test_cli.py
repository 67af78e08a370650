"""The command line: outputs, and bad input as one line on stderr with a non-zero exit code."""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from PIL import Image

from onnxattr.app.cli import main

import small_models
from small_models import LABELS


def run_cli(monkeypatch, capsys, *args):
    """Run `onnxattr ARGS` in this process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["onnxattr", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code not in (0, None)
    lines = [line for line in err.splitlines() if line.strip() and "explaining" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_explain_writes_the_two_figures_and_raw(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    code, out, _ = run_cli(monkeypatch, capsys, "explain", photo, "--model", model,
                           "--out", tmp_path / "out", "--save-raw", "--target", "cherry")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "photo_gradient.npy", "photo_gradient.png", "photo_photo.png"]
    assert np.load(tmp_path / "out" / "photo_gradient.npy").shape == (3, 8, 8)


def test_classify_prints_top_classes(small_classifier, monkeypatch, capsys):
    _, model, photo = small_classifier
    code, out, _ = run_cli(monkeypatch, capsys, "classify", photo, "--model", model, "--top", 2)
    assert code == 0
    assert len([line for line in out.splitlines() if line.startswith("  ")]) == 2
    assert any(label in out for label in LABELS)


@pytest.mark.parametrize("content, problem", [
    (None, "not found"),
    (b"", "empty"),
    (b"this is a text file, not a picture\n", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "photo.png"),
])
def test_bad_image_files(small_classifier, monkeypatch, capsys, content, problem):
    tmp_path, model, _ = small_classifier
    bad = tmp_path / "photo.png"
    bad.unlink()
    if content is not None:
        bad.write_bytes(content)
    code, _, err = run_cli(monkeypatch, capsys, "explain", bad, "--model", model, "--out",
                           tmp_path / "out")
    assert_one_line_error(code, err, "photo.png", problem)


def test_truncated_jpeg(small_classifier, monkeypatch, capsys):
    tmp_path, model, _ = small_classifier
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    code, _, err = run_cli(monkeypatch, capsys, "explain", path, "--model", model)
    assert_one_line_error(code, err, "cut.jpg")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "1"])
def test_odd_image_modes_work(small_classifier, monkeypatch, capsys, mode):
    tmp_path, model, _ = small_classifier
    path = tmp_path / f"odd.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new("RGB", (16, 12), (200, 30, 90)).convert(mode).save(path)
    code, _, err = run_cli(monkeypatch, capsys, "explain", path, "--model", model, "--out",
                           tmp_path / "out")
    assert code == 0, err


def test_exif_rotated_photo_is_upright(small_classifier, monkeypatch, capsys):
    tmp_path, model, _ = small_classifier
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (20, 10), (0, 128, 255)).save(path, exif=exif)
    code, _, err = run_cli(monkeypatch, capsys, "classify", path, "--model", model)
    assert code == 0, err


def test_huge_image_is_refused(small_classifier, monkeypatch, capsys):
    tmp_path, model, _ = small_classifier
    import onnxattr.io.image as image_module
    monkeypatch.setattr(image_module, "MAX_PIXELS", 100)
    path = tmp_path / "huge.png"
    Image.new("RGB", (20, 20)).save(path)
    code, _, err = run_cli(monkeypatch, capsys, "classify", path, "--model", model)
    assert_one_line_error(code, err, "huge.png", "megapixels")


@pytest.mark.parametrize("target, problem", [
    ("durian", "unknown class name 'durian'"),
    ("banan", "did you mean: banana"),
    ("5", "out of range 0..4"),
    ("-1", "class index -1 is out of range 0..4"),
    ("2.0", "target 2.0 is not a whole number"),
    ("1e3", "not a whole number"),
])
def test_bad_targets(small_classifier, monkeypatch, capsys, target, problem):
    tmp_path, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--target",
                           target, "--out", tmp_path / "out")
    assert_one_line_error(code, err, problem)
    assert not (tmp_path / "out").exists()


def no_image_input():
    model = small_models.conv_relu_maxpool_lrn()
    model.graph.input[0].type.tensor_type.shape.dim.pop()
    return model


def no_class_output():
    model = small_models.conv_relu_maxpool_lrn()
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1
    return model


def undifferentiable():
    model = small_models.conv_relu_maxpool_lrn()
    model.graph.node[1].op_type = "Round"
    return model


@pytest.mark.parametrize("make, problems", [
    (no_image_input, ["not an image classifier", "[N, C, H, W]"]),
    (no_class_output, ["not an image classifier", "softmax or logits"]),
    (undifferentiable, ["op Round", "relu1"]),
])
def test_bad_models(small_classifier, monkeypatch, capsys, make, problems):
    tmp_path, _, photo = small_classifier
    path = tmp_path / "bad.onnx"
    onnx.save(make(), path)
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", path)
    assert_one_line_error(code, err, *problems)


@pytest.mark.parametrize("content, problem", [
    (None, "model file not found"),
    (b"definitely not protobuf \xff\xfe", "is not an ONNX model"),
])
def test_missing_or_corrupt_model(small_classifier, monkeypatch, capsys, content, problem):
    tmp_path, _, photo = small_classifier
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_cli(monkeypatch, capsys, "classify", photo, "--model", path)
    assert_one_line_error(code, err, problem)


def test_default_model_missing_says_how_to_export(small_classifier, monkeypatch, capsys):
    tmp_path, _, photo = small_classifier
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "classify", photo)
    assert_one_line_error(code, err, "models/googlenet.onnx", "export_googlenet.py")


def test_a_bad_file_among_good_ones_keeps_the_good_outputs(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    code, _, err = run_cli(monkeypatch, capsys, "explain", broken, "--model", model, "--out", out)
    assert_one_line_error(code, err, "broken.png")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written


def test_installed_entry_point_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "onnxattr", "classify", tmp_path / "nope.png",
                             "--model", tmp_path / "nope.onnx"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: model file not found")
    assert "Traceback" not in result.stderr


def test_out_under_a_regular_file_is_one_line(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--out",
                           tmp_path / "file" / "out")
    assert code == 1
    assert_one_line_error(code, err, "is a file, not a folder")


def test_cuda_without_its_provider_fails_before_any_work(small_classifier, monkeypatch, capsys):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    tmp_path, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--device",
                           "cuda", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "CUDAExecutionProvider", "device 'cuda'")
    assert not (tmp_path / "out").exists()


def no_relu_classifier():
    """Conv -> Sigmoid -> Flatten -> Gemm -> Softmax: guided backprop does not apply."""
    model = small_models.conv_relu_maxpool_lrn()
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Sigmoid"
    return model


def test_method_all_leaves_out_what_does_not_apply(small_classifier, monkeypatch, capsys):
    """On a model without ReLU, `--method all` writes every map that applies and says in one
    note which methods it left out (it used to write nothing and fail per image)."""
    tmp_path, _, photo = small_classifier
    path = small_models.save(no_relu_classifier(), tmp_path / "sigmoid.onnx")
    code, out, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", path, "--method",
                             "all", "--out", tmp_path / "out")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, err  # the left-out methods, the assumed pixel contract
    assert "--method all leaves out guided-backprop, zeiler-fergus, guided-grad-cam" in notes[0]
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"photo_gradient.png", "photo_integrated-gradients.png"} <= written
    assert not any("guided" in name for name in written)


def test_per_image_errors_name_the_image(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    path = small_models.save(no_relu_classifier(), tmp_path / "sigmoid.onnx")
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", path, "--method",
                           "guided-backprop", "--out", tmp_path / "out")
    assert_one_line_error(code, err, f"error: {photo}: ", "ReLU backward rule")


def test_unlabelled_models_say_so(small_classifier, monkeypatch, capsys):
    tmp_path, _, photo = small_classifier
    path = small_models.save(small_models.conv_relu_maxpool_lrn(), tmp_path / "bare.onnx")
    code, out, _ = run_cli(monkeypatch, capsys, "classify", photo, "--model", path, "--top", "1")
    assert code == 0 and "class " in out and "(" not in out.splitlines()[1]
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", path, "--target",
                           "tabby cat", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "the model has no class names", "class index 0..4")


def test_steps_over_the_maximum_is_one_line(small_classifier, monkeypatch, capsys):
    """A huge --steps is refused in one line (it was a MemoryError in the Gauss-Legendre rule,
    exit 70)."""
    tmp_path, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--method",
                           "integrated-gradients", "--steps", "1000000000", "--out",
                           tmp_path / "out")
    assert code == 1
    assert_one_line_error(code, err, "steps must be a whole number", "at most 4096",
                          "1000000000")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_that_cannot_be_created_is_one_line(small_classifier, monkeypatch, capsys):
    """An --out that cannot be made (under /proc, where even root cannot) is one line naming
    it, before any work (it was an internal error, exit 70)."""
    tmp_path, model, photo = small_classifier
    code, out, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--out",
                             "/proc/onnxattr-forbidden")
    assert code == 1 and not out
    assert_one_line_error(code, err, "--out /proc/onnxattr-forbidden", "cannot create")


@pytest.mark.parametrize("flags, problem", [
    (["--std", "nan"], "--std must be finite numbers, got 'nan'"),
    (["--mean", "nan"], "--mean must be finite numbers, got 'nan'"),
    (["--pixel-range", "abc"], "--pixel-range must look like 0..1 or 0..255, got 'abc'"),
    (["--pixel-range", "0-1"], "--pixel-range must look like 0..1 or 0..255, got '0-1'"),
    (["--pixel-range", "0..inf"], "--pixel-range must look like 0..1 or 0..255"),
])
def test_bad_pixel_contract_flags_name_the_flag(small_classifier, monkeypatch, capsys, flags,
                                                problem):
    """Each contract flag's bad value is blamed on that flag (a NaN std said "bad pixel
    range", a range without ".." printed the contract as a dict)."""
    _, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "classify", photo, "--model", model, *flags)
    assert code == 1
    assert_one_line_error(code, err, problem)


def unknown_op():
    model = small_models.conv_relu_maxpool_lrn()
    model.graph.node[2].op_type = "FooBar"
    del model.graph.node[2].attribute[:]
    return model


def too_new_opset():
    model = small_models.conv_relu_maxpool_lrn()
    model.opset_import[0].version = 99
    return model


def cycle():
    model = small_models.conv_relu_maxpool_lrn()
    model.graph.node[1].input[0] = "n1"  # relu1 reads lrn1's output, which depends on relu1
    return model


@pytest.mark.parametrize("make, problem", [
    (unknown_op, ["onnxruntime cannot load the graph", "FooBar"]),
    (too_new_opset, ["the model uses opset 99, newer than any this onnx"]),
    (cycle, ["onnxruntime cannot load the graph", "not acyclic"]),
])
def test_model_onnxruntime_cannot_load_is_blamed_on_the_model(small_classifier, monkeypatch,
                                                              capsys, make, problem):
    """A graph onnxruntime refuses fails once, naming the model, before any image (it was
    reported per image, as if the photo were at fault)."""
    tmp_path, _, photo = small_classifier
    path = tmp_path / "bad.onnx"
    onnx.save(make(), path)
    code, _, err = run_cli(monkeypatch, capsys, "classify", photo, photo, "--model", path)
    assert_one_line_error(code, err, f"error: {path}: ", *problem)
    assert "photo.png" not in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_compile_output_that_cannot_be_written_names_output(small_classifier, monkeypatch,
                                                            capsys):
    _, model, _ = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "compile", model, "--output",
                           "/proc/onnxattr-forbidden/a.onnx")
    assert code == 1
    assert_one_line_error(code, err, "error: --output /proc/onnxattr-forbidden/a.onnx: "
                          "cannot create or write in /proc")


def test_missing_baseline_file_says_file_not_found(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--method",
                           "integrated-gradients", "--baseline", "nothere.png", "--out",
                           tmp_path / "out")
    assert code == 1
    assert_one_line_error(code, err, "baseline nothere.png: file not found")


class Terminal(io.StringIO):
    """stdout and stderr as one terminal."""

    def isatty(self):
        return True


def screen(text):
    """The lines a terminal shows for `text` (carriage returns, erase to the end of line)."""
    lines = []
    for raw in text.split("\n"):
        line, column = "", 0
        for token in re.split(r"(\r|\x1b\[K)", raw):
            if token == "\r":
                column = 0
            elif token == "\x1b[K":
                line = line[:column]
            else:
                line = line[:column] + token + line[column + len(token):]
                column += len(token)
        lines.append(line)
    return lines


def test_result_lines_start_on_their_own_line_under_the_bar(small_classifier, monkeypatch):
    """On a terminal the bar is drawn, and cleared before each result line (a result line
    used to continue the bar's line)."""
    tmp_path, model, photo = small_classifier
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "argv", ["onnxattr", "explain", str(photo), str(photo), "--model",
                                      str(model), "--method", "integrated-gradients",
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert "explaining  [" in terminal.getvalue()  # the bar was drawn
    lines = [line for line in screen(terminal.getvalue()) if line]
    results = [line for line in lines if not line.startswith(("warning:", "builder:"))]
    assert len(results) == 4, lines  # per image: the convergence line, the files written
    assert all(line.startswith(str(photo)) for line in results), lines


def test_no_bar_and_no_label_without_a_terminal(small_classifier, monkeypatch, capsys):
    tmp_path, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--out",
                           tmp_path / "out")
    assert code == 0 and err.startswith("builder: ") and len(err.splitlines()) == 1, err


def test_help_lists_each_command_with_a_whole_summary(monkeypatch, capsys):
    """click cuts a summary at its first period: sanity's stopped at "(Adebayo et al."."""
    monkeypatch.setattr(sys, "argv", ["onnxattr", "--help"])
    main()
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.strip().startswith("sanity")]
    assert "Adebayo et al. 2018" in line, line


@pytest.mark.parametrize("choice, training, said", [
    ("auto", True, "builder: onnxruntime"),
    ("auto", False, "builder: native (onnxruntime-training not installed)"),
    ("native", True, "builder: native"),
])
def test_one_builder_line_says_which_builder_ran(small_classifier, monkeypatch, capsys, choice,
                                                 training, said):
    """Which gradient builder made the maps, once per model (on Python 3.13 nothing said it)."""
    import onnxattr.graph.builders
    if training and not onnxattr.graph.builders.has_training_builder():
        pytest.skip("needs onnxruntime-training")
    monkeypatch.setattr(onnxattr.graph.builders, "has_training_builder", lambda: training)
    tmp_path, model, photo = small_classifier
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, photo, "--model", model,
                           "--method", "gradient,guided-backprop", "--builder", choice,
                           "--out", tmp_path / "out")
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith("builder:")] == [said], err


def test_explanation_names_its_builder(small_classifier, builder):
    from onnxattr import Explainer
    tmp_path, model, photo = small_classifier
    explainer = Explainer(model, builder=builder, cache_dir=tmp_path / "cache")
    assert explainer.explain(photo, method="guided-backprop").builder == builder
    assert explainer.explain(photo, method="occlusion").builder is None  # no gradient graph


@pytest.mark.parametrize("batch_size", [True, False, 0, -3, 2.0, "4"])
def test_explain_refuses_a_batch_size_that_is_not_a_count(small_classifier, batch_size):
    from onnxattr import Explainer
    from onnxattr.errors import OnnxAttrError
    tmp_path, model, photo = small_classifier
    explainer = Explainer(model, cache_dir=tmp_path / "cache")
    with pytest.raises(OnnxAttrError, match="batch_size must be a whole number of at least 1, "
                                            f"got {re.escape(repr(batch_size))}"):
        explainer.explain(photo, batch_size=batch_size)


def test_explainer_refuses_an_unknown_fit_when_made(small_classifier):
    from onnxattr import Explainer
    from onnxattr.errors import OnnxAttrError
    tmp_path, model, _ = small_classifier
    with pytest.raises(OnnxAttrError, match="unknown fit 'zoom': choose one of stretch, "
                                            "center-crop"):
        Explainer(model, fit="zoom", cache_dir=tmp_path / "cache")


def test_a_failed_write_is_one_line_not_an_internal_error(small_classifier, monkeypatch, capsys):
    """A full disk while explain writes its figures: one error line naming the file, exit 1."""
    tmp_path, model, photo = small_classifier
    import errno

    import onnxattr.io.files as files

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full_disk)
    code, _, err = run_cli(monkeypatch, capsys, "explain", photo, "--model", model, "--out",
                           tmp_path / "out")
    errors = [line for line in err.splitlines() if line.startswith(("error", "internal"))]
    assert code == 1 and len(errors) == 1, err
    assert "cannot write" in errors[0] and "No space left on device" in errors[0]
    assert "Traceback" not in err
