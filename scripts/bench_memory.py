"""Peak memory (RSS) of `onnxattr explain` per method, each case in a fresh child process with
a fresh graph cache, against the model file's size (docs/scale.md).

    python scripts/bench_memory.py --model models/googlenet.onnx [--model /tmp/vgg11_bn.onnx]
        [--case gradient --case integrated-gradients --case all] [--builder native]
        [--limit-gb 12] [--batch-size 16] [--json out.json]

A case is a --method value; integrated gradients runs 16 steps in batches of --batch-size (and
--method all runs every method with it). A child whose RSS passes --limit-gb is killed (the
row says so) so that a model too big for the machine does not take it down. The peak is the
kernel's ru_maxrss of the child (os.wait4).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CASES = ("gradient", "integrated-gradients", "all")


def rss_bytes(pid):
    """The current RSS of process `pid` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def run_case(model, case, builder, image, limit, batch_size=16):
    """(peak RSS in bytes, seconds, exit status or 'killed') of one explain run."""
    with tempfile.TemporaryDirectory(prefix="onnxattr-mem-") as scratch:
        flags = ["--steps", "16", "--batch-size", str(batch_size)] if case in (
            "integrated-gradients", "all") else []
        command = [sys.executable, "-m", "onnxattr", "explain", str(image), "--model", str(model),
                   "--method", case, "--builder", builder, "--out", f"{scratch}/out", *flags]
        env = dict(os.environ, ONNXATTR_CACHE=f"{scratch}/cache")
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        killed, done = threading.Event(), threading.Event()
        threading.Thread(target=_watch, args=(child, limit, killed, done), daemon=True).start()
        _, status, usage = os.wait4(child.pid, 0)  # the watchdog never reaps: this wait does
        done.set()
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        errors = child.stderr.read().decode(errors="replace").strip().splitlines()
        child.stderr.close()
    outcome = "killed" if killed.is_set() else child.returncode
    if outcome not in (0, "killed") and errors:
        print(f"  {case}: {errors[-1]}", file=sys.stderr)
    return usage.ru_maxrss * 1024, seconds, outcome


def _watch(child, limit, killed, done):
    """Kill `child` when its RSS passes `limit` bytes (until `done`)."""
    while not done.is_set():
        if limit and rss_bytes(child.pid) > limit:
            killed.set()
            child.kill()
            return
        time.sleep(0.05)


def _random_image():
    """A 224 x 224 photo of random pixels, in a temporary file."""
    from PIL import Image
    path = Path(tempfile.mkdtemp(prefix="onnxattr-mem-")) / "random.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), np.uint8)).save(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--case", action="append", choices=CASES)
    parser.add_argument("--builder", default="native", choices=("auto", "onnxruntime", "native"))
    parser.add_argument("--image", help="a photo [default: 224 x 224 random pixels]")
    parser.add_argument("--limit-gb", type=float, default=12.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    image = args.image or _random_image()
    print(f"{'model':<24} {'MB':>7} {'case':<22} {'peak MB':>8} {'x model':>8} {'s':>6}  status")
    for model in args.model:
        size = Path(model).stat().st_size
        for case in args.case or CASES:
            peak, seconds, outcome = run_case(model, case, args.builder, image,
                                              int(args.limit_gb * 2 ** 30), args.batch_size)
            rows.append(dict(model=Path(model).name, model_bytes=size, case=case,
                             builder=args.builder, batch_size=args.batch_size, peak_bytes=peak,
                             seconds=round(seconds, 1),
                             status=outcome))
            print(f"{Path(model).name:<24} {size / 2**20:7.0f} {case:<22} {peak / 2**20:8.0f} "
                  f"{peak / size:8.2f} {seconds:6.1f}  {outcome}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
