"""Images per second of the audit: the local engine, then Ray Data with 1 and 2 workers, on the
same images and methods in one run (docs/scale.md).

The images are --images copies (distinct names, so distinct outputs) of the shared photos
(../shared/images, else samples/). Before the local timing, one explanation warms the model up
(its gradient graph is built and cached); each Ray run's time includes its actors' start (each
loads the model and makes its sessions, the graph from the cache), since a Ray audit pays it
every time. The local cluster (--num-cpus, default all cores) is started once, before the Ray
timings, and its start is reported apart. Every engine writes into a fresh folder; the maps are
checked equal to the local audit's.

    python scripts/bench_audit.py [--images 12] [--methods gradient] [--workers 1,2]
                                  [--model models/googlenet.onnx] [--json out.json]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # this checkout's onnxattr, bench.py
PHOTOS = [REPO.parent / "shared" / "images", REPO / "samples"]


def parse_args(argv=None):
    from bench import common_arguments

    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--methods", default="gradient")
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def copy_photos(count, folder):
    """`count` copies of the photos, cycling through them, as folder/NN-name."""
    source = next(p for p in PHOTOS if p.is_dir())
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    folder.mkdir(parents=True)
    for n in range(count):
        shutil.copy(photos[n % len(photos)], folder / f"{n:02d}-{photos[n % len(photos)].name}")
    return folder


def timed_audit(explainer, images, methods, out_dir, **engine):
    from onnxattr import run_audit

    start = time.perf_counter()
    summary = run_audit(explainer, [images], methods, out_dir, **engine)
    seconds = time.perf_counter() - start
    assert summary["counts"]["done"] == summary["counts"]["images"], summary["counts"]
    return seconds, summary


def same_maps(summary, local_dir, out_dir, methods):
    return all(np.array_equal(np.load(local_dir / e["methods"][m]["npy"]),
                              np.load(out_dir / e["methods"][m]["npy"]))
               for e in summary["images"] for m in methods)


def main(argv=None):
    import ray
    from bench import model_path

    from onnxattr import Explainer
    from onnxattr.app.report import parse_methods

    args = parse_args(argv)
    methods = parse_methods(args.methods)
    work = Path(tempfile.mkdtemp(prefix="bench_audit_"))
    images = copy_photos(args.images, work / "images")
    explainer = Explainer(model_path(args, "googlenet"), cache_dir=work / "cache")
    for method in methods:  # warm-up: graphs built and cached
        explainer.explain(next(images.iterdir()), method)
    rows = []
    seconds, local = timed_audit(explainer, images, methods, work / "local")
    rows.append({"engine": "local", "workers": None, "seconds": seconds})
    start = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    started = time.perf_counter() - start
    try:
        for workers in map(int, args.workers.split(",")):
            out_dir = work / f"ray-{workers}"
            seconds, summary = timed_audit(explainer, images, methods, out_dir, engine="ray",
                                           workers=workers)
            rows.append({"engine": "ray", "workers": workers, "seconds": seconds,
                         "same_maps": same_maps(summary, work / "local", out_dir, methods)})
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.images} images, methods {','.join(methods)}, {os.cpu_count()} cores; "
          f"Ray local cluster ({args.num_cpus} CPUs) started in {started:.1f} s")
    print(f"{'engine':<8} {'workers':>7} {'seconds':>8} {'images/s':>9}  maps equal to local")
    for row in rows:
        row["images_per_s"] = args.images / row["seconds"]
        print(f"{row['engine']:<8} {row['workers'] or '':>7} {row['seconds']:8.1f} "
              f"{row['images_per_s']:9.3f}  {row.get('same_maps', '')}")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "methods": methods,
                                         "cores": os.cpu_count(), "ray_start_s": started,
                                         "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
