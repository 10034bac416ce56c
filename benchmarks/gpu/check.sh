#!/usr/bin/env bash
# One-call GPU check, for a machine with CUDA (e.g. the lent H100/H200, whose image has torch,
# lightning, transformers and peft): the `gpu`-marked tests (incl. Lightning's DeepSpeedStrategy
# ZeRO-2/3 on CUDA) and the peak-memory benchmark of full / LoRA / LISA / IST on a 1.1B Llama, on one
# GPU and under DeepSpeed ZeRO-2.
#   bash benchmarks/gpu/check.sh        # results and logs in $OUT (set by the device tool) or /tmp/weightwise-gpu
# Wheels that image lacks are carried in .whl/ and installed first: deepspeed (sdist only on PyPI:
# `pip wheel --no-deps deepspeed -w .whl`) and its requirements (`pip download --no-deps -d .whl
# hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions einops msgpack
# py-cpuinfo ninja psutil`). A deepspeed that does not import stops the check (the DeepSpeed tests
# would otherwise only skip).
# Record what it measured in benchmarks/RESULTS.md with the machine and date.
# Status: written in tasks without a GPU - it has not been run yet.
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/examples:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=offline
out=${OUT:-/tmp/weightwise-gpu}
mkdir -p "$out"
nvidia-smi | tee "$out/nvidia-smi.txt"
python3 -c "import deepspeed, peft; print('deepspeed', deepspeed.__version__, 'peft', peft.__version__)" | tee "$out/versions.txt"
status=0
python3 -m pytest -m gpu -rs -p no:cacheprovider tests 2>&1 | tee "$out/pytest-gpu.log" || status=1
python3 benchmarks/gpu/layerwise_peak_memory.py --json "$out/layerwise_peak_memory.json" 2>&1 \
  | tee "$out/layerwise_peak_memory.log" || status=1
python3 benchmarks/gpu/layerwise_peak_memory.py --strategy deepspeed_stage_2 --json "$out/layerwise_peak_memory_zero2.json" 2>&1 \
  | tee "$out/layerwise_peak_memory_zero2.log" || status=1
exit $status
