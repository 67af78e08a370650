#!/usr/bin/env bash
# onnxattr on an NVIDIA GPU: CUDA against CPU, every node on CUDA, timings against Captum.
#
#   bash scripts/gpu_check.sh --prepare [DIR]   # here: copies the BVLC Caffe files into DIR
#   bash scripts/gpu_check.sh [DIR]             # on the GPU machine
#
# DIR defaults to build/gpu_check (git-ignored). The GPU machine needs onnxattr's dependencies
# with onnxruntime-gpu instead of onnxruntime (for the Captum timings also torch and captum);
# see scripts/gpu_check.py for what runs and the exit codes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" == "--prepare" && -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
