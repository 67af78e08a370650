"""Where a gradient's time goes: onnxruntime's profile of the engine's gradient graph (CPU,
the sample photo, batch 1 or copies of it), summed per op type, as milliseconds per run.

    python scripts/profile_gradient.py [--model models/googlenet.onnx] [--builder native]
        [--runs 25] [--threads 2] [--batch 1] [--top 14]

The session is made as the engine makes it (onnxattr.graph.runtime.make_session), with profiling on;
the first of runs + 1 runs (allocation, kernel selection) is left out. Node times only: the totals are a
little under the wall time of a run.
"""

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxattr import Explainer  # noqa: E402
from onnxattr.graph.prepare import ONEHOT  # noqa: E402
from onnxattr.graph.runtime import make_session  # noqa: E402

PHOTO = REPO / "samples" / "chelsea.png"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "googlenet.onnx"))
    parser.add_argument("--builder", default="native", choices=["native", "onnxruntime"])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="copies of the photo per run")
    parser.add_argument("--top", type=int, default=14, help="op types listed")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    explainer = Explainer(args.model, builder=args.builder, threads=args.threads)
    engine = explainer.engine
    graph = engine.shared_weights().restore(engine.gradient_graph())  # its own weights
    pixels = np.repeat(explainer.pixels([PHOTO]), args.batch, axis=0)
    onehot = np.zeros((args.batch, engine.classifier.num_classes), np.float32)
    onehot[:, int(np.argmax(engine.forward(pixels[:1])[0]))] = 1.0
    feeds = {engine.classifier.input_name: pixels, ONEHOT: onehot}
    with tempfile.TemporaryDirectory() as folder:
        session = make_session(graph, threads=args.threads, profile_prefix=f"{folder}/run")
        for _ in range(args.runs + 1):  # the first (allocation, kernel choice) is left out
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    start = runs[1]["ts"]  # the first run's node events come before
    totals, counts = collections.Counter(), collections.Counter()
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["ts"] >= start):
            totals[event["args"]["op_name"]] += event["dur"]
            counts[event["args"]["op_name"]] += 1
    in_nodes = sum(totals.values()) / args.runs / 1e3
    print(f"{Path(args.model).name}, {args.builder} builder, {args.threads} threads, "
          f"batch {args.batch}, mean of {args.runs} runs: {in_nodes:.1f} ms in nodes")
    for op, micros in totals.most_common(args.top):
        print(f"  {op:24s} {micros / args.runs / 1e3:7.2f} ms  {counts[op] // args.runs:4d} nodes")


if __name__ == "__main__":
    main()
