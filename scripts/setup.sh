#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh CPU machine: a virtualenv in .venv with the CPU build
# of torch 2.13.0 pinned first (an open 'torch' would pull a multi-GB CUDA build), then qwenlab.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0

# ---- llama-cpp-python, the GGUF peer the tests and `bench --vs llama.cpp` drive ------------------------
# Built from source with this host's probed instruction sets, AMX and GGML_NATIVE off (llama.cpp's AMX path
# dies with SIGILL on some hosts). The wheel is kept under a name that carries a hash of those flags, so a
# wheel built otherwise (pip's own cache, another host's flags) is never reused: pip runs --no-cache-dir.
LLAMA_CPP_VERSION=0.3.36
cmake_args=$(bash scripts/llama_cpp_cmake_args.sh)
flags_key=$(printf '%s %s' "$LLAMA_CPP_VERSION" "$cmake_args" | sha256sum | cut -c1-16)
wheel_dir="${QWENLAB_HOME:-$HOME/.cache/qwenlab}/wheels/llama_cpp_python-$LLAMA_CPP_VERSION-$flags_key"
marker=.venv/.llama_cpp_build
if [ "$(cat "$marker" 2>/dev/null)" != "$flags_key" ]; then
  if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION for this CPU (about 5 minutes on 2 cores): $cmake_args"
    tmp_wheels=$(mktemp -d)
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps \
      --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$tmp_wheels"
    mkdir -p "$(dirname "$wheel_dir")" && rm -rf "$wheel_dir" && mv "$tmp_wheels" "$wheel_dir"
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
  echo "$flags_key" >"$marker"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"

# ---- serve (issue 7): Debian's Chromium + chromedriver for the playground's real-browser test --------
# Only when chromium is missing and apt-get is usable as root. Never `playwright install` (it would
# download another browser); the test drives /usr/bin/chromium and fails, not skips, without it.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
