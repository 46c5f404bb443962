#!/usr/bin/env bash
# Install everything the tests need into .venv (once) and run the whole test suite.
# The oracles (transformers 5.23.0 with torchvision) are test-only dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# keep the optional CUDA kernels out: transformers would call them unconditionally on CPU
.venv/bin/python -m pip uninstall -q -y flash-linear-attention causal-conv1d 2>/dev/null || true
# the web chat's browser tests drive Debian's Chromium (Playwright's own browser downloads are not used)
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
exec .venv/bin/python -m pytest -q "$@"
