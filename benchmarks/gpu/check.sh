#!/usr/bin/env bash
# One-call GPU check, for a machine with CUDA (e.g. the lent H100/H200, whose image has torch,
# lightning, transformers and peft):
#   1. the memory simulator's methods on the real GPU (benchmarks/memory/measure.py): measured peak
#      vs simulated peak of every method, 1.1B then 7B;
#   2. the `gpu`-marked tests (incl. Lightning's DeepSpeedStrategy ZeRO-2/3 on CUDA);
#   3. peak memory of full / LoRA / LISA / IST / LISA at LoRA's memory through a real Lightning
#      Trainer and weightwise's LayerwiseSampling callback on a 1.1B Llama, on one GPU and under
#      DeepSpeed ZeRO-2.
#   bash benchmarks/gpu/check.sh        # results and logs in $OUT (set by the device tool) or /tmp/weightwise-gpu
# Wheels that image lacks are carried in .whl/ and installed first: deepspeed (sdist only on PyPI:
# `pip wheel --no-deps deepspeed -w .whl`) and its requirements that the image lacks (`pip download
# --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl hjson
# pydantic pydantic-core annotated-types typing-inspection`). Without deepspeed the DeepSpeed tests skip.
# Record what it measured in benchmarks/RESULTS.md with the machine and date.
set -uo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/src:$PWD/examples:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
out=${OUT:-/tmp/weightwise-gpu}
mkdir -p "$out"
{ nvidia-smi; python3 -c "import torch, transformers, lightning, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__)"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; } 2>&1 | tee "$out/versions.txt"
status=0
python3 -m benchmarks.memory.measure --models "${MODELS:-1.1b,7b}" --out "$out" 2>&1 | tee "$out/measure.log" || status=1
python3 -m pytest -m gpu -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.log" || status=1
python3 benchmarks/gpu/layerwise_peak_memory.py --json "$out/layerwise_peak_memory.json" 2>&1 \
  | tee "$out/layerwise_peak_memory.log" || status=1
python3 benchmarks/gpu/layerwise_peak_memory.py --strategy deepspeed_stage_2 --json "$out/layerwise_peak_memory_zero2.json" 2>&1 \
  | tee "$out/layerwise_peak_memory_zero2.log" || status=1
exit $status
