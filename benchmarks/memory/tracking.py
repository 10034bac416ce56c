"""Fake tensors and memory accounting by kind: the only module that touches torch's private APIs.

Tested with torch 2.13.0 (CPU build). Two private pieces are used, both fenced here:

* ``torch._subclasses.fake_tensor.FakeTensorMode``: tensors with shape, dtype and device but no
  storage, so a 7B model trains in a few hundred MB of host memory. Models are built on the
  ``meta`` device and then turned into fake tensors (:meth:`FakeAccelerator.materialize`): building
  them under the fake mode directly works for plain transformers models, but peft's adapter
  injection calls ``Module.to``, which swaps fake parameters in place and fails ("Couldn't swap
  Linear.weight").
* ``torch.distributed._tools.mem_tracker.MemTracker``: a dispatch mode that accounts every live
  storage by kind (parameter, gradient, optimizer state, activation, backward temporary).
  :class:`KindTracker` adapts it in three ways (see its docstring).

Why the fake device is ``cpu`` and not ``cuda``: a CPU-only build of torch creates fake ``cuda``
tensors, but the first autograd node on one aborts the whole process (``terminate called after
throwing ... PyTorch is not linked with support for cuda devices``: autograd's input metadata asks
for the CUDA device guard, which a CPU build lacks). So the simulated accelerator is a fake CPU
device under bf16 CPU autocast; for a Llama the kernels that matter (linear/matmul and SDPA in
bf16, RMSNorm and the loss in fp32, flash-style attention saving only the output and log-sum-exp)
take the same dtypes as under CUDA autocast. CUDA's 512-byte allocation rounding is not applied
(under 0.01% here), and allocator fragmentation is not modelled (``max_memory_allocated`` does not
count it either).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _RefType

# The kinds of memory reported, in stacking order. "optimizer_temporaries" are tensors allocated
# inside ``optimizer.step`` that are not optimizer state (e.g. foreach AdamW's sqrt of the second
# moments, one parameter-sized fp32 buffer per step).
KINDS = ("parameters", "gradients", "optimizer_state", "optimizer_temporaries", "activations", "backward_temporaries")

# MemTracker has no kind for optimizer temporaries; ``Other`` (only used by ``track_external`` for
# loose tensors, which this benchmark never passes) carries them.
_OPTIMIZER_TEMPORARY = _MemRefType.OTH
_KIND_OF: dict[_RefType, str] = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "parameters",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer_state",
    _OPTIMIZER_TEMPORARY: "optimizer_temporaries",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "backward_temporaries",
}


class Accelerator(Protocol):
    """Where a method's model trains: :class:`FakeAccelerator` (simulated) or
    :class:`benchmarks.memory.measure.CudaAccelerator` (a real GPU)."""

    device: torch.device  # the accelerator's tensors' device
    host: torch.device  # where host-memory copies go (weightwise's HostMasters)

    def materialize(self, module: nn.Module) -> nn.Module: ...

    def real(self) -> contextlib.AbstractContextManager[None]: ...

    def from_real(self, compute: Callable[[], Tensor]) -> Tensor: ...


class FakeAccelerator:
    """A fake-tensor world standing in for one accelerator: models, inputs and optimizer state live
    here with their true shapes and dtypes and no storage."""

    device = torch.device("cpu")
    host = torch.device("meta")  # host-memory copies: not on the simulated accelerator, so not counted

    def __init__(self) -> None:
        self.mode = FakeTensorMode()

    def __enter__(self) -> FakeAccelerator:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)

    def materialize(self, module: nn.Module) -> nn.Module:
        """Replace every parameter and buffer of a module built on the ``meta`` device by a fake
        tensor on the simulated device, keeping ``requires_grad`` and tied parameters."""
        converter = self.mode.fake_tensor_converter
        made: dict[int, nn.Parameter] = {}
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is None:
                    continue
                if id(param) not in made:
                    fake = converter.from_meta_and_device(self.mode, param.data, self.device)
                    made[id(param)] = nn.Parameter(fake, requires_grad=param.requires_grad)
                sub._parameters[name] = made[id(param)]
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = converter.from_meta_and_device(self.mode, buffer, self.device)
        return module

    @contextmanager
    def real(self) -> Iterator[None]:
        """Real tensors for a while: for host-side code that reads values (a layer policy's draw, the
        loss weights), which fake tensors do not have."""
        with unset_fake_temporarily():
            yield

    def from_real(self, compute: Callable[[], Tensor]) -> Tensor:
        """Run ``compute`` on real tensors and return its result as a fake tensor."""
        with self.real():
            real = compute()
        return self.mode.from_tensor(real)


class KindTracker(MemTracker):
    """``MemTracker`` that reports the peak of each phase by kind, and works with frozen parameters.

    Changes to ``MemTracker`` (torch 2.13):

    * gradient hooks go only on parameters that require grad: ``MemTracker`` registers them on every
      parameter, which torch refuses for frozen ones. Parameters thawed later get theirs when their
      module runs again after :meth:`reset_mod_stats` (which must be called between iterations anyway);
    * allocations inside ``optimizer.step`` are optimizer temporaries unless they are in the state of
      an optimizer given to :func:`tracking` when a peak is recorded (``MemTracker`` files everything
      allocated in the step as optimizer state, so foreach AdamW's parameter-sized workspace would
      count as state);
    * the peak is kept per phase, ``f"{step} {stage}"`` with both names set by the caller (``MemTracker``'s
      own flag for the optimizer step is not used: it drops before the ``record_function`` exit that
      closes ``optimizer.step``, which would put that moment into the next phase); the per-module
      statistics of ``MemTracker`` - a scan of every module after every op, 70% of the run time - are
      not collected.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        super().__init__()
        self.optimizers = optimizers
        self.step = "setup"
        self.stage = "forward/backward"
        self.phase_peaks: dict[str, dict[str, int]] = {}

    def _track(self, reftype: _RefType, t: Tensor) -> None:
        super()._track(_OPTIMIZER_TEMPORARY if reftype is _MemRefType.OPT else reftype, t)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param, None) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._tag_gradient),
                        param.register_post_accumulate_grad_hook(lambda p: self._tag_gradient(p.grad)),
                    )
        return memory

    def _tag_gradient(self, grad: Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _accelerator_snapshots(self) -> list[dict]:
        """The snapshots of the simulated accelerator (the fake CPU device); host-memory stand-ins
        (the ``meta`` device) are not the accelerator's."""
        return [snapshot for device, snapshot in self._curr_mem_snap.items() if torch.device(device).type == FakeAccelerator.device.type]

    def _update_peak_stats(self, peak_state: Any) -> None:
        phase = f"{self.step} {self.stage}"
        total = sum(snapshot[_TOTAL_KEY] for snapshot in self._accelerator_snapshots())
        if total > sum(self.phase_peaks.get(phase, {"": -1}).values()):
            if self._in_opt:
                for optimizer in self.optimizers:
                    self._track_optimizer_states(_MemRefType.OPT, optimizer)
            self.phase_peaks[phase] = self.current()

    def current(self) -> dict[str, int]:
        """Live bytes by kind on the simulated accelerator."""
        out = dict.fromkeys(KINDS, 0)
        for snapshot in self._accelerator_snapshots():
            for ref, nbytes in snapshot.items():
                if ref != _TOTAL_KEY:
                    out[_KIND_OF[ref]] += nbytes
        return out


@contextmanager
def tracking(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[KindTracker]:
    """A :class:`KindTracker` that already accounts the model's parameters and buffers and the
    optimizer's state, entered."""
    tracker = KindTracker([optimizer])
    tracker.track_external(model, optimizer)
    with tracker:
        yield tracker
