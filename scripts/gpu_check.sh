#!/usr/bin/env bash
# Compiled attribution models on an NVIDIA GPU: CUDA against CPU, and timings.
#
#   bash scripts/gpu_check.sh --prepare [DIR]   # here, with onnxruntime-training (.venv)
#   bash scripts/gpu_check.sh [DIR]             # on the GPU machine: numpy + onnxruntime only
#
# --prepare compiles BVLC GoogLeNet for gradient and guided-backprop (onnxattr compile) into
# DIR (default build/gpu_check, git-ignored). Both graphs share one external weights file, so
# the folder stays near 30 MB. It also stores two photos' pixels, targets and the expected CPU
# results (training-build gradients, IG-50 through the compiled gradient model).
#
# The check needs no onnxattr dependency beyond numpy and onnxruntime (onnxruntime-gpu for
# CUDA): it says which execution providers are missing, runs both models and IG-50 on CPU and
# CUDA, compares them (relative L2) and prints median timings. Exit code 0: all checks passed,
# 1: a result differs, 2: CUDA not available (the CPU part still runs).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    DIR="${2:-build/gpu_check}"
    PYTHON=".venv/bin/python"
    [[ -x "$PYTHON" ]] || PYTHON=python3
    exec "$PYTHON" - "$DIR" <<'EOF'
import json
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, ".")
from onnxattr import Explainer, caffe  # noqa: E402
from onnxattr.compile import compile_model  # noqa: E402

sys.path.insert(0, "scripts")
from bench_compiled import integrated_gradients  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
source = Path("models/googlenet.onnx")
if not source.exists():
    source = caffe.export(Path("../shared/models/bvlc_googlenet"), out / "source" / "googlenet.onnx")
cache = out / "cache"
weights = "googlenet.weights"
(out / weights).unlink(missing_ok=True)  # onnx appends external data to an existing file
shared = {}
for method in ("gradient", "guided-backprop"):
    model = compile_model(source, method, "prob", cache_dir=cache)
    if not shared:  # the first model's initializers go to the one external file
        onnx.save(model, out / f"{method}.onnx", save_as_external_data=True,
                  all_tensors_to_one_file=True, location=weights, size_threshold=1024)
        saved = onnx.load(out / f"{method}.onnx", load_external_data=False)
        stored = onnx.load(out / f"{method}.onnx")
        shared = {t.name: (t, s) for t, s in zip(saved.graph.initializer, stored.graph.initializer)
                  if t.data_location == onnx.TensorProto.EXTERNAL}
        continue
    reused = 0
    for i, tensor in enumerate(model.graph.initializer):  # same name and bytes: point at the file
        match = shared.get(tensor.name)
        if match and onnx.numpy_helper.to_array(match[1]).tobytes() == \
                onnx.numpy_helper.to_array(tensor).tobytes():
            model.graph.initializer[i].CopyFrom(match[0])
            reused += 1
    onnx.save(model, out / f"{method}.onnx")
    print(f"{method}: {reused} initializers shared with {weights}")

trained = Explainer(source, cache_dir=cache)
photos = [Path("samples/chelsea.png"), Path("../shared/images/coffee.png")]
photos = [p for p in photos if p.exists()]
pixels = trained.pixels(photos)
targets = np.argmax(trained.engine.forward(pixels)[0], axis=1)
expected = {"pixels": pixels, "targets": targets}
for method, rule in (("gradient", "vanilla"), ("guided-backprop", "guided")):
    expected[method] = trained.engine.gradient(pixels, targets, rule)[0]
import onnxruntime  # noqa: E402
session = onnxruntime.InferenceSession(str(out / "gradient.onnx"), providers=["CPUExecutionProvider"])
expected["ig50"] = integrated_gradients(session, pixels[:1], targets[:1], 50)
np.savez(out / "expected.npz", **expected)
(out / "info.json").write_text(json.dumps({"photos": [p.name for p in photos],
                                           "targets": targets.tolist(),
                                           "onnxruntime": onnxruntime.__version__}))
import shutil  # noqa: E402
shutil.rmtree(cache, ignore_errors=True)
shutil.rmtree(out / "source", ignore_errors=True)
size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
print(f"prepared {out}: {', '.join(sorted(f.name for f in out.iterdir()))} "
      f"({size / 2**20:.1f} MiB)")
EOF
fi

DIR="${1:-build/gpu_check}"
if [[ ! -f "$DIR/expected.npz" ]]; then
    echo "no prepared models in $DIR: run 'bash scripts/gpu_check.sh --prepare $DIR' on a machine" \
         "with onnxruntime-training first, then copy the repository with $DIR" >&2
    exit 2
fi
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" - "$DIR" <<'EOF'
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, "scripts")
from bench_compiled import integrated_gradients, median_time  # noqa: E402

try:
    import onnxruntime as ort
except ImportError:
    sys.exit("onnxruntime is not installed: pip install onnxruntime-gpu (or onnxruntime for CPU)")

out = Path(sys.argv[1])
expected = dict(np.load(out / "expected.npz"))
info = json.loads((out / "info.json").read_text())
ort.set_default_logger_severity(3)
providers = ort.get_available_providers()
print(f"onnxruntime {ort.__version__} (prepared with {info['onnxruntime']}); providers: "
      f"{', '.join(providers)}")
devices = ["cpu"]
if "CUDAExecutionProvider" in providers:
    devices.append("cuda")
else:
    print("CUDAExecutionProvider not available: install onnxruntime-gpu (pip install "
          "onnxruntime-gpu, which needs the CUDA 12 and cuDNN 9 runtime libraries); "
          "only the CPU part runs")


def session(model, device):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if device == "cpu":
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]), ""
    cuda = ("CUDAExecutionProvider", {"use_tf32": 0})  # full float32: comparable with the CPU
    strict = ort.SessionOptions()
    strict.log_severity_level = 3
    strict.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        return ort.InferenceSession(str(model), strict, providers=[cuda]), "all nodes on CUDA"
    except Exception as err:  # some node has no CUDA kernel: say so, run with CPU fallback
        note = f"CPU fallback needed ({str(err).strip().splitlines()[-1][:150]})"
        made = ort.InferenceSession(str(model), options, providers=[cuda, "CPUExecutionProvider"])
        if "CUDAExecutionProvider" not in made.get_providers():
            raise RuntimeError("CUDAExecutionProvider failed to load (CUDA/cuDNN libraries?)")
        return made, note


def rel_l2(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# relative L2 limits against the results prepared with the training build's CPU onnxruntime:
# another onnxruntime release (other CPU kernels) or cuDNN (other summation orders) round
# differently; IG-50 sums 50 gradients of mostly dark images, where that shows more
LIMITS = {("cpu", "gradient"): 1e-4, ("cpu", "ig"): 1e-3,
          ("cuda", "gradient"): 1e-4, ("cuda", "ig"): 1e-3}
pixels, targets = expected["pixels"], expected["targets"]
results, rows, failed = {}, [], False
for device in devices:
    for method in ("gradient", "guided-backprop"):
        sess, note = session(out / f"{method}.onnx", device)
        feeds = {"image": pixels, "target": targets.astype(np.int64)}
        got = sess.run(["attribution"], feeds)[0]
        results[device, method] = got
        error = max(rel_l2(g, w) for g, w in zip(got, expected[method]))
        limit = LIMITS[device, "gradient"]
        failed |= error > limit
        print(f"{device:4s} {method:15s} vs training build: rel L2 {error:.1e} (limit {limit:g})"
              f"{'  ' + note if note else ''}{'  FAILED' if error > limit else ''}")
        if method != "gradient":
            continue
        one = {"image": pixels[:1], "target": targets[:1].astype(np.int64)}
        gradient_s = median_time(lambda: sess.run(["attribution"], one), 10)
        ig = integrated_gradients(sess, pixels[:1], targets[:1], 50)
        ig_error = rel_l2(ig, expected["ig50"])
        failed |= ig_error > LIMITS[device, "ig"]
        print(f"{device:4s} IG-50 vs prepared CPU: rel L2 {ig_error:.1e} (limit "
              f"{LIMITS[device, 'ig']:g}){'  FAILED' if ig_error > LIMITS[device, 'ig'] else ''}")
        ig_s = median_time(lambda: integrated_gradients(sess, pixels[:1], targets[:1], 50), 5)
        rows.append((device, gradient_s, ig_s))
if "cuda" in devices:
    for method in ("gradient", "guided-backprop"):
        error = max(rel_l2(c, g) for c, g in zip(results["cuda", method], results["cpu", method]))
        failed |= error > LIMITS["cuda", "gradient"]
        print(f"cuda vs cpu {method}: rel L2 {error:.1e}")
print("\nGoogLeNet, compiled gradient model, one 224x224 image (medians)")
print(f"{'device':8s}{'gradient (ms)':>15s}{'IG-50 (ms)':>13s}")
for device, gradient_s, ig_s in rows:
    print(f"{device:8s}{gradient_s * 1e3:15.1f}{ig_s * 1e3:13.1f}")
sys.exit(1 if failed else (0 if "cuda" in devices else 2))
EOF
