"""Peak accelerator memory of fine-tuning methods, simulated on CPU with fake tensors.

A training step runs on fake tensors (shapes and dtypes, no storage) while a memory tracker
accounts every live tensor by kind - parameters, gradients, optimizer state, optimizer temporaries,
activations, backward temporaries - so a 7B model's peak is simulated in seconds on a laptop.
Validated against ``torch.cuda.max_memory_allocated`` on an H100 (see ``run.py``).

Modules: :mod:`~benchmarks.memory.tracking` (the fenced private torch APIs),
:mod:`~benchmarks.memory.models` (Llama shapes), :mod:`~benchmarks.memory.methods` (full, LoRA,
LISA/IST/BAdam through weightwise, and ingredients), :mod:`~benchmarks.memory.simulate` (one run),
:mod:`~benchmarks.memory.zero` (analytic ZeRO per-rank estimate), :mod:`~benchmarks.memory.report`
(tables, JSON, chart), :mod:`~benchmarks.memory.run` (the command line).

Run: ``python -m benchmarks.memory.run [--models 1.1b,7b] [--methods ...] [--out DIR]``
"""
