"""The simulator's methods on a real GPU: peak ``torch.cuda.max_memory_allocated`` per phase, side by
side with the simulated peak of the same method (``results.json`` of :mod:`benchmarks.memory.run`).

The same code runs as under simulation (:func:`benchmarks.memory.methods.prepare` and
:func:`benchmarks.memory.simulate.train_steps`: weightwise's layer freezing, optimizer-state release
and bf16 frozen storage with fp32 masters in host memory), with real CUDA tensors in place of fake ones.
Parameter values are random (memory does not depend on them); no download.

    python -m benchmarks.memory.measure --out DIR                      # every simulated method, 1.1B then 7B
    python -m benchmarks.memory.measure --models 1.1b --methods full,lora,lisa_hand --out DIR

Writes ``DIR/measured.json`` after each method (a run cut short keeps what it measured) and
``DIR/measured.md`` at the end. Needs CUDA; run by ``benchmarks/gpu/check.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.memory.methods import DEFAULT_METHODS, Recipe, prepare
from benchmarks.memory.models import SHAPES
from benchmarks.memory.report import GIB, gib
from benchmarks.memory.run import DEFAULT_OUT
from benchmarks.memory.simulate import train_steps


class CudaAccelerator:
    """The first CUDA device, standing where :class:`benchmarks.memory.tracking.FakeAccelerator` stands
    under simulation; host-memory copies go to the CPU."""

    device = torch.device("cuda")
    host = torch.device("cpu")

    def materialize(self, module: nn.Module) -> nn.Module:
        """Allocate a module built on the ``meta`` device on the GPU with random values (parameters
        N(0, 0.02), floating buffers 1 - e.g. rotary frequencies: finite, which is all memory needs)."""
        module.to_empty(device=self.device)
        with torch.no_grad():
            for param in module.parameters():
                param.normal_(0.0, 0.02)
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    buffer.fill_(1.0)
        return module

    def real(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def from_real(self, compute: Callable[[], Tensor]) -> Tensor:
        return compute().to(self.device)


def measure(model: str, method: str) -> dict:
    """Peak allocated bytes of each phase (as :func:`benchmarks.memory.simulate.simulate` names them)
    of ``method`` on ``model``, and the run's peak."""
    start = time.perf_counter()
    accelerator = CudaAccelerator()
    shape = SHAPES[model]
    run = prepare(Recipe.parse(method), shape, accelerator)
    run.before_step(0)
    phase_peaks: dict[str, int] = {}

    @contextmanager
    def phase(step: str, stage: str) -> Iterator[None]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        phase_peaks[f"{step} {stage}"] = torch.cuda.max_memory_allocated()

    trainable, _ = train_steps(run, shape, accelerator, phase)
    peak_phase = max(reversed(list(phase_peaks)), key=phase_peaks.__getitem__)
    return {
        "model": model,
        "method": method,
        "trainable": trainable,
        "phase_peaks": phase_peaks,
        "peak_phase": peak_phase,
        "peak": phase_peaks[peak_phase],
        "seconds": time.perf_counter() - start,
    }


def simulated_peaks(path: Path) -> dict[tuple[str, str], dict]:
    """(model, method) -> the simulation's JSON row, from a ``results.json`` of :mod:`benchmarks.memory.run`."""
    if not path.exists():
        return {}
    return {(row["model"], row["method"]): row for row in json.loads(path.read_text())["simulations"]}


def table(rows: list[dict], simulated: dict[tuple[str, str], dict]) -> str:
    lines = [
        "| model | method | simulated GiB | measured GiB | error of the simulation | simulated peak phase | measured peak phase |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        sim = simulated.get((row["model"], row["method"]))
        if "error" in row:
            lines.append(f"| {row['model']} | {row['method']} | {gib(sim['total']) if sim else '-'} | {row['error']} | | | |")
            continue
        if sim is None:
            lines.append(f"| {row['model']} | {row['method']} | - | {gib(row['peak'])} | - | - | {row['peak_phase']} |")
            continue
        error = sim["total"] / row["peak"] - 1
        lines.append(
            f"| {row['model']} | {row['method']} | {gib(sim['total'])} | {gib(row['peak'])} | {error:+.1%} | {sim['peak_phase']} | {row['peak_phase']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="1.1b,7b")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--simulated", type=Path, default=DEFAULT_OUT / "results.json", help="the simulation's results.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device; the simulator (python -m benchmarks.memory.run) needs none")
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    header = (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {torch.cuda.get_device_name()}"
        f" ({torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB); torch {torch.__version__};"
        f" transformers {transformers.__version__}; {platform.python_version()}"
    )
    print(header, flush=True)
    rows: list[dict] = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            try:
                row = measure(model, method)
                print(f"{model} {method}: {row['peak'] / GIB:.2f} GiB at {row['peak_phase']} ({row['seconds']:.1f} s)", flush=True)
            except torch.cuda.OutOfMemoryError:
                row = {"model": model, "method": method, "error": "out of memory"}
                print(f"{model} {method}: out of memory", flush=True)
            except Exception as error:  # record any failure and go on to the next method
                row = {"model": model, "method": method, "error": f"{type(error).__name__}: {error}"[:200]}
                traceback.print_exc()
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
            (args.out / "measured.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    report = f"# Simulated vs measured peak memory\n\n{header}\n\n{table(rows, simulated_peaks(args.simulated))}\n"
    (args.out / "measured.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
