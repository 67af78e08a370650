"""Smoke tests of the benchmark script on a tiny configuration, so it cannot rot (no timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"
# the same-process smoke test's cases: batch 1 only (the batch-64 cases took most of its time;
# the IG floors they feed are tested on fixed rows below)
CASES = "forward,gradient,gradient-native,ig-4-batch4"


def run_bench(googlenet_path, googlenet_caffe_dir, tmp_path, *options):
    """scripts/bench.py on GoogLeNet with a graph cache of its own: its JSON report."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--model", str(googlenet_path), "--caffe",
                    str(googlenet_caffe_dir), "--out", str(tmp_path), *options, "--json",
                    str(out)], check=True, capture_output=True, text=True,
                   env={**os.environ, "ONNXATTR_CACHE": str(tmp_path / "cache")})
    return json.loads(out.read_text())


def test_by_default_each_side_times_in_a_process_of_its_own(googlenet_path, googlenet_caffe_dir,
                                                             tmp_path):
    """onnxattr's and Captum's calls are timed in two child processes, neither of them the
    parent, and torch is never loaded where onnxattr runs; the table says so."""
    pytest.importorskip("captum")
    report = run_bench(googlenet_path, googlenet_caffe_dir, tmp_path, "--cases", "forward",
                       "--repeats", "1", "--threads", "1", "--rounds", "1")
    assert report["machine"]["mode"] == "separate processes"
    assert report["machine"]["threads"] == 1 and report["machine"]["cores"] > 0
    (row,) = report["models"][0]["rows"]
    assert len({*row["onnxattr_pids"], *row["captum_pids"], report["parent_pid"]}) == 3
    assert row["onnxattr_torch_loaded"] is False
    assert row["onnxattr_peak_mb"] > 0 and row["captum_peak_mb"] > 0
    assert row["relative_l2"] < 1e-4


@pytest.mark.slow
def test_bench_runs_and_both_sides_agree(googlenet_path, googlenet_caffe_dir, tmp_path):
    """The timed table of --same-process (memory is measured in child processes, one per case
    and side: that part is smoke-tested below on one case)."""
    pytest.importorskip("captum")
    (report,) = run_bench(googlenet_path, googlenet_caffe_dir, tmp_path, "--same-process",
                          "--repeats", "1", "--ig-steps", "4", "--ig-batch-sizes", "4",
                          "--cases", CASES, "--no-memory")["models"]
    assert report["model"] == "googlenet"
    assert [r["case"] for r in report["rows"]] == CASES.split(",")
    for row in report["rows"]:
        assert row["onnxattr_s"] > 0 and row["captum_s"] > 0
        assert row["relative_l2"] < 2e-2, row
    assert report["gradient_over_forward"]["ratio"] > 1


def import_bench():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench

    return bench


def test_ig_floor_is_two_forward_passes_per_step():
    bench = import_bench()
    batch = bench.BATCH
    rows = [{"case": f"forward-batch{batch}", "onnxattr_s": batch * 0.5, "captum_s": 1.0,
             "onnxattr_child_s": [batch * 0.5, batch * 0.25]},
            {"case": "ig-50-batch16", "onnxattr_s": 9.0, "captum_s": 200.0,
             "onnxattr_child_s": [9.0, 9.0]},
            {"case": "ig-50-default", "onnxattr_s": 9.0, "captum_s": 100.0,
             "onnxattr_child_s": [9.0, 4.5]}]
    floors = bench.ig_floors(rows)
    assert {case: {k: v for k, v in floor.items() if k != "over_floor_range"}
            for case, floor in floors.items()} == {
        "ig-50-batch16": {"seconds": 50.0, "ratio": 0.25, "over_floor": 0.18},
        "ig-50-default": {"seconds": 50.0, "ratio": 0.5, "over_floor": 0.18}}
    # round by round: 9 s over 50 s, then 9 s over 25 s (batch-64 forward twice as fast)
    assert floors["ig-50-batch16"]["over_floor_range"] == pytest.approx([0.18, 0.36])
    assert floors["ig-50-default"]["over_floor_range"] == pytest.approx([0.18, 0.18])
    assert bench.ig_floors(rows[1:]) == {}


def test_rounds_take_turns_and_report_the_median_of_the_children(monkeypatch, tmp_path):
    """--rounds children per side and case: onnxattr's first in round one (its class is the
    one Captum explains), then the sides alternate; every child is a process of its own and
    the time is the median of the children's medians."""
    bench = import_bench()
    spawned = []

    def fake_child(args, *options):
        name, side, case = options[1:4]
        spawned.append((side, options[4:6]))
        if "--result" in options:
            np.save(options[options.index("--result") + 1], np.ones(3))
        seconds = {"onnxattr": [1.0, 1.0, 3.0], "captum": [2.0, 2.0, 2.0]}[side]
        return {"seconds": [seconds[sum(s == side for s, _ in spawned) - 1]],
                "pid": len(spawned), "target": 7, "builders": {}, "versions": {},
                "peak_mb": 100.0 * len(spawned), "torch_loaded": side == "captum"}

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "model_path", lambda args, name: tmp_path)
    args = bench.parse_args(["--cases", "forward", "--rounds", "3"])
    (row,) = bench.measure_separately(args, "googlenet", tmp_path)["rows"]
    assert [side for side, _ in spawned] == ["onnxattr", "captum", "captum", "onnxattr",
                                             "onnxattr", "captum"]
    assert spawned[0][1] != ("--target", "7") and spawned[1][1] == ("--target", "7")
    assert row["onnxattr_pids"] == [1, 4, 5] and row["captum_pids"] == [2, 3, 6]
    assert row["onnxattr_child_s"] == [1.0, 1.0, 3.0] and row["onnxattr_s"] == 1.0
    assert row["time_ratio"] == 0.5 and row["time_ratio_range"] == [0.5, 1.5]
    assert row["onnxattr_peak_mb"] == 500.0 and row["onnxattr_torch_loaded"] is False


@pytest.mark.slow
@pytest.mark.parametrize("side", ["onnxattr", "captum"])
def test_bench_child_reports_its_peak_memory(side, googlenet_path, googlenet_caffe_dir, tmp_path):
    if side == "captum":
        pytest.importorskip("captum")
    result = subprocess.run([sys.executable, str(BENCH), "--child", "googlenet", side, "gradient",
                             "--model", str(googlenet_path), "--caffe", str(googlenet_caffe_dir),
                             "--out", str(tmp_path), "--repeats", "0"], check=True,
                            capture_output=True, text=True,
                            env={**os.environ, "ONNXATTR_CACHE": str(tmp_path / "cache")})
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    # before_mb is taken with the model loaded: the gradient call allocates beyond it
    assert memory["peak_mb"] > memory["before_mb"] > 0


def test_rejected_forms_agree_with_the_kept_ones():
    """The record of rejected backward forms runs, and its exact candidates are exact."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_rejected_forms.py"),
                             "--runs", "1", "--only", "gate"], check=True, capture_output=True,
                            text=True)
    candidates = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(candidates) == 3 * 5  # three shapes, two ReLU and three ReLU6 forms
    assert all(line.endswith("equal") for line in candidates), result.stdout


def test_rewritten_branch_sums_keep_the_sum():
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_backward_forms import build
    from bench_rejected_forms import chained_adds, merged_pointwise_adjoints

    from onnxattr.graph.runtime import make_session

    rng = np.random.default_rng(0)
    channels = {"dy1": 4, "dy2": 8, "dy3": 3, "other": 5}
    weights = {"w1": rng.standard_normal((5, 4, 1, 1)).astype(np.float32),
               "w2": rng.standard_normal((5, 8, 1, 1)).astype(np.float32),
               "w3": rng.standard_normal((5, 3, 3, 3)).astype(np.float32)}

    def branches(em):
        return em.op("Sum", em.op("Conv", "dy1", "w1", kernel_shape=[1, 1]), "other",
                     em.op("Conv", "dy2", "w2", kernel_shape=[1, 1]),
                     em.op("Conv", "dy3", "w3", kernel_shape=[3, 3], pads=[1] * 4))

    summed = build({name: [1, c, 6, 6] for name, c in channels.items()}, branches, weights)
    feeds = {name: rng.standard_normal((1, c, 6, 6)).astype(np.float32)
             for name, c in channels.items()}
    expected = make_session(summed).run(None, feeds)[0]

    chained = chained_adds(summed)
    assert [n.op_type for n in chained.graph.node] == ["Conv"] * 3 + ["Add"] * 3
    np.testing.assert_array_equal(make_session(chained).run(None, feeds)[0], expected)

    merged = merged_pointwise_adjoints(summed)  # the 1x1 pair merges, the 3x3 stays apart
    assert [n.op_type for n in merged.graph.node] == ["Conv", "Concat", "Concat", "Conv", "Sum"]
    np.testing.assert_allclose(make_session(merged).run(None, feeds)[0], expected, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("stride, pad, ceil", [(2, 0, 1), (1, 1, 0)])
@pytest.mark.parametrize("layout", ["images", "grouped", "unfold"])
def test_rejected_masked_max_pool_grad_routes_as_the_kept_form(stride, pad, ceil, layout):
    """The masked MaxPool backward (bench_rejected_forms.py --only pool) sends each window's dY
    to the same cell as the kept ScatterElements form, ties included: with small integer
    values every sum is exact, so the two agree bit for bit."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_backward_forms import build
    from bench_rejected_forms import masked_pool_grad

    from onnxattr.graph import backward_forms as forms
    from onnxattr.graph.runtime import make_session

    rng = np.random.default_rng(0)
    size, kernel, pads = [9, 9], [3, 3], [pad] * 4
    geometry = dict(size=size, kernel=kernel, strides=[stride] * 2, pads=pads)
    out = forms.window_output_size(dilations=[1, 1], ceil_mode=ceil, **geometry)
    feeds = {"x": rng.integers(0, 3, (2, 3, *size)).astype(np.float32),  # many ties
             "dy": rng.integers(-4, 5, (2, 3, *out)).astype(np.float32)}
    inputs = {"x": [2, 3, *size], "dy": [2, 3, *out]}

    def kept(em):
        y = em.op("MaxPool", "x", kernel_shape=kernel, strides=[stride] * 2, pads=pads,
                  ceil_mode=ceil)
        return forms.max_pool_grad(em, "x", y, "dy", dilations=[1, 1], out_size=out,
                                   form="indices", **geometry)

    expected = make_session(build(inputs, kept)).run(None, feeds)[0]
    masked = build(inputs, lambda em: masked_pool_grad(em, "x", "dy", out_size=out, ceil=ceil,
                                                       layout=layout, **geometry))
    np.testing.assert_array_equal(make_session(masked).run(None, feeds)[0], expected)


@pytest.mark.parametrize("kernel, stride, pad, size", [(7, 2, 3, 16), (3, 2, 1, 9), (1, 2, 0, 8),
                                                       (3, 3, 1, 10)])
def test_rejected_stride_phases_give_the_adjoint(kernel, stride, pad, size):
    """The stride-phase adjoint (bench_rejected_forms.py --only strided) equals ConvTranspose's:
    with small integer values every sum is exact, so bit for bit."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_backward_forms import build
    from bench_rejected_forms import stride_phases

    from onnxattr.graph import backward_forms as forms
    from onnxattr.graph.runtime import make_session

    rng = np.random.default_rng(0)
    m, c = 5, 3
    out = (size + 2 * pad - kernel) // stride + 1
    w = rng.integers(-3, 4, (m, c, kernel, kernel)).astype(np.float32)
    feeds = {"dy": rng.integers(-4, 5, (2, m, out, out)).astype(np.float32)}
    inputs = {"dy": [2, m, out, out]}
    kept = build(inputs, lambda em: forms.conv_input_grad(
        em, "dy", "w", [size] * 2, [kernel] * 2, [stride] * 2, [pad] * 4, [1, 1], 1, [m, c, kernel,
                                                                                     kernel]),
        {"w": w})
    expected = make_session(kept).run(None, feeds)[0]
    for block in (None, 16):
        phases = build(inputs, lambda em, block=block: stride_phases(
            em, "dy", "w", (m, c, kernel, stride, pad, size, out), block), {"w": w})
        np.testing.assert_array_equal(make_session(phases).run(None, feeds)[0], expected)


def test_rejected_nchwc_masks_gate_as_the_kept_form():
    """The depthwise-Conv masks (bench_rejected_forms.py --only layout) are Cast(Y > 0) for
    every Y: zeros, subnormals, the largest floats, negatives."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_backward_forms import build
    from bench_rejected_forms import nchwc_masks

    from onnxattr.graph import backward_forms as forms
    from onnxattr.graph.runtime import make_session

    values = np.array([0, 1e-45, 1e-40, 1e-38, 1e-3, 1, 3e38, -1e-45, -2, np.inf, -np.inf, 0.5],
                      np.float32)
    rng = np.random.default_rng(0)
    feeds = {"y": rng.choice(values, (1, 16, 4, 4)).astype(np.float32),
             "dy": rng.integers(-4, 5, (1, 16, 4, 4)).astype(np.float32)}
    gated = build({"y": [1, 16, 4, 4], "dy": [1, 16, 4, 4]},
                  lambda em: forms.gate(em, "dy", forms.relu_active(em, "y", "y")))
    masked = nchwc_masks(gated)
    assert "Greater" not in {n.op_type for n in masked.graph.node}
    np.testing.assert_array_equal(make_session(masked).run(None, feeds)[0],
                                  make_session(gated).run(None, feeds)[0])
