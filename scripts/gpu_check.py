"""onnxattr on an NVIDIA GPU: CUDA against CPU, every node on CUDA, and timings against Captum.

    python scripts/gpu_check.py --prepare [DIR]   # here: the BVLC Caffe files into DIR
    python scripts/gpu_check.py [DIR]             # on the GPU machine (scripts/gpu_check.sh)

--prepare copies the BVLC GoogLeNet Caffe files (about 28 MiB) into DIR (default
build/gpu_check, git-ignored), so the repository carries what the GPU machine needs. There,
the check exports GoogLeNet from them (onnxattr.io.caffe: numpy and onnx only), then:

1. CUDA against CPU, float32-exact (the default), through `Explainer`: relative L2 of the
   gradient, guided backpropagation and IG-50 of two photos, limit 1e-3 (LIMIT);
2. every node of the native gradient graph on CUDA: a session with the CPU fallback disabled;
3. if torch and captum are importable: scripts/bench.py --device cuda, float32-exact and with
   TF32 on both sides, cases gradient, a batch of 64, IG-50 and SmoothGrad-25.

Exit code 0: all checks passed; 1: a check failed; 2: no CUDA provider (nothing ran).
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from bench import relative_l2  # scripts/bench.py, beside this file
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CAFFE = REPO.parent / "shared" / "models" / "bvlc_googlenet"
PHOTO = REPO / "samples" / "chelsea.png"
LIMIT = 1e-3  # relative L2, CUDA (float32-exact) against CPU
BENCH_CASES = "gradient,gradient-batch64,ig-50-default,smoothgrad"


def prepare(folder):
    target = folder / "caffe"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(CAFFE, target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"prepared {target} ({size / 2**20:.1f} MiB)")


def compare_devices(model, cache):
    """CUDA against CPU for three methods; returns whether all are within LIMIT."""
    from onnxattr import Explainer

    cpu = Explainer(model, cache_dir=cache, builder="native")
    cuda = Explainer(model, device="cuda", cache_dir=cache, builder="native")
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    photos = [photo, photo[:, ::-1].copy()]  # a batch of two: the photo and its mirror image
    ok = True
    for method, options in (("gradient", {}), ("guided-backprop", {}),
                            ("integrated-gradients", {"steps": 50, "batch_size": 50})):
        want = cpu.explain(photos, method, **options)
        got = cuda.explain(photos, method, **options)
        error = max(relative_l2(g.attribution, w.attribution) for g, w in zip(got, want))
        ok &= error <= LIMIT
        print(f"cuda vs cpu {method:22s} relative L2 {error:.1e} (limit {LIMIT:g})"
              f"{'' if error <= LIMIT else '  FAILED'}")
    return ok


def all_nodes_on_cuda(model, cache):
    """Whether the native gradient graph loads on CUDA with the CPU fallback disabled."""
    from onnxattr import Explainer
    from onnxattr.graph.runtime import onnxruntime, provider_options

    engine = Explainer(model, cache_dir=cache, builder="native").engine
    graph = engine.shared_weights().restore(engine.gradient_graph())  # its own weights
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        onnxruntime.InferenceSession(graph.SerializeToString(), options,
                                     providers=provider_options("cuda")[:1])
    except Exception as err:
        print(f"strict CUDA session: FAILED ({str(err).strip().splitlines()[-1][:200]})")
        return False
    print("strict CUDA session: every node of the gradient graph on CUDA")
    return True


def bench(model, caffe):
    """scripts/bench.py on CUDA, exact and TF32, if torch and captum are there."""
    try:
        import captum  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        print(f"no Captum comparison ({err}); install torch and captum for it")
        return True
    for precision in ("float32", "tf32"):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--device",
                               "cuda", "--precision", precision, "--model", str(model),
                               "--caffe", str(caffe), "--cases", BENCH_CASES, "--repeats", "10",
                               "--no-memory", "--json", str(model.parent / f"bench-{precision}"
                                                            ".json")])
        if done.returncode:
            return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="copy the Caffe files (here)")
    parser.add_argument("folder", nargs="?", type=Path, default=REPO / "build" / "gpu_check")
    args = parser.parse_args(argv)
    folder = args.folder
    if args.prepare:
        return prepare(folder)
    from onnxattr.graph.runtime import onnxruntime
    from onnxattr.io import caffe

    if onnxruntime is None or "CUDAExecutionProvider" not in \
            onnxruntime.get_available_providers():
        print("CUDAExecutionProvider not available: install onnxruntime-gpu (and, for "
              "onnxruntime-gpu 1.19+, call onnxruntime.preload_dlls() where torch's CUDA "
              "libraries are the ones to use)", file=sys.stderr)
        sys.exit(2)
    model = folder / "googlenet.onnx"
    if not model.exists():
        caffe.export(folder / "caffe", model)
    cache = folder / "cache"
    ok = compare_devices(model, cache)
    ok &= all_nodes_on_cuda(model, cache)
    ok &= bench(model, folder / "caffe")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
