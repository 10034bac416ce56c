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
    assert set(rows) == {"full", "lora", "lisa", "ist"}
    assert "| lisa |" in done.stdout
    # 2 of 6 layers plus embeddings and head train under LISA/IST: fewer than full, more than LoRA.
    for method in ("lisa", "ist"):
        assert rows["lora"]["trainable_at_end"] < rows[method]["trainable_at_end"] < rows["full"]["trainable_at_end"]
        assert rows[method]["adam_state_mib"] < rows["full"]["adam_state_mib"]
    assert all(r["peak_allocated_mib"] is None for r in rows.values())  # CPU: no CUDA peak to report
