#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh CPU machine: a virtualenv in .venv with the CPU build
# of torch 2.13.0 pinned first (an open 'torch' would pull a multi-GB CUDA build), then qwenlab.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"

# ---- serve (issue 7): Debian's Chromium + chromedriver for the playground's real-browser test --------
# Only when chromium is missing and apt-get is usable as root. Never `playwright install` (it would
# download another browser); the test drives /usr/bin/chromium and fails, not skips, without it.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
