"""The GPU benchmark scripts run on CPU with a tiny model, so they cannot rot between GPU tasks."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "layerwise_peak_memory.py"


def test_layerwise_peak_memory_script_measures_every_method(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--seq", "16", "--steps", "4", "--batch", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"full", "lora", "lisa", "ist", "lisa_layers_bf16", "lisa_layers_bf16_ckpt"}
    assert "| lisa |" in done.stdout
    # 2 of 6 layers plus embeddings and head train under LISA/IST: fewer than full, more than LoRA.
    for method in ("lisa", "ist"):
        assert rows["lora"]["trainable_at_end"] < rows[method]["trainable_at_end"] < rows["full"]["trainable_at_end"]
        assert rows[method]["adam_state_mib"] < rows["full"]["adam_state_mib"]
    # Without embeddings and head only the 2 sampled layers train.
    for method in ("lisa_layers_bf16", "lisa_layers_bf16_ckpt"):
        assert rows[method]["trainable_at_end"] < rows["lisa"]["trainable_at_end"]
    assert all(r["peak_allocated_mib"] is None for r in rows.values())  # CPU: no CUDA peak to report


def test_the_gpu_measurement_runs_the_simulated_methods_on_real_tensors():
    """benchmarks.memory.measure on a CPU stand-in for the GPU: real tensors through the same recipes."""
    import contextlib

    import torch

    from benchmarks.memory.measure import CudaAccelerator
    from benchmarks.memory.methods import Recipe, prepare
    from benchmarks.memory.models import SHAPES
    from benchmarks.memory.simulate import STEPS, train_steps

    class HostAsAccelerator(CudaAccelerator):
        device = torch.device("cpu")

    for method in ("full", "lisa_layers+bf16frozen+ckpt"):
        run = prepare(Recipe.parse(method), SHAPES["tiny"], HostAsAccelerator())
        run.before_step(0)
        phases: list[str] = []

        def phase(step: str, stage: str, phases: list[str] = phases) -> contextlib.AbstractContextManager[None]:
            phases.append(f"{step} {stage}")
            return contextlib.nullcontext()

        trainable, state = train_steps(run, SHAPES["tiny"], HostAsAccelerator(), phase)
        assert len(trainable) == STEPS and len(phases) == 3 * STEPS - 1
        assert all(torch.isfinite(p).all() for p in run.model.parameters())
        dtypes = {p.dtype for p in run.model.parameters() if not p.requires_grad}
        assert dtypes == ({torch.bfloat16} if "bf16frozen" in method else set())
