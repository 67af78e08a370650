"""The documentation: the site builds with warnings as errors, every command in a page's code
blocks is run by a named test, and the README's links lead to files that exist."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.M | re.S)

# A command's leading words: the tests (or fixtures) that run it. Every flag a page's command
# gives must appear in one of these tests' files. A command in no entry fails
# test_every_command_in_the_pages_is_run_by_a_test: add the test that runs it here.
BRING = "tests/test_bring_your_model.py::"  # docs/bring-your-model.md's export commands
COVERED = {
    "python3 -m venv": ["tests/conftest.py::stock_python"],
    "python3 -m venv .venv-": ["tests/conftest.py::framework_python"],
    ".venv-tf/bin/pip install": ["tests/conftest.py::framework_python"],
    ".venv-jax/bin/pip install": ["tests/conftest.py::framework_python"],
    "python examples/export/torchvision_model.py": [
        BRING + "test_torchvision_export_with_the_imagenet_flags"],
    "python examples/export/timm_model.py": [BRING + "test_timm_export_states_its_contract"],
    ".venv-tf/bin/python examples/export/keras_model.py": [BRING + "test_keras_export_with_tf2onnx_defaults"],
    ".venv-jax/bin/python examples/export/flax_model.py": [BRING + "test_flax_export_with_jax2onnx_defaults"],
    "python examples/export/float16.py": [BRING + "test_float16_conversion"],
    "python examples/export/quantize.py": [BRING + "test_int8_quantization"],
    "pip install": ["tests/conftest.py::stock_python"],
    "python scripts/export_googlenet.py --caffe": ["tests/test_export.py::test_cli_caffe_export"],
    "onnxattr explain": ["tests/test_cli.py::test_method_all_leaves_out_what_does_not_apply",
                         "tests/test_layer_methods.py::test_cli_explains_with_the_three_methods",
                         "tests/test_layout.py::test_output_and_labels_through_the_cli",
                         "tests/test_layout.py::test_layout_and_channel_order_flags_through_the_cli",
                         BRING + "test_torchvision_export_with_the_imagenet_flags"],
    "onnxattr audit": ["tests/test_report.py::test_audit_summary_records_done_and_failed",
                       "tests/test_metrics.py::test_cli_evaluate_and_audit_write_the_metrics",
                       "tests/test_ray.py::test_cli_ray_audit_equals_the_local_one_with_a_worker_killed"],
    "onnxattr evaluate": ["tests/test_metrics.py::test_cli_evaluate_and_audit_write_the_metrics"],
    "onnxattr sanity": ["tests/test_sanity.py::test_cli_writes_the_figures_and_the_json"],
    "onnxattr compile": ["tests/test_compile.py::test_compile_command"],
    "cd examples/node": ["tests/test_node_example.py::node_example"],
    "npm install": ["tests/test_node_example.py::node_example"],
    "node explain.mjs": ["tests/test_node_example.py::test_node_example_matches_python"],
    "python examples/tour.py": ["tests/test_tour.py::test_tour_runs_top_to_bottom"],
    "mkdocs build --strict": ["tests/test_docs.py::test_site_builds_without_warnings"],
}
# The test command itself: it runs this suite, so no test inside it can run it.
THE_TEST_COMMAND = "bash scripts/test.sh"


def commands(text):
    """The commands of a page's shell code blocks: continuation lines joined, spaces
    collapsed, comments dropped, `a && b` split, a leading `.venv/bin/` removed (the
    environment, not the command)."""
    found = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                found += [re.sub(r"^\.venv/bin/", "", " ".join(part.split()))
                          for part in line.split("&&")]
    return found


def page_commands():
    return [(page.relative_to(REPO), command) for page in PAGES
            for command in commands(page.read_text())]


def defined_names(path):
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef)}


def test_commands_are_found_in_shell_blocks_only():
    text = ("```bash\n.venv/bin/pip install -e . && onnxattr explain a.png \\\n  --out o  # x\n"
            "# a comment\n```\n```text\nonnxattr explain IMAGE...\n```\n")
    assert commands(text) == ["pip install -e .", "onnxattr explain a.png --out o"]


def test_every_command_in_the_pages_is_run_by_a_test():
    uncovered = []
    for page, command in page_commands():
        if command.startswith(THE_TEST_COMMAND):
            continue
        prefixes = [prefix for prefix in COVERED if command.startswith(prefix)]
        if not prefixes:
            uncovered.append(f"{page}: {command}")
            continue
        tests = COVERED[max(prefixes, key=len)]
        sources = "".join((REPO / test.split("::")[0]).read_text() for test in tests)
        flags = [flag for flag in re.findall(r"(?<!\S)--?[a-z][\w-]*", command)
                 if flag not in sources]
        if flags:
            uncovered.append(f"{page}: {command} (flags {flags} in none of {tests})")
    assert not uncovered, "commands no test runs:\n" + "\n".join(uncovered)


def test_the_covering_tests_exist_and_are_used():
    for prefix, tests in COVERED.items():
        for test in tests:
            path, name = test.split("::")
            assert name in defined_names(REPO / path), f"{test} (for {prefix!r}) does not exist"
        assert any(command.startswith(prefix) for _, command in page_commands()), \
            f"{prefix!r} is in no page: remove it from COVERED"


def test_readme_links_lead_to_files():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
    assert links
    assert [link for link in links if "://" not in link and not (REPO / link).exists()] == []


def test_site_builds_without_warnings(tmp_path):
    """`mkdocs build --strict` (every warning an error: a broken link, a missing page, a
    docstring mkdocstrings cannot read) into a temporary folder."""
    for package in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(package, reason="the docs build needs the test extras (mkdocs)")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    api = (tmp_path / "site" / "api.html").read_text()
    assert all(name in api for name in ["Explainer", "Explanation", "RenderOptions", "run_audit",
                                        "run_sanity", "compile_model", "OnnxAttrError"])
