"""Time and peak memory of integrated gradients under onnxruntime's session options.

Each variant runs in a fresh process (peak memory is the process's VmHWM): IG-50 on GoogLeNet
(or another model) through onnxattr's engine, chunks of `--batch-size` path images, median of
`--repeats` runs after one warm-up; with `--rounds` R, R such processes per variant, the
variants taking turns, and the median of their medians (peak: the largest). Variants:

    default        onnxattr's sessions (one CPU memory arena for all sessions of the process,
                   memory pattern off, ORT_ENABLE_ALL;
                   on 2 or more cores two worker sessions, each with half the threads, run
                   the halves of a chunk at once: onnxattr.graph.runtime.default_workers)
    one-worker     one session with all the threads runs each chunk
    own-arenas     each session its own arena (session.use_env_allocators = 0)
    no-arena       enable_cpu_mem_arena = False
    pattern        enable_mem_pattern = True (onnxruntime's default)
    no-spinning    session.intra_op.allow_spinning = 0 (threads sleep between ops)
    parallel       execution_mode ORT_PARALLEL (independent branches at once)

    python scripts/bench_session_options.py [--model models/googlenet.onnx] [--steps 50]
                                            [--batch-size 16] [--repeats 3] [--threads 2]
                                            [--variants default,one-worker,...] [--rounds 1]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTO = REPO / "samples" / "chelsea.png"
VARIANTS = {
    "default": {},
    "one-worker": {"workers": 1},
    "own-arenas": {"config": {"session.use_env_allocators": "0"}},
    "no-arena": {"enable_cpu_mem_arena": False},
    "pattern": {"enable_mem_pattern": True},
    "no-spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
    "parallel": {"execution_mode": "ORT_PARALLEL"},
}


def patched_make_session(settings):
    """runtime.make_session with one variant's options applied to every session, after
    make_session's own (at the InferenceSession made from them)."""
    from onnxattr.graph import runtime

    original = runtime.onnxruntime.InferenceSession

    def session(model, made, **kwargs):
        for name in ("enable_cpu_mem_arena", "enable_mem_pattern"):
            if name in settings:
                setattr(made, name, settings[name])
        for key, value in settings.get("config", {}).items():
            made.add_session_config_entry(key, value)
        if "execution_mode" in settings:
            made.execution_mode = getattr(runtime.onnxruntime.ExecutionMode,
                                          settings["execution_mode"])
        return original(model, made, **kwargs)
    runtime.onnxruntime.InferenceSession = session


def child(args):
    from onnxattr import Explainer

    patched_make_session(VARIANTS[args.child])
    explainer = Explainer(args.model, threads=args.threads, cache_dir=args.cache,
                          workers=VARIANTS[args.child].get("workers"))
    options = dict(method="integrated-gradients", steps=args.steps, batch_size=args.batch_size)
    explainer.explain(PHOTO, **options)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        explainer.explain(PHOTO, **options)
        times.append(time.perf_counter() - start)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": statistics.median(times), "peak_mb": peak / 1024}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "googlenet.onnx")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per variant, taking turns; the median of theirs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "bench" / "cache")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, the first is the baseline")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant(s): {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    runs = {name: [] for name in names}
    for _ in range(args.rounds):  # the variants take turns, so a slow spell hits them all
        for name in names:
            command = [sys.executable, __file__, "--child", name, "--model", str(args.model),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--repeats", str(args.repeats), "--threads", str(args.threads),
                       "--cache", str(args.cache)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {name: {"seconds": statistics.median(r["seconds"] for r in results),
                   "peak_mb": max(r["peak_mb"] for r in results)}
            for name, results in runs.items()}
    base = rows[names[0]]
    for name, row in rows.items():
        print(f"{name:14s} IG-{args.steps} batch {args.batch_size}: {row['seconds']:6.2f} s "
              f"(x{row['seconds'] / base['seconds']:.2f})  peak {row['peak_mb']:6.0f} MB "
              f"(x{row['peak_mb'] / base['peak_mb']:.2f})", flush=True)
    return rows


if __name__ == "__main__":
    main()
