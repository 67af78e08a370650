"""The package's shape, checked: no import cycle between its modules (function-local imports
included), no function-local imports, no module over 500 lines, no function over 60, and a new
ReLU backward rule is one entry of one table."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxattr import Explainer, compile_model
from onnxattr.graph import relu_rules
from onnxattr.methods.table import METHODS, compilable_methods

import small_models

PACKAGE = Path(__file__).resolve().parents[1] / "onnxattr"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# the allowed function-local imports: onnxruntime under a hidden torch (runtime.py), and fcntl
# where the audit's folder lock is taken (files.py: POSIX only, so the package imports anywhere),
# the Ray engine when an audit asks for it (report.py) and pyarrow when a Parquet list
# (path_list.py) or a URI (remote.py) is read: `import onnxattr` stays without Ray and
# pyarrow's 100 MB (test below)
LOCAL_IMPORTS_ALLOWED = {("runtime.py", "onnxruntime"), ("files.py", "fcntl"),
                         ("report.py", "ray_audit"), ("path_list.py", "pyarrow.parquet"),
                         ("remote.py", "pyarrow.fs")}


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """The onnxattr modules `path` imports (any scope), by their dotted names."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("onnxattr"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("onnxattr"))
    known = {module_name(p) for p in modules()}
    return {name for name in found if name in known and name != here}


# The layers, lowest first: a module imports from its own layer and the ones below only. The
# package's base (errors, _version) is below them all; the public API (onnxattr/__init__.py,
# onnxattr/ray.py: `from onnxattr.ray import Attribute`) and __main__ sit above.
LAYERS = ["io", "graph", "methods", "app"]
BASE = {"onnxattr.errors", "onnxattr._version"}
ABOVE = {"onnxattr", "onnxattr.ray", "onnxattr.__main__"}


def layer_of(name):
    """The layer index of module `name` (onnxattr.<layer>...), -1 for the base, None above."""
    parts = name.split(".")
    if name in BASE:
        return -1
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer():
    homeless = [module_name(p) for p in modules() if layer_of(module_name(p)) is None
                and module_name(p) not in ABOVE]
    assert not homeless, homeless


def test_imports_only_go_down_the_layers():
    upward = []
    for path in modules():
        here = layer_of(module_name(path))
        if here is None:
            continue
        for other in imported_modules(path):
            there = layer_of(other)
            if there is None or there > here:
                upward.append(f"{module_name(path)} -> {other}")
    assert not upward, upward


def test_no_import_cycles():
    graph = {module_name(p): imported_modules(p) for p in modules()}
    for name in graph:  # a package imports its own modules: only module-to-module edges count
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")
                       and not (m.startswith(name + ".") and name.count(".") < m.count("."))}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = trail[trail.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            visit(other, trail + [name])
        state[name] = "done"
    for name in sorted(graph):
        visit(name, [])


def test_no_function_local_imports():
    found = []
    for path in modules():
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names]
                    if not all((path.name, n) in LOCAL_IMPORTS_ALLOWED for n in names):
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {names}")
    assert not found, found


def test_the_package_and_its_cli_import_no_optional_heavyweights():
    """Ray, pyarrow and torch load only where asked for (a Ray audit, a Parquet list, a bench)."""
    code = ("import sys, onnxattr, onnxattr.app.cli; "
            "print([m for m in ('ray', 'pyarrow', 'pandas', 'torch') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for path in modules():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.name} ({length})")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def absolute(em, dy, active, out=None):
    """A throwaway rule: dX = |dY| where the unit is active."""
    return relu_rules.vanilla(em, em.op("Abs", dy), active, out)


def test_a_new_relu_rule_is_one_table_entry(tmp_path, monkeypatch, builder):
    """Adding one entry to RELU_RULES makes a method that explains, compiles and is listed."""
    monkeypatch.setitem(relu_rules.RELU_RULES, "absolute",
                        relu_rules.ReluRule("absolute", "Absolute Backprop", absolute))
    assert "absolute" in METHODS and "absolute" in compilable_methods()
    model = small_models.conv_relu_maxpool_lrn()
    path = small_models.save(model, tmp_path / "m.onnx")
    explainer = Explainer(path, cache_dir=tmp_path / "cache", builder=builder)
    pixels = np.random.default_rng(0).uniform(0, 255, (1, 3, 8, 8)).astype(np.float32)
    got = explainer.engine.gradient(pixels, [2], "absolute")[0]
    guided = explainer.engine.gradient(pixels, [2], "guided")[0]
    plain = explainer.engine.gradient(pixels, [2], "vanilla")[0]
    assert not np.allclose(got, plain) and not np.allclose(got, guided)
    image = pixels[0].transpose(1, 2, 0).astype(np.uint8)
    result = explainer.explain(image, "absolute", target=2)
    assert result.title == "Absolute Backprop (class 2)"
    compile_model(path, "absolute", output=tmp_path / "c.onnx", cache_dir=tmp_path / "cache",
                  builder=builder)
    compiled = Explainer(tmp_path / "c.onnx")
    np.testing.assert_allclose(compiled.engine.gradient(pixels, [2], "absolute")[0], got,
                               rtol=1e-5, atol=1e-7)
