"""Run many 2-process jobs in ONE launch (CPU, gloo): Lightning starts the second process once, and
every later ``Trainer.fit`` of the script reuses it - a job costs its fit, not a process start-up.

Usage: python -m tests.scripts.suite JOBS.json
JOBS.json: a list of ``{"job": "module:function", "kwargs": {...}}``, run in order on both ranks
(``module`` under ``tests.scripts``). Each job writes its own ``OUT_DIR/rank{r}.pt``.
"""

import importlib
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA on a GPU machine

if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    for job in jobs:
        module, function = job["job"].split(":")
        getattr(importlib.import_module(f"tests.scripts.{module}"), function)(**job["kwargs"])
