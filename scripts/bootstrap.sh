#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the engine, the `ra` command and the
# test tools. torch is pinned to the build that the project is tested with (a CUDA build that also runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
