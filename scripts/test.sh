#!/usr/bin/env bash
# The README's test command: a fresh virtual environment with the test extras, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium for the audit page test (tests/test_report.py skips without it): Debian's
# package, installed only when missing, where apt-get exists and we are root.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
    >/dev/null 2>&1 || echo "note: could not install chromium; the audit page test will skip" >&2
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check .
# The Keras exporter's environment (.venv-tf, tests/conftest.py::framework_python): made by the
# first run that needs it (about 3 minutes, 1.6 GB), then kept; the cheapest of the non-PyTorch
# exporters to run (jax2onnx installs as long and exports slower), and test_keras checks it
# against TensorFlow's float64 gradient.
export ONNXATTR_MAKE_VENVS="${ONNXATTR_MAKE_VENVS-tf}"
exec .venv/bin/python -m pytest "$@"
