"""Choosing the gradient builder, and the on-disk cache of built graphs.

Two builders make d score / d image graphs, with the same signature
`(scored model, wrt tensor, ReLU rule, output) -> model with output <wrt>_grad`:

- "onnxruntime": onnxruntime-training's GradientGraphBuilder (onnxattr.training), the design
  this project started from; it needs the training build (Python <= 3.12, CPU) and emits
  training ops that onnxattr.lowering turns into standard ops;
- "native": onnxattr's own reverse pass (onnxattr.autodiff), standard ops only, any
  onnxruntime, any Python.

"auto" uses onnxruntime-training where it is installed and can differentiate the model (with
the rule asked for), else the native builder, saying why once (a warning, which the CLI prints
as one "note:" line on stderr).
"""

import functools
import hashlib
import os
import warnings
from pathlib import Path

import onnx

from ._version import __version__
from .autodiff import build_native_gradient
from .errors import OnnxAttrError, OnnxAttrNote
from .files import atomic_path
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
    package = Path(__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()


class GraphCache:
    """Built graphs on disk, keyed by the source model's content, the build options (the
    builder among them) and the code that builds them (code_digest)."""

    def __init__(self, directory=None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def path(self, model_digest, **options):
        key = "|".join([model_digest, code_digest(),
                        *(f"{k}={options[k]}" for k in sorted(options))])
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"

    def get_or_build(self, build, model_digest, **options):
        """Load the graph for this key, or `build()` it and store it (atomically)."""
        path = self.path(model_digest, **options)
        if path.exists():
            try:
                return onnx.load(path)
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                path.unlink(missing_ok=True)
        graph = build()
        try:
            with atomic_path(path) as tmp:
                onnx.save(graph, tmp)
        except (OSError, ValueError):
            pass  # an unwritable cache (or a graph over 2 GB) only costs a rebuild next time
        return graph


class MemoryCache:
    """A graph cache in memory (GraphCache's interface); nothing is written to disk."""

    def __init__(self):
        self.graphs = {}

    def get_or_build(self, build, model_digest, **options):
        key = (model_digest, *sorted(options.items()))
        if key not in self.graphs:
            self.graphs[key] = build()
        return self.graphs[key]
