#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh CPU machine: a virtualenv in .venv with the CPU build
# of torch 2.13.0 pinned first (an open 'torch' would pull a multi-GB CUDA build), then qwenlab.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
