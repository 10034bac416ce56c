"""Counting the FLOPs a training run spends: every forward and backward, whoever runs it.

The functional core of compute accounting (docs/architecture.md, "Compute accounting"). A
:class:`ComputeMeter` watches every ``nn.Module`` call in the process while it is installed (global
module hooks), and counts each *outermost* call - a call made while no other module runs, such as
the trained model's forward in ``training_step``, a reference model's forward, a scoring pass or a
probe. Wrappers of the trained module (DDP, DeepSpeed's engine, Lightning's wrapper) are looked
through, so the counted calls are the same on one device and under a strategy. A module once
called outermost gets hooks of its own; inside its later calls whose count is cached, the global
hooks are lifted, so the modules inside run PyTorch's hook-free fast path (the overhead is a few
hooks a step, not one per module call).

What is counted, and how (``torch.utils.flop_counter.FlopCounterMode`` does the counting: matrix
products, convolutions and attention, the operations that dominate a network's cost; elementwise
operations count zero). It lacks a formula for ``torch._grouped_mm``, the product transformers 5 runs
a Mixture-of-Experts' experts with: weightwise passes one (``integrations/torch.py``; a top-K MoE then
counts what its eager per-expert loop counts, tested). What it still misses: the CPU SDPA kernel
(use ``attn_implementation="eager"`` for counted attention on CPU).

* **Forward**: the first call with a given *signature* - the module and its size, its inputs'
  shapes and dtypes, its other (scalar) arguments, grad mode and train/eval mode - runs under
  ``FlopCounterMode``; later calls with that signature add the cached count. A counting mode
  observes the operations and changes none of them, and nothing runs twice, so training is bit for
  bit the one without the meter. FLOPs that depend on the *values* (an implementation that computes
  only the rows routed to each expert) are those of the first call of each signature;
  ``measure="every_call"`` counts every call.
* **Backward**: by default a rule applied to the forwards with gradients since the last backward
  (:func:`backward_by_rule`), from the FLOPs each module call of the measured forward spent itself:
  a module with parameters (a linear layer) costs its forward once more for its input's gradient,
  if anything before it trains, and once more for its weights', if they train; a module without
  (attention's products between activations) twice, if anything before it trains. With every
  parameter trainable this is the 6N rule (backward = 2 x forward; it matches ``FlopCounterMode``
  on a Llama's backward, tested); with frozen layers (LayerwiseSampling) it drops the weight
  gradients they skip and everything below the lowest trainable layer, as autograd does (tested
  against ``FlopCounterMode``). It re-evaluates when the trainable set changes. Where it is an
  approximation: a module mixing weight products and activation products in its own code (not in
  child modules) is counted as weight products; branches are ordered by when their calls ended.
  ``backward="measured"`` runs the backward itself under ``FlopCounterMode`` (once per forward
  signature and trainable set) and is exact, activation checkpointing's recomputation included -
  but a counting mode over the backward changes its floating-point summation order (gradients
  differ in the last bits: measured), so it is an option, not the default. Forward counting leaves
  results bit for bit unchanged (tested).
* **Tokens**: ``tokens`` are the tokens of the training batches (what the run consumes, before any
  selection); ``backward_tokens`` those of the trained model's forwards with gradients (the rows the
  loss was backpropagated from). A batch's tokens: the elements of its ``input_ids`` (padding
  included), else of its first integer tensor with two or more dimensions; data without token ids
  counts a sample (a row) as one token.
* **Sources**: each call is attributed to one of :data:`SOURCES`: the trained model with gradients
  is ``"model"`` (forward and backward), a module outside the trained model is ``"reference_model"``,
  and a forward of the trained model without gradients is what the innermost :func:`spending` block
  names (``"selection_forward"``, ``"scoring"``, ``"probes"``) or ``"no_grad_forward"``.

FLOPs outside any module call (a functional ``F.linear`` in ``training_step``) are not seen in the
forward; keep the model's compute in modules.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from weightwise.integrations.torch import EXTRA_FLOP_FORMULAS

SOURCES = ("model", "selection_forward", "reference_model", "scoring", "probes", "no_grad_forward")
"""Where FLOPs are spent; :attr:`Spent.by_source` has one entry for each."""

Backward = Literal["rule", "measured"]
Source = Literal["model", "selection_forward", "reference_model", "scoring", "probes", "no_grad_forward"]
Measure = Literal["per_signature", "every_call"]
TokenCounter = Callable[[Any], "int | None"]

_SPENDING: list[str] = []  # the sources named by the open spending() blocks, innermost last


@contextlib.contextmanager
def spending(source: Source) -> Iterator[None]:
    """Forwards of the trained model without gradients inside the block count as ``source``.

    weightwise's own passes name themselves (online selection's extra forward, scoring passes,
    IST's probes); a user's extra passes can too. Costs nothing when no meter is installed.

    Raises:
        ValueError: a source not in :data:`SOURCES`.

    Example::

        >>> from weightwise.compute import spending
        >>> with spending("scoring"):
        ...     pass
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    _SPENDING.append(source)
    try:
        yield
    finally:
        _SPENDING.pop()


def count_tokens(value: Any) -> int | None:
    """The tokens of a batch (or of a call's arguments): see the module docstring. ``None``: no tensor found."""
    integer = _first(value, lambda t: not t.is_floating_point() and not t.is_complex() and t.ndim >= 2, prefer="input_ids")
    if integer is not None:
        return integer.numel()
    first = _first(value, lambda t: t.ndim >= 1, prefer=None)
    return None if first is None else int(first.shape[0])


def _first(value: Any, accept: Callable[[Tensor], bool], prefer: str | None) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if accept(value) else None
    if isinstance(value, Mapping):
        if prefer is not None and isinstance(value.get(prefer), Tensor) and accept(value[prefer]):
            return value[prefer]
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first(item, accept, prefer)
            if found is not None:
                return found
    return None


def _signature(value: Any, out: list[Any]) -> None:
    """Append what determines a call's FLOPs: tensors' shapes and dtypes, small scalar arguments."""
    if isinstance(value, Tensor):
        out.append((tuple(value.shape), value.dtype))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            out.append(key)
            _signature(item, out)
    elif isinstance(value, (list, tuple)):
        out.append(len(value))
        for item in value:
            _signature(item, out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out.append(value)
    else:
        out.append(type(value))


def _call_key(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A call's signature: the module, its size (a surgery that grows it - expert upcycling - changes
    its FLOPs), grad and train modes, and its arguments' shapes, dtypes and scalar values."""
    parts: list[Any] = [id(module), sum(p.numel() for p in module.parameters()), torch.is_grad_enabled(), module.training]
    _signature(args, parts)
    _signature(kwargs, parts)
    return tuple(parts)


@dataclass
class Spent:
    """What a run has spent (summed over ranks when it comes from :class:`~weightwise.compute.ComputeBudget`).

    Attributes:
        forward_flops: FLOPs of every counted forward (all sources).
        backward_flops: FLOPs of the backward passes.
        tokens: tokens of the training batches consumed.
        backward_tokens: tokens the trained model backpropagated.
        by_source: FLOPs by :data:`SOURCES` (``"model"``: its forwards with gradients and every backward).
    """

    forward_flops: int = 0
    backward_flops: int = 0
    tokens: int = 0
    backward_tokens: int = 0
    by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    model_forward_flops: int = 0
    """Forward FLOPs of the trained model's calls with gradients (the base of :attr:`flops_saved`)."""

    @property
    def flops(self) -> int:
        """All FLOPs: forward plus backward."""
        return self.forward_flops + self.backward_flops

    @property
    def flops_saved(self) -> float | None:
        """FLOPs saved against training every consumed token with a full forward and backward.

        The plain-training cost per token is this run's own: (forward with gradients + backward) per
        backpropagated token, so plain training saves exactly 0, online selection saves the
        backward and grad-forward of the rows it skipped less its extra forward, and scoring,
        reference-model and probe FLOPs count against it. Pruning's savings show as fewer
        :attr:`tokens`, not here; frozen layers' savings are in the per-token cost itself. ``None``
        before any token was backpropagated.
        """
        if self.backward_tokens == 0:
            return None
        per_token = (self.model_forward_flops + self.backward_flops) / self.backward_tokens
        return per_token * self.tokens - self.flops

    def as_vector(self) -> list[int]:
        """The counters in a fixed order (for a sum over ranks)."""
        return [self.backward_flops, self.tokens, self.backward_tokens, self.model_forward_flops, *(self.by_source[s] for s in SOURCES)]

    @classmethod
    def from_vector(cls, values: list[int]) -> Spent:
        backward, tokens, backward_tokens, model_forward, *sources = (int(v) for v in values)
        by_source = dict(zip(SOURCES, sources))
        forward = sum(by_source.values()) - backward  # "model" holds its forward and the backward
        return cls(forward, backward, tokens, backward_tokens, by_source, model_forward)

    def __add__(self, other: Spent) -> Spent:
        return Spent.from_vector([a + b for a, b in zip(self.as_vector(), other.as_vector())])


@dataclass
class _Call:
    root: nn.Module
    key: tuple[Any, ...] | None
    counter: FlopCounterMode | None
    source: str
    grad: bool
    frames: list[list[Any]] = field(default_factory=list)  # while measured: [start FLOPs, children's FLOPs] per open call
    parts: list[_Part] = field(default_factory=list)
    upstream: bool = False  # while measured: a parameter of an ended call trains
    reentries: int = 0  # calls of the root module inside itself


_Part = tuple[int, tuple[nn.Parameter, ...], bool]
"""One module call inside a measured forward, in the order the calls ended: the FLOPs of its own
operations (not its children's), its own parameters (``recurse=False``), and whether it is
constant - without parameters, and its output needed no gradient although a parameter before it
trained (rotary position tables)."""


def _needs_grad(value: Any) -> bool:
    """Whether a call's inputs or output (tensors, or tensors in a tuple, list or mapping) need gradients."""
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, Mapping):
        value = list(value.values())
    return isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) and v.requires_grad for v in value)


def backward_by_rule(parts: list[_Part], inputs_need_grad: bool) -> int:
    """The backward FLOPs of a forward made of ``parts`` (2 x forward where everything trains).

    A product of an input and a weight (a module with parameters) needs one product of the same
    cost for the input's gradient - if anything before it trains, or the inputs need gradients -
    and one for the weight's, if the weight trains; products between activations (a module without
    parameters: attention) need two, if anything before them trains, else none. "Before" is the
    order in which the calls ended, which is the data's order through a stack of layers.
    """
    upstream, total = inputs_need_grad, 0
    for flops, params, constant in parts:
        trains = any(p.requires_grad for p in params)
        if params:
            total += flops * (int(upstream) + int(trains))
        elif upstream and not constant:
            total += 2 * flops
        upstream = upstream or trains
    return total


class ComputeMeter:
    """Counts the FLOPs and tokens spent while installed (see the module docstring).

    Use as a context manager in any loop, wrapping each backward in :meth:`backward`; the counts of
    this process accumulate in :attr:`spent`, and :meth:`take` hands them over (e.g. to be summed
    over ranks). :class:`~weightwise.compute.ComputeBudget` drives it for a Lightning fit.

    Args:
        model: the trained model (its calls with gradients are ``"model"``; modules outside it are
            ``"reference_model"``).
        measure: ``"per_signature"`` (count each call signature once, then reuse) or
            ``"every_call"`` (count every call; exact for value-dependent FLOPs, slower).
        backward: ``"rule"`` (:func:`backward_by_rule`; training bit-identical) or ``"measured"``
            (``FlopCounterMode`` over the backward, once per forward signature and trainable set:
            exact, but it changes the backward's floating-point summation order - gradients differ
            in the last bits from a run without it).

    Raises:
        ValueError: an unknown ``measure`` or ``backward``.

    Example::

        >>> import torch
        >>> from weightwise.compute import ComputeMeter
        >>> model = torch.nn.Linear(4, 2)
        >>> with ComputeMeter(model) as meter:
        ...     loss = model(torch.randn(3, 4)).sum()
        ...     with meter.backward():
        ...         loss.backward()
        >>> meter.spent.forward_flops, meter.spent.backward_flops  # the input needs no gradient: the weight's only
        (48, 48)
    """

    def __init__(self, model: nn.Module, measure: Measure = "per_signature", backward: Backward = "rule") -> None:
        if measure not in ("per_signature", "every_call"):
            raise ValueError(f"measure must be 'per_signature' or 'every_call', got {measure!r}")
        if backward not in ("rule", "measured"):
            raise ValueError(f"backward must be 'rule' or 'measured', got {backward!r}")
        self.model = model
        self.measure: Measure = measure
        self.backward_count: Backward = backward
        self.spent = Spent()
        self.paused = False
        self._forward_cache: dict[tuple[Any, ...], tuple[int, int | None, list[_Part]]] = {}
        self._backward_cache: dict[tuple[Any, ...], int] = {}
        self._kinds: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules called outermost, with their own hooks
        self._root_hooks: list[Any] = []
        self._global_hooks: list[Any] = []
        self._installed = False
        self._call: _Call | None = None
        self._grad_calls: list[tuple[tuple[Any, ...], bool, list[_Part]]] = []  # (signature, inputs need grad, parts) awaiting a backward
        self._backward: tuple[tuple[Any, ...], FlopCounterMode | None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def install(self) -> None:
        """Start counting (global module hooks); :meth:`uninstall` removes every hook."""
        if not self._installed:
            self._installed = True
            self._watch_all()

    def uninstall(self) -> None:
        """Stop counting and remove every hook; safe to call more than once, also after an error."""
        for handle in (*self._global_hooks, *self._root_hooks):
            handle.remove()
        self._global_hooks, self._root_hooks, self._installed = [], [], False
        self._roots = weakref.WeakSet()
        if self._call is not None and self._call.counter is not None:
            self._call.counter.__exit__(None, None, None)
        self.abort_backward()
        self._call = None

    def _watch_all(self) -> None:
        # Every module call in the process goes through PyTorch's slower hook path while these are
        # registered, so they are lifted for the inside of a counted call that needs no measuring
        # (docs/architecture.md, "Compute accounting").
        if self._installed and not self._global_hooks:
            self._global_hooks = [
                nn.modules.module.register_module_forward_pre_hook(self._pre),
                nn.modules.module.register_module_forward_hook(self._post, with_kwargs=True, always_call=True),
            ]

    def _watch_roots_only(self) -> None:
        for handle in self._global_hooks:
            handle.remove()
        self._global_hooks = []

    def __enter__(self) -> ComputeMeter:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def take(self) -> Spent:
        """The counts since the last :meth:`take` (this process), and reset them."""
        spent, self.spent = self.spent, Spent()
        return spent

    def add_tokens(self, tokens: int) -> None:
        """Count ``tokens`` consumed by the run (a training batch's)."""
        self.spent.tokens += tokens

    # ------------------------------------------------------------------ forward
    def _kind(self, module: nn.Module) -> str:
        """``"trained"`` (the model or inside it), ``"wrapper"`` (contains the model) or ``"other"``."""
        kind = self._kinds.get(module)
        if kind is None:
            if module is self.model or any(m is module for m in self.model.modules()):
                kind = "trained"
            elif any(m is self.model for m in module.modules()):
                kind = "wrapper"
            else:
                kind = "other"
            self._kinds[module] = kind
        return kind

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Global pre-hook: a call inside a measured call opens a frame; an outermost call of a module
        never seen outermost begins here (measured: its signature needs the keywords it cannot see)."""
        call = self._call
        if call is not None:
            if call.counter is not None and self.backward_count == "rule" and module is not call.root:
                call.frames.append([call.counter.get_total_flops(), 0])
            return
        if self.paused or self._backward is not None or module in self._roots:
            return  # a known root begins in its own pre-hook, which sees the keywords
        kind = self._kind(module)
        if kind == "wrapper":
            return
        self._roots.add(module)
        self._root_hooks += [
            module.register_forward_pre_hook(self._root_pre, with_kwargs=True),
            module.register_forward_hook(self._root_post, with_kwargs=True, always_call=True),
        ]
        self._begin(module, None, kind)

    def _post(self, module: nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
        """Global hook after a call: inside a measured call, close the call's frame."""
        call = self._call
        if call is None or call.counter is None or not call.frames or module is call.root:
            return
        if len(rest) == 2:
            self._end_part(call, module, rest[1])
        else:  # the always-called hook of a forward that raised gets no kwargs: keep the frames aligned
            call.frames.pop()

    def _root_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = self._call
        if call is not None:
            if module is call.root:
                call.reentries += 1
            return
        if self.paused or self._backward is not None:
            return
        self._begin(module, _call_key(module, args, kwargs), self._kind(module))

    def _begin(self, module: nn.Module, key: tuple[Any, ...] | None, kind: str) -> None:
        grad = torch.is_grad_enabled() and kind == "trained"
        if kind == "other":
            source = "reference_model"
        elif grad:
            source = "model"
        else:
            source = _SPENDING[-1] if _SPENDING else "no_grad_forward"
        counter = None
        if key is None or self.measure == "every_call" or key not in self._forward_cache:
            counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
            counter.__enter__()
        else:
            self._watch_roots_only()
        frames = [[0, 0]] if counter is not None and self.backward_count == "rule" else []
        self._call = _Call(module, key, counter, source, grad, frames=frames)

    def _end_part(self, call: _Call, module: nn.Module, output: Any) -> None:
        """Close the innermost open module call of a measured forward: record its own FLOPs."""
        assert call.counter is not None
        start, children = call.frames.pop()
        total = call.counter.get_total_flops() - start
        if call.frames:
            call.frames[-1][1] += total
        params = tuple(module.parameters(recurse=False))
        if total > children or params:
            constant = not params and call.upstream and not _needs_grad(output)
            call.parts.append((total - children, params, constant))
        call.upstream = call.upstream or any(p.requires_grad for p in params)

    def _root_post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        call = self._call
        if call is None or module is not call.root:
            return
        if call.reentries:
            call.reentries -= 1
            return
        self._call = None
        self._watch_all()
        failed = sys.exc_info()[0] is not None  # the always-called hook of a forward that raised
        if call.counter is not None:
            if call.frames and not failed:
                self._end_part(call, module, output)
            call.counter.__exit__(None, None, None)
        if failed:
            return
        key = call.key if call.key is not None else _call_key(module, args, kwargs)
        if call.counter is not None:
            flops, tokens, parts = call.counter.get_total_flops(), count_tokens((args, kwargs)), call.parts
            self._forward_cache[key] = (flops, tokens, parts)
        else:
            flops, tokens, parts = self._forward_cache[key]
        self.spent.by_source[call.source] += flops
        self.spent.forward_flops += flops
        if call.grad:
            self.spent.model_forward_flops += flops
            self.spent.backward_tokens += tokens or 0
            inputs_need_grad = _needs_grad(args) or _needs_grad(kwargs)
            self._grad_calls.append((key, inputs_need_grad, parts))

    # ------------------------------------------------------------------ backward
    def begin_backward(self) -> None:
        """A backward starts: the forwards with gradients since the last one are what it differentiates."""
        grad_calls, self._grad_calls = self._grad_calls, []
        trainable = tuple(p.requires_grad for p in self.model.parameters())  # frozen layers change the backward
        key = (tuple((call, inputs) for call, inputs, _ in grad_calls), trainable)
        counter = None
        if self.measure == "every_call" or key not in self._backward_cache:
            if self.backward_count == "measured":
                counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
                counter.__enter__()
            else:
                self._backward_cache[key] = sum(backward_by_rule(parts, inputs) for _, inputs, parts in grad_calls)
        self._backward = (key, counter)

    def end_backward(self) -> None:
        """The backward begun by :meth:`begin_backward` ended: add its FLOPs."""
        if self._backward is None:
            return
        (key, counter), self._backward = self._backward, None
        if counter is not None:
            counter.__exit__(None, None, None)
            self._backward_cache[key] = counter.get_total_flops()
        flops = self._backward_cache[key]
        self.spent.backward_flops += flops
        self.spent.by_source["model"] += flops

    def abort_backward(self) -> None:
        """A backward raised: stop its counting without adding anything."""
        if self._backward is not None:
            counter = self._backward[1]
            self._backward = None
            if counter is not None:
                counter.__exit__(None, None, None)

    def discard_pending(self) -> None:
        """Forget forwards with gradients that no backward followed (a skipped step)."""
        self._grad_calls = []

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        """Count the backward run inside the block."""
        self.begin_backward()
        try:
            yield
        except BaseException:
            self.abort_backward()
            raise
        self.end_backward()
