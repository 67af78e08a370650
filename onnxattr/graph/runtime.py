"""ONNX Runtime sessions on CPU or CUDA, and batched runs of a graph.

`onnxruntime` is imported here once for the whole package. The training build imports torch
when torch is installed (about 15 s and a CUDA warning on stderr) to look for its ORTModule;
onnxattr needs none of that, so torch is hidden from that import.

CUDA sessions are float32-exact by default: onnxruntime's CUDA provider computes convolutions
in TF32 (10-bit mantissas) unless `use_tf32` is 0, which made maps 4-12% off on an H200
(relative L2 4.2e-2 for one image, 1.2e-1 for 50 path images; 1.3e-4 and 1.5e-3 with TF32 off).
`precision="tf32"` opts in. cuDNN's algorithm search is HEURISTIC rather than onnxruntime's
EXHAUSTIVE default, which re-benchmarks every convolution at each new input shape (1.01 s per
shape change on an H200 where a repeated call takes 3 ms); batched runs also keep one shape per
session by padding the last chunk (SessionPool).
"""

import functools
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import OnnxAttrError
from ..io.weights import loads_references
from .control_flow import CONTROL_FLOW

_HIDE_TORCH = "torch" not in sys.modules
if _HIDE_TORCH:
    sys.modules["torch"] = None  # `import torch` raises ImportError inside onnxruntime
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
finally:
    if _HIDE_TORCH and sys.modules.get("torch", 0) is None:
        del sys.modules["torch"]
if onnxruntime is not None:
    onnxruntime.set_default_logger_severity(3)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PRECISIONS = ("float32", "tf32")
CONV_ALGO_SEARCH = "HEURISTIC"


def _require_onnxruntime():
    if onnxruntime is None:
        raise OnnxAttrError("onnxruntime is not installed (pip install onnxruntime, "
                            "onnxruntime-gpu or onnxruntime-training-cpu)")
    return onnxruntime


def require_provider(device):
    """The execution provider for `device`, or an OnnxAttrError if this onnxruntime lacks it."""
    if device not in PROVIDERS:
        raise OnnxAttrError(f"unknown device '{device}' (choose {' or '.join(PROVIDERS)})")
    ort = _require_onnxruntime()
    provider = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise OnnxAttrError(f"device '{device}' needs {provider}, which this onnxruntime "
                            f"({ort.__version__}) does not have; available: "
                            f"{', '.join(ort.get_available_providers())}")
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # onnxruntime-gpu >= 1.21: the CUDA and cuDNN of pip's nvidia packages
    return provider


def provider_options(device, precision="float32"):
    """The execution providers with their options, for InferenceSession(providers=...)."""
    if precision not in PRECISIONS:
        raise OnnxAttrError(f"unknown precision '{precision}' (choose {' or '.join(PRECISIONS)})")
    provider = require_provider(device)
    if device == "cpu":
        return [provider]
    cuda = {"use_tf32": "1" if precision == "tf32" else "0",
            "cudnn_conv_algo_search": CONV_ALGO_SEARCH}
    return [(provider, cuda), "CPUExecutionProvider"]


def make_session(model, device="cpu", threads=None, precision="float32", profile_prefix=None,
                 weights=None):
    """An InferenceSession for `model` (ModelProto) on `device`; CUDA never silently falls back.
    `profile_prefix`: onnxruntime's profiling on, its JSON file named so
    (scripts/profile_gradient.py). `weights`: the model's SharedWeights (onnxattr.io.weights),
    which the session reads in place instead of copying them."""
    ort = _require_onnxruntime()
    providers = provider_options(device, precision)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No memory pattern: IG-50 on GoogLeNet (chunks of 16, 2 threads) peaks at 0.85-0.87x the
    # memory at 0.98-1.03x the time; without the memory arena it is 1.3-1.5x slower and no
    # smaller (scripts/bench_session_options.py, two runs)
    options.enable_mem_pattern = False
    if device == "cpu":
        _register_shared_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    try:
        session = _load_session(ort, model, options, providers, weights)
    except Exception as err:  # onnxruntime raises its own exception types per build
        raise OnnxAttrError(f"onnxruntime cannot load the graph: {str(err).strip().splitlines()[-1]}"
                            ) from None
    if PROVIDERS[device] not in session.get_providers():
        raise OnnxAttrError(f"{PROVIDERS[device]} failed to load (CUDA or cuDNN libraries "
                            "missing?); refusing to run on CPU instead")
    return session


@functools.cache
def _register_shared_arena(ort):
    """One CPU memory arena for every session of the process (onnxruntime's environment
    allocator, used by sessions with `session.use_env_allocators`). Each session had its own,
    which keeps its largest run's activations: graphs x sessions x methods accumulated them
    (VGG11-BN: a worker session of integrated gradients kept 1 GB after a run of 16 rows, with
    the arena off too; docs/scale.md)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


def disabled_optimizers(model):
    """The onnxruntime graph optimizers to leave out for `model`: on a graph with control flow,
    ConvActivationFusion, which aborts the process in onnxruntime 1.19 (`Assertion '__n <
    this->size()' failed`) on a Conv whose output only an If branch reads. Leaving it out
    costs nothing measurable (torchvision ResNet-18, batch 8, 2 cores: 0.79-0.94 s per run
    with or without it; the basic optimization level instead took 1.8-2.4 s)."""
    if any(node.op_type in CONTROL_FLOW for node in model.graph.node):
        return ["ConvActivationFusion"]
    return []


def _load_session(ort, model, options, providers, weights):
    """The InferenceSession, with the initializers that `weights` holds shared (and prepacking
    off: its copies are per session). A graph with shared initializers is loaded from a file,
    deleted at once: onnxruntime's optimizer reads external data only in a model with a path;
    an onnxruntime that refuses references to memory gets the data (a passing copy) instead."""
    kwargs = {"providers": providers, "disabled_optimizers": disabled_optimizers(model)}
    if weights is None:
        return ort.InferenceSession(model.SerializeToString(), options, **kwargs)
    stripped, names = weights.strip(model)
    options.add_session_config_entry("session.disable_prepacking", "1")
    values = weights.ort_values(ort)
    for name in names:
        options.add_initializer(name, values[name])
    if not names or not loads_references(ort):
        full = weights.restore(stripped) if names else stripped
        return ort.InferenceSession(full.SerializeToString(), options, **kwargs)
    with tempfile.TemporaryDirectory(prefix="onnxattr-") as folder:
        path = os.path.join(folder, "graph.onnx")
        with open(path, "wb") as stream:
            stream.write(stripped.SerializeToString())
        return ort.InferenceSession(path, options, **kwargs)


# A run starts the workers' sessions when it has at least this many rows per worker (the 2 rows
# of integrated gradients' end-point scores stay on the session with all the threads).
MIN_ROWS_PER_WORKER = 4


def default_workers(device, threads=None):
    """How many sessions share a graph's batched runs: on CPU two, each with half the threads
    (when there are two or more), on CUDA one.

    Two sessions with one thread each, each running half of a chunk at the same time, keep
    both cores busy through the ops onnxruntime runs on one thread (MaxPool's scatter, layout
    reorders, small elementwise ops) and spend no time synchronising threads inside an op. On
    2 cores, IG-50 in chunks of 16 with one 2-thread session took 1.14x the time on GoogLeNet,
    1.06x on ResNet-18 and 1.07x on MobileNetV2, at 0.94x, 0.84x and 1.05x the peak memory
    (each session keeps its own weights, prepacked, and arena; `python
    scripts/bench_session_options.py --model M --variants default,one-worker --rounds 3`). A
    run that is one chunk (a single image's gradient) runs on one session with all the
    threads.
    More than two workers was not measured (this machine has 2 cores), so larger machines
    get two sessions of half the threads each.
    """
    return 2 if device == "cpu" and cpu_threads(threads) >= 2 else 1


def check_counts(**counts):
    """Refuse a count (threads=, workers=, batch_size=...) that is not a whole number of at
    least 1 (None: the default); a bool is no count."""
    for name, value in counts.items():
        whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if value is not None and (not whole or value < 1):
            raise OnnxAttrError(f"{name} must be a whole number of at least 1, got {value!r}")


def cpu_threads(threads=None):
    """`threads`, or else the number of CPUs this process may run on."""
    if threads:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SessionPool:
    """The sessions of one graph, made when first needed: `workers` sessions with threads /
    workers each that run the chunks of a run at the same time (see default_workers), and one
    with all `threads` for a run that is one chunk, or too short to be worth the workers'
    sessions before they exist (each holds its own copy of the weights, prepacked).

    `fixed_batch`: the graph's own fixed batch size; every chunk is exactly that big (the last
    one padded with copies of its last row), so a model exported for batch 1 sees one image at
    a time and rows never mix. On CUDA, chunks of a run's batch_size are padded the same way,
    so the session sees one input shape (cuDNN's algorithm search runs once per shape)."""

    def __init__(self, model, device="cpu", threads=None, precision="float32", workers=None,
                 fixed_batch=None, weights=None):
        self.weights = weights
        self.model = weights.strip(model)[0] if weights is not None else model
        self.device, self.precision = device, precision
        self.threads, self.fixed_batch = threads, fixed_batch
        self.workers = workers or default_workers(device, threads)
        self._whole = None
        self._parts = []

    def open(self):
        """Make the session with all the threads now: a graph onnxruntime cannot load fails
        here, not at the first run."""
        self._whole_session()

    def _whole_session(self):
        if self._whole is None:
            self._whole = make_session(self.model, self.device, self.threads, self.precision,
                                       weights=self.weights)
        return self._whole

    def _part_sessions(self):
        if not self._parts:
            threads = max(1, cpu_threads(self.threads) // self.workers)
            self._parts = [make_session(self.model, self.device, threads, self.precision,
                                        weights=self.weights) for _ in range(self.workers)]
        return self._parts

    def run(self, feeds, outputs, batch_size=None):
        """Run the graph on `feeds` (arrays sharing batch axis 0) in chunks; concatenate
        `outputs`. `batch_size`: rows in flight at once, split over the workers into chunks of
        even size (a short last chunk grows onnxruntime's arenas on the CPU)."""
        total = len(next(iter(feeds.values())))
        in_flight = batch_size or total
        split = self.workers > 1 and (bool(self._parts) or
                                      total >= MIN_ROWS_PER_WORKER * self.workers)
        pad_to = self.fixed_batch or (in_flight if self.device == "cuda" and batch_size
                                      and total > in_flight else None)
        if pad_to:
            chunks = [_chunk(feeds, start, pad_to, pad_to) for start in range(0, total, pad_to)]
        else:
            most = -(-in_flight // (self.workers if split else 1))
            chunks = [_chunk(feeds, start, end - start) for start, end in even_chunks(total, most)]
        if not split or len(chunks) == 1:
            session = self._whole_session()
            results = [session.run(outputs, chunk) for chunk, _ in chunks]
        else:
            sessions = self._part_sessions()
            with ThreadPoolExecutor(len(sessions)) as pool:  # onnxruntime releases the GIL
                futures = [pool.submit(_run_lane, session, chunks[i::len(sessions)], outputs)
                           for i, session in enumerate(sessions)]
                by_lane = [future.result() for future in futures]
            results = [by_lane[i % len(sessions)][i // len(sessions)] for i in range(len(chunks))]
        return [np.concatenate([result[j][:rows] for result, (_, rows) in zip(results, chunks)])
                for j in range(len(outputs))]


def even_chunks(total, most):
    """(start, end) of the fewest chunks of at most `most` rows that cover `total` rows, of
    even sizes (50 rows at most 16: 13, 12, 13, 12, not 16, 16, 16, 2)."""
    ends = np.linspace(0, total, -(-total // most) + 1).round().astype(int)
    return list(zip(ends[:-1].tolist(), ends[1:].tolist()))


def _chunk(feeds, start, rows, padded_to=None):
    """(the feeds' rows start..start + rows, padded with copies of the last row to `padded_to`
    rows when given; the real rows)."""
    chunk = {k: v[start:start + rows] for k, v in feeds.items()}
    rows = len(next(iter(chunk.values())))
    if padded_to and rows < padded_to:
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], padded_to - rows, axis=0)])
                 for k, v in chunk.items()}
    return chunk, rows


def _run_lane(session, chunks, outputs):
    return [session.run(outputs, chunk) for chunk, _ in chunks]
