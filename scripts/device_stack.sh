#!/usr/bin/env bash
# Rehearse the lent H200's software on this CPU: a virtual environment with its Python (3.12),
# torch 2.11 and Triton 3.6 (../shared/device/README.md) and the wheels it is given, the
# project on PYTHONPATH as bench/run_gpu.sh has it there; then run a command in it.
#
#   scripts/device_stack.sh python -m pytest -q tests/kernels    # the suite, interpreter
#   scripts/device_stack.sh python scripts/compile_check.py      # kernels for sm_90, Triton 3.6
#
# The first call installs torch's CUDA build and its NVIDIA libraries from PyPI into
# .venv-device/ (2.4 min here on 2026-12-02, the kernel tests included).
# numpy stays below 2.4: Triton 3.6's interpreter fails on numpy 2.5 ("only 0-dimensional
# arrays can be converted to Python scalars"; seen 2026-12-02), which the GPU never runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DEVICE_VENV:-.venv-device}
WHEELS=${DEVICE_WHEELS:-../shared/device/wheels}
if [ ! -f "$VENV/.installed" ]; then
  py=
  for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python; do
    if "$candidate" -c "" 2>/dev/null; then py=$candidate; break; fi
  done
  [ -n "$py" ] || { echo "device_stack.sh: no working Python 3.12 found" >&2; exit 1; }
  "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 \
    "numpy<2.4" pillow opencv-python-headless pytest pytest-benchmark pyyaml tqdm portalocker
  "$VENV/bin/python" -m pip install -q --no-deps "$WHEELS"/*.whl
  touch "$VENV/.installed"
fi
export PATH="$(cd "$VENV" && pwd)/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
