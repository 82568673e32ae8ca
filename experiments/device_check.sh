#!/usr/bin/env bash
# The first accelerator numbers on a machine with one NVIDIA GPU, in under 8 minutes:
#   bash experiments/device_check.sh           # installs requirements-gpu.txt + the reference stack, then runs
#   bash experiments/device_check.sh --tiny    # every size shrunk, on any machine, with $PYTHON (no install)
# Prints the loss benchmark, the 468M train step (xla and cudnn attention) and the reference
# PyTorch stack at the same batch; see experiments/device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--tiny" ]; then
  exec "${PYTHON:-python3}" experiments/device_check.py --tiny
fi
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  # jax's CUDA plugin, and torch's default (CUDA) wheel for the reference stack.
  .venv-gpu/bin/pip install -q -r requirements-gpu.txt torch==2.13.0 transformers==5.23.0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 480 .venv-gpu/bin/python experiments/device_check.py "$@"
