"""Choosing the gradient builder, and the on-disk cache of built graphs.

Two builders make d score / d image graphs, with the same signature
`(scored model, wrt tensor, ReLU rule, output) -> model with output <wrt>_grad`:

- "onnxruntime": onnxruntime-training's GradientGraphBuilder (onnxattr.graph.training), the design
  this project started from; it needs the training build (Python <= 3.12, CPU) and emits
  training ops that onnxattr.graph.lowering turns into standard ops;
- "native": onnxattr's own reverse pass (onnxattr.graph.autodiff), standard ops only, any
  onnxruntime, any Python.

"auto" uses onnxruntime-training where it is installed and can differentiate the model (with
the rule asked for), else the native builder, saying why once (a warning, which the CLI prints
as one "note:" line on stderr).
"""

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .._version import __version__
from ..errors import OnnxAttrError, OnnxAttrNote
from ..io.files import atomic_path
from .autodiff import build_native_gradient
from .prepare import TRAINING_FIXES
from .runtime import onnxruntime
from .training import build_training_gradient, has_training_builder

BUILDERS = {"onnxruntime": build_training_gradient, "native": build_native_gradient}
FORWARD_FIXES = {"onnxruntime": TRAINING_FIXES, "native": None}
CHOICES = ("auto", *BUILDERS)


def check_builder(builder):
    if builder not in CHOICES:
        raise OnnxAttrError(f"unknown builder '{builder}' (choose {', '.join(CHOICES)})")
    return builder


def candidates(builder):
    """The builders to try, in order, for a choice."""
    check_builder(builder)
    if builder != "auto":
        return [builder]
    return ["onnxruntime", "native"] if has_training_builder() else ["native"]


def note_fallback(tried, error, used):
    """Say that `auto` fell back from one builder to another, and why."""
    warnings.warn(f"the {tried} builder cannot do this ({error}); using the {used} builder",
                  OnnxAttrNote, stacklevel=3)


def default_cache_dir():
    """$ONNXATTR_CACHE, else ~/.cache/onnxattr."""
    return Path(os.environ.get("ONNXATTR_CACHE") or Path.home() / ".cache" / "onnxattr")


@functools.cache
def code_digest():
    """A digest of what makes the graphs: onnxattr's own source files, its version and
    onnx's and onnxruntime's versions. A graph built by other code is never reused: the
    version alone missed every change between releases (a fix to a backward form left the old
    graph in use, silently)."""
    digest = hashlib.sha256("|".join([__version__, onnx.__version__, getattr(
        onnxruntime, "__version__", "none")]).encode())
    package = Path(__file__).parents[1]  # onnxattr/, every layer
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()


class GraphCache:
    """Built graphs on disk, keyed by the source model's content, the build options (the
    builder among them) and the code that builds them (code_digest).

    An entry is one file, <32 hex digits of the key's sha256>.graph, written atomically: a line
    of JSON {"key": the full key, "sha256": the digest of the rest}, then the serialized graph.
    It is used only when it states this key and its bytes have that digest: anything else
    (empty, truncated, changed, another key's entry copied over, unreadable) is rebuilt and
    overwritten. An entry that cannot be written (the cache is read-only, a file, or a
    directory stands at the entry's path) is a note: the graph is rebuilt on each run."""

    def __init__(self, directory=None):
        self.directory = Path(directory) if directory else default_cache_dir()

    @staticmethod
    def key(model_digest, **options):
        return "|".join([model_digest, code_digest(),
                         *(f"{k}={options[k]}" for k in sorted(options))])

    def path(self, model_digest, **options):
        key = self.key(model_digest, **options)
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.graph"

    def get_or_build(self, build, model_digest, **options):
        """The graph for this key from its entry, or `build()` it and store it."""
        key, path = self.key(model_digest, **options), self.path(model_digest, **options)
        graph = _read_entry(path, key)
        if graph is None:
            graph = build()
            _write_entry(path, key, graph)
        return graph


def _read_entry(path, key):
    """The graph in the cache entry at `path` if it is `key`'s and intact, else None."""
    if not path.is_file():  # missing, or a directory or FIFO: never opened
        return None
    try:
        data = path.read_bytes()
        split = data.find(b"\n") + 1 or len(data)
        body = memoryview(data)[split:]  # no copy of the graph's bytes
        if json.loads(data[:split]) == {"key": key, "sha256": hashlib.sha256(body).hexdigest()}:
            graph = onnx.ModelProto()
            graph.ParseFromString(body)
            return graph
    except (OSError, ValueError, DecodeError):  # unreadable, or not JSON
        pass
    return None


def _write_entry(path, key, graph):
    try:
        body = graph.SerializeToString()
        header = json.dumps({"key": key, "sha256": hashlib.sha256(body).hexdigest()})
        with atomic_path(path) as tmp, open(tmp, "wb") as stream:
            stream.write(header.encode() + b"\n")
            stream.write(body)  # not joined to the header: no second copy of the graph
    except (OSError, ValueError) as err:  # an unwritable cache, or a graph over 2 GB
        reason = getattr(err, "strerror", None) or err
        warnings.warn(f"cannot write the graph cache entry {path} ({reason}); graphs are "
                      "rebuilt on each run", OnnxAttrNote, stacklevel=4)


class MemoryCache:
    """A graph cache in memory (GraphCache's interface); nothing is written to disk."""

    def __init__(self):
        self.graphs = {}

    def get_or_build(self, build, model_digest, **options):
        key = (model_digest, *sorted(options.items()))
        if key not in self.graphs:
            self.graphs[key] = build()
        return self.graphs[key]
