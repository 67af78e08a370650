"""The audit on Ray Data: `run_audit(..., engine="ray")`, `onnxattr audit --engine ray`.

The driver (report.py) lists the images, applies resume, holds the output folder's lock and
writes the summary. Here the images still to do become a Ray dataset of (path, key) rows, and
`map_batches` hands them to `workers` actors (AuditWorker), each holding one Explainer: the model
and its sessions are made once per actor, with onnxruntime threads = the actor's CPUs. An actor
runs image_audit.audit_image on each row, the local audit's own code, so the same files land at
the same places (`out_dir` and the images must be at the same paths on every node: a shared
filesystem on a cluster; actors work in the driver's folder so relative paths read the same),
and returns each summary entry as a JSON column. A worker that dies loses its batch
(BATCH_SIZE images): Ray Data restarts the actor and retries the batch, up to MAX_RETRIES
times (Ray Data's default is no limit, so a batch whose every try ends its process would hang the
audit); past that the audit stops with one line, keeping the summary written so far.
Progress shows as Ray Data's bars.

`ray.init()` without an address starts a local cluster, so the same command works on a laptop;
an address ("auto", "ray://head:10001") joins a running cluster. Ray is an optional extra:
without it, require_ray says how to install it.
"""

import json
import os
import warnings
from pathlib import Path

from ..errors import OnnxAttrError
from ..io.files import WriteError, atomic_path
from ..io.remote import as_input
from ..methods.explainer import Explainer
from .image_audit import audit_image

try:
    import pyarrow
    import pyarrow.parquet as parquet
    import ray
except ImportError:  # the optional extra, onnxattr[ray]
    ray = None

INSTALL = "pip install 'onnxattr[ray]'"
BATCH_SIZE = 2  # images per task: a dead worker's loss, and Ray's unit of retry
MAX_RETRIES = 3  # tries of a batch after the first whose worker died
# Actors reserve this share of their CPUs: with every CPU held by actors, Ray Data's own tasks
# (a read, a split) get no slot and the dataset waits forever.
CPU_SHARE = 0.9
# Testing only: when the file this variable names exists, an actor deletes it (unless it says
# "always") and kills its own process before its next image (tests/test_ray.py checks that Ray
# redoes the batch, and stops after MAX_RETRIES).
KILL_MARKER = "ONNXATTR_TEST_KILL_MARKER"
WRITE_ERROR = "write_error"  # a returned entry that is a worker's WriteError


def require_ray():
    """OnnxAttrError (one line, how to install it) when Ray Data is not installed."""
    if ray is None:
        raise OnnxAttrError(f"the Ray engine needs Ray Data: {INSTALL}")


class AuditWorker:
    """One Ray actor of the audit: one Explainer, audit_image on each row of its batches."""

    def __init__(self, explainer_options, threads, cwd, out_dir, job):
        if os.path.isdir(cwd):  # else only absolute paths read (the others fail, one by one)
            os.chdir(cwd)
        self.explainer = Explainer(**explainer_options, threads=threads)
        self.out_dir, self.job = Path(out_dir), job

    def __call__(self, batch):
        entries = []
        for path, key in zip(batch["path"], batch["key"]):
            _fault_for_tests()
            try:
                entry = audit_image(self.explainer, as_input(str(path)), str(key),
                                    out_dir=self.out_dir, advance=lambda n: None, **self.job)
            except WriteError as err:  # a full disk: the driver stops the audit with this line
                entry = {WRITE_ERROR: str(err)}
            entries.append(json.dumps(entry))
        return {"key": batch["key"], "entry": entries}


class WorkerWriteError(WriteError):
    """A worker's WriteError (its message), raised again on the driver, which stops the audit."""

    def __init__(self, message):
        OSError.__init__(self, message)


def _fault_for_tests():
    marker = os.environ.get(KILL_MARKER)
    if marker and os.path.exists(marker):
        with open(marker) as handle:
            always = handle.read() == "always"
        if not always:
            os.unlink(marker)
        os._exit(1)


def audit_batches(explainer, todo, out_dir, job, address=None, workers=None):
    """Audit the (path, key) pairs `todo` on Ray (joining the cluster at `address`, else the
    running one, else a new local one, shut down at the end); yields {key: entry} per batch
    as workers finish them. `workers`: actors (default: one per 2 CPUs of the cluster)."""
    require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        with warnings.catch_warnings():
            # Ray Data reading its own deprecated settings: nothing a user could change
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
            # max_task_retries has no named parameter yet; Ray removes the others in 2.64,
            # which pyproject.toml's ray extra stays below
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            yield from _run(explainer, todo, out_dir, job, workers)
    finally:
        if started:
            ray.shutdown()


def _run(explainer, todo, out_dir, job, workers):
    cpus = ray.cluster_resources().get("CPU", 1)
    workers = workers or max(1, int(cpus // 2))
    share = cpus / workers
    rows = [{"path": str(path), "key": key} for path, key in todo]
    done = ray.data.from_items(rows).map_batches(
        AuditWorker, batch_size=BATCH_SIZE, compute=ray.data.ActorPoolStrategy(size=workers),
        batch_format="numpy", num_cpus=share * CPU_SHARE, max_task_retries=MAX_RETRIES,
        fn_constructor_kwargs={"explainer_options": explainer.options,
                               "threads": max(1, int(share)), "cwd": os.getcwd(),
                               "out_dir": str(out_dir), "job": job})
    try:
        for batch in done.iter_batches(batch_size=None, batch_format="numpy"):
            yield _entries(batch)
    except ray.exceptions.RayError as err:  # a worker died on every try of one batch
        raise OnnxAttrError(f"a Ray worker died on each of {MAX_RETRIES + 1} tries of one batch "
                            f"({type(err).__name__}); the audit stops") from None


def _entries(batch):
    """{key: entry} of a batch the workers return; a worker's write error raised again."""
    entries = {str(key): json.loads(entry) for key, entry in zip(batch["key"], batch["entry"])}
    failed = [e[WRITE_ERROR] for e in entries.values() if WRITE_ERROR in e]
    if failed:
        raise WorkerWriteError(failed[0])
    return entries


def parquet_rows(summary):
    """One row per image and method: the image's class and status, then the method's record
    (its status, time, files, numbers; the metrics' curves stay in summary.json)."""
    rows = []
    for e in summary["images"]:
        predicted, target = e.get("predicted") or {}, e.get("target") or {}
        image = {"file": e["file"], "key": e["key"], "image_status": e["status"],
                 "image_error": e.get("error"), "predicted_index": predicted.get("index"),
                 "predicted_label": predicted.get("label"), "predicted_prob": predicted.get("prob"),
                 "target_index": target.get("index"), "target_label": target.get("label"),
                 "target_score": target.get("score")}
        for method in summary["methods"]:
            record = (e.get("methods") or {}).get(method, {})
            rows.append({**image, "method": method,
                         **{name: value for name, value in record.items()
                            if value is None or isinstance(value, (int, float, str))}})
    return rows


def write_parquet(out_dir, summary):
    """`out_dir/summary.parquet` (parquet_rows), written atomically."""
    require_ray()
    rows = parquet_rows(summary)
    names = list(dict.fromkeys(name for row in rows for name in row))
    table = pyarrow.table({name: [row.get(name) for row in rows] for name in names})
    with atomic_path(Path(out_dir) / "summary.parquet") as tmp:
        parquet.write_table(table, tmp)
