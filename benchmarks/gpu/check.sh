#!/usr/bin/env bash
# One-call GPU check, for a machine with CUDA (e.g. the lent H100/H200, whose image has torch,
# lightning and transformers): runs every `gpu`-marked test and keeps the logs.
#   bash benchmarks/gpu/check.sh            # logs to $OUT (set by the device tool) or /tmp/weightwise-gpu
# Wheels that image lacks (deepspeed, wandb, ...) can be carried in .whl/ and are installed first.
# Record what it measured in benchmarks/RESULTS.md with the machine and date.
# Status: written in a task without a GPU - it has not been run yet.
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=offline
out=${OUT:-/tmp/weightwise-gpu}
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
python3 -m pytest -m gpu -rs -p no:cacheprovider tests 2>&1 | tee "$out/pytest-gpu.log"
