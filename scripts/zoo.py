"""The classifier zoo at full size: every architecture outside testers ran onnxattr on
(tests/zoo_models.py), exported by each torch exporter, through each gradient builder, against
float64 torch autograd.

    python scripts/zoo.py [--models resnet18,vit_b_16,...] [--exporters torchscript,dynamo]
                          [--builders native,onnxruntime] [--size full|tiny] [--out build/zoo]
                          [--json FILE] [--seed 0] [--repeats 3] [--timeout 1800]

Per model: a seeded random-init torchvision model (see tests/zoo_models.py for the classifier
calibration), one seeded random image (batch 1) and its top-1 class. Per exporter: the ONNX
file, cached in --out and reused while the module (structure, weights), the export code,
torch's version and the exporter are the same (the key is in the file's metadata). Per
builder one table row:

    model | exporter | opset | builder | p top-1 | status | rel L2 torch | torch f32 |
    rel L2 vs onnxruntime | first s | gradient ms

p top-1: the image's top-1 probability (float64 torch), the class explained. status is "ok"
or the one-line error (onnxattr's message; "internal error: ..." for any other exception;
"crashed" for a dead process). rel L2 torch: ||g - g64|| / ||g64|| of onnxattr's gradient of
the top-1 probability against float64 torch autograd. torch f32: the same for torch's own
float32 gradient: the scale float32 errors have on this image, not a bound (near-tied ReLU,
Clip and MaxPool decisions flip differently in each float32 implementation: on full
SqueezeNet's image onnxattr is 8e-3 off and torch 5e-6, on other images the other way
round). rel L2 vs onnxruntime: a
builder's gradient against the onnxruntime builder's, where both ran. first s: Explainer plus
the first gradient (graph build or cache read, session, run); gradient ms: the median of
--repeats more batch-1 gradients. Each builder runs in a child process of its own, so a crash
or a builder that is not there yet is one row's error, never the end of the run. Gradient
graphs are cached in --out/cache.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's onnxattr, the zoo module

BUILDERS = ["native", "onnxruntime"]
COLUMNS = ["model", "exporter", "opset", "builder", "p top-1", "status", "rel L2 torch",
           "torch f32", "rel L2 vs onnxruntime", "first s", "gradient ms"]


def _one_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---- the child: one model file through one builder ------------------------------------------

def measure(args):
    """Child process: onnxattr's gradient for one model file and builder. Writes the gradient
    to --result and prints one JSON line {status, first_s, gradient_s}."""
    from onnxattr import OnnxAttrError

    import zoo_models as zoo

    pixels = np.load(args.pixels)
    targets = np.array(json.loads(args.targets), np.int64)
    builder = args.builder
    report = {"status": "ok", "first_s": None, "gradient_s": None}
    try:
        start = time.perf_counter()
        explainer = zoo.onnxattr_explainer(args.measure, builder=builder, cache_dir=args.cache)
        gradient, _, _ = explainer.engine.gradient(pixels, targets, "vanilla", "prob")
        report["first_s"] = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            explainer.engine.gradient(pixels, targets, "vanilla", "prob")
            times.append(time.perf_counter() - start)
        report["gradient_s"] = statistics.median(times) if times else None
        np.save(args.result, gradient)
    except OnnxAttrError as err:
        report["status"] = _one_line(err)
    except Exception as err:  # not onnxattr's one-line error: a bug, or a builder not there yet
        report["status"] = f"internal error: {type(err).__name__}: {_one_line(err)}"
    print(json.dumps(report), flush=True)


def run_child(path, pixels_file, targets, builder, cache, result, repeats, timeout):
    """The child's report, or a status saying how it died."""
    command = [sys.executable, __file__, "--measure", str(path), "--pixels", str(pixels_file),
               "--targets", json.dumps([int(t) for t in targets]), "--builder", builder,
               "--cache", str(cache), "--result", str(result), "--repeats", str(repeats)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"crashed (exit {done.returncode}): {tail[-200:]}"}


# ---- the parent: models, exports, references, rows ------------------------------------------

def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def print_row(row):
    cells = [row["model"], row["exporter"], str(row["opset"] or ""), row["builder"],
             _fmt(row["p_top1"], ".3f"), row["status"], _fmt(row["rel_l2_torch"], ".1e"),
             _fmt(row["torch_f32"], ".1e"),
             _fmt(row["rel_l2_vs_onnxruntime"], ".1e"), _fmt(row["first_s"], ".2f"),
             _fmt(None if row["gradient_s"] is None else row["gradient_s"] * 1e3, ".1f")]
    print("| " + " | ".join(cells) + " |", flush=True)


def run(args):
    import torch

    import zoo_models as zoo

    models = args.models.split(",")
    exporters = args.exporters.split(",")
    builders = args.builders.split(",")
    for kind, chosen, known in (("model", models, zoo.ARCHITECTURES),
                                ("exporter", exporters, zoo.EXPORTERS),
                                ("builder", builders, BUILDERS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            sys.exit(f"unknown {kind}: {', '.join(unknown)} (choose from {', '.join(known)})")
    out = Path(args.out) / args.size
    cache = Path(args.out) / "cache"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"zoo: size {args.size}, seed {args.seed}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs", flush=True)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    for name in models:
        module = zoo.build(name, args.size, seed=args.seed)
        pixels = zoo.random_pixels(module, count=1, seed=args.seed)
        prob = zoo.reference_forward(module, pixels)
        targets = prob.argmax(axis=1)
        expected = zoo.reference_gradient(module, pixels, targets)
        # the scale of float32 errors: torch's own float32 gradient against float64
        torch_f32 = zoo.relative_l2(zoo.reference_gradient(module, pixels, targets,
                                                           dtype=torch.float32), expected)
        pixels_file = out / f"{name}-seed{args.seed}-pixels.npy"
        np.save(pixels_file, pixels)
        for exporter in exporters:
            path = out / f"{name}-seed{args.seed}-{exporter}.onnx"
            base = {"model": name, "exporter": exporter, "opset": None, "size": args.size,
                    "path": str(path), "target": int(targets[0]),
                    "p_top1": float(prob[0, targets[0]]), "torch_f32": torch_f32}
            try:
                start = time.perf_counter()
                base["opset"] = zoo.export_cached(module, path, exporter)
                base["export_s"] = time.perf_counter() - start
            except Exception as err:
                for builder in builders:
                    row = dict(base, builder=builder, rel_l2_torch=None,
                               rel_l2_vs_onnxruntime=None, first_s=None, gradient_s=None,
                               status=f"export failed: {type(err).__name__}: {_one_line(err)}")
                    rows.append(row)
                    print_row(row)
                continue
            gradients = {}
            pending = []
            for builder in builders:
                result = out / f"{name}-seed{args.seed}-{exporter}-{builder}-gradient.npy"
                result.unlink(missing_ok=True)
                report = run_child(path, pixels_file, targets, builder, cache, result,
                                   args.repeats, args.timeout)
                row = dict(base, builder=builder, status=report["status"],
                           first_s=report.get("first_s"), gradient_s=report.get("gradient_s"),
                           rel_l2_torch=None, rel_l2_vs_onnxruntime=None)
                if row["status"] == "ok":
                    gradients[builder] = np.load(result)
                    row["rel_l2_torch"] = zoo.relative_l2(gradients[builder], expected)
                    result.unlink()
                pending.append(row)
            for row in pending:
                if row["builder"] != "onnxruntime" and {"onnxruntime", row["builder"]} <= \
                        gradients.keys():
                    row["rel_l2_vs_onnxruntime"] = zoo.relative_l2(
                        gradients[row["builder"]], gradients["onnxruntime"])
                rows.append(row)
                print_row(row)
        del module
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "size": args.size, "seed": args.seed, "torch": torch.__version__,
            "rows": rows}, indent=1) + "\n")
    return rows


def main(argv=None):
    import zoo_models as zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(zoo.ARCHITECTURES))
    parser.add_argument("--exporters", default=",".join(zoo.EXPORTERS))
    parser.add_argument("--builders", default="onnxruntime",
                        help="comma-separated: native, onnxruntime (default: onnxruntime)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--out", default=str(REPO / "build" / "zoo"))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed batch-1 gradients after the first (median)")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="seconds one builder may take on one model")
    # the child process's arguments (internal)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--pixels", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--builder", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
