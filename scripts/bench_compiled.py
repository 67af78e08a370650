"""Compiled attribution models against the engine's gradient graphs, on CPU.

Measures, for BVLC GoogLeNet: the compile time (from scratch, building the gradient graph,
and from the graph cache: lowering and saving only), the compiled file's size, and the
medians of one image's gradient and of IG-50 through a session on the compiled model and on
the training build's gradient graph, with the same number of threads.

    python scripts/bench_compiled.py [--model models/googlenet.onnx] [--threads 2]
                                     [--repeats 5] [--json out.json]

`integrated_gradients(session, pixels, targets, steps)` (numpy + onnxruntime only) can be
called by other benchmark scripts; `measure(args)` returns the table's numbers as a dict.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "samples" / "chelsea.png"


def integrated_gradients(session, pixels, targets, steps=50, batch_size=None):
    """IG with a black (all-zero) baseline and the midpoint Riemann rule, through a session on
    a compiled attribution model (inputs image, target; output attribution): numpy only."""
    alphas = (np.arange(steps, dtype=np.float64) + 0.5) / steps
    batch_size = batch_size or steps
    result = np.zeros(pixels.shape, np.float64)
    for n, (image, target) in enumerate(zip(pixels, targets)):
        total = np.zeros(image.shape, np.float64)
        for start in range(0, steps, batch_size):
            a = alphas[start:start + batch_size].reshape(-1, 1, 1, 1).astype(np.float32)
            path = (a * image[None]).astype(np.float32)
            gradient = session.run(["attribution"], {
                "image": path, "target": np.full(len(path), target, np.int64)})[0]
            total += gradient.sum(axis=0, dtype=np.float64)
        result[n] = image * total / steps
    return result.astype(np.float32)


def median_time(call, repeats):
    """Median seconds of `repeats` calls after one warm-up call (allocations, cuDNN search)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args):
    """The numbers of the table, as a dict."""
    sys.path.insert(0, str(REPO))
    from onnxattr.graph.builders import GraphCache
    from onnxattr.graph.engine import AttributionEngine
    from onnxattr.graph.runtime import make_session
    from onnxattr.io import caffe
    from onnxattr.io.image import load_pixels
    from onnxattr.io.model import load_model
    from onnxattr.methods.compile import compile_model

    work = Path(tempfile.mkdtemp(prefix="bench_compiled."))
    model = args.model
    if not model.exists():
        model = caffe.export(args.caffe, work / "googlenet.onnx")
    output = work / "googlenet-gradient.onnx"
    start = time.perf_counter()
    compile_model(model, "gradient", "prob", output, cache_dir=work / "cache")
    scratch_s = time.perf_counter() - start
    cached_s = median_time(lambda: compile_model(model, "gradient", "prob", output,
                                             cache_dir=work / "cache"), args.repeats)
    pixels = load_pixels(PHOTO, (224, 224))[None]
    compiled = make_session(load_model(output).full_proto(), "cpu", args.threads)
    engine = AttributionEngine(load_model(model), "cpu", GraphCache(work / "cache"), args.threads)
    target = np.argmax(engine.forward(pixels)[0], axis=1)
    trained = make_session(engine.shared_weights().restore(engine.gradient_graph()), "cpu",
                           args.threads)  # the graph with its own weights, as compiled
    onehot = np.eye(1000, dtype=np.float32)[target]

    def train_run(images, targets):
        rows = np.eye(1000, dtype=np.float32)[targets]
        return trained.run(["image_grad"], {"image": images, "onehot": rows})[0]

    class TrainingSession:  # the training graph behind the compiled model's interface
        def run(self, outputs, feeds):
            return [train_run(feeds["image"], feeds["target"])]

    one = {"image": pixels, "target": target.astype(np.int64)}
    results = {
        "model": str(args.model), "threads": args.threads, "repeats": args.repeats,
        "compile_from_scratch_s": scratch_s, "compile_from_cache_s": cached_s,
        "compiled_size_mb": output.stat().st_size / 2**20,
        "source_size_mb": model.stat().st_size / 2**20,
        "gradient_compiled_s": median_time(lambda: compiled.run(["attribution"], one), args.repeats),
        "gradient_training_s": median_time(lambda: trained.run(["image_grad"], {
            "image": pixels, "onehot": onehot}), args.repeats),
        "ig50_compiled_s": median_time(lambda: integrated_gradients(compiled, pixels, target, 50,
                                                                args.ig_batch),
                                   max(1, args.repeats // 2)),
        "ig50_training_s": median_time(lambda: integrated_gradients(TrainingSession(), pixels, target,
                                                                50, args.ig_batch),
                                   max(1, args.repeats // 2)),
    }
    got = integrated_gradients(compiled, pixels, target, 50, args.ig_batch)
    want = integrated_gradients(TrainingSession(), pixels, target, 50, args.ig_batch)
    results["ig50_relative_l2"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return results


def main(argv=None):
    from bench import common_arguments

    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--ig-batch", type=int, default=25, help="IG path images per run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    r = measure(args)
    print(f"GoogLeNet on CPU, {r['threads']} threads, medians of {r['repeats']} runs")
    print(f"compile: {r['compile_from_scratch_s']:.2f} s from scratch, "
          f"{r['compile_from_cache_s']:.2f} s from the graph cache; compiled file "
          f"{r['compiled_size_mb']:.1f} MiB (source {r['source_size_mb']:.1f} MiB)")
    print(f"{'':10s}{'compiled':>12s}{'training':>12s}")
    print(f"{'gradient':10s}{r['gradient_compiled_s'] * 1e3:10.1f}ms"
          f"{r['gradient_training_s'] * 1e3:10.1f}ms")
    print(f"{'IG-50':10s}{r['ig50_compiled_s']:11.2f}s{r['ig50_training_s']:11.2f}s"
          f"   (rel L2 between them {r['ig50_relative_l2']:.1e})")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
