"""The fence around other libraries' internals: one module per library.

Everything weightwise does with a private attribute, a private method or a replaced method of
another library lives here, next to the versions it was tested with, and nowhere else
(docs/architecture.md, "Integrations"). Each module checks at start-up - when a callback is set
up, not deep in a fit - that the pieces it relies on exist, and raises an error that names the
installed and the tested versions otherwise.

* :mod:`~weightwise.integrations.lightning` - the logging cadence, the epoch length of the fit
  loop, per-fit method wrappers on live objects, re-wrapping DDP.
* :mod:`~weightwise.integrations.deepspeed` - rebuilding a ZeRO optimizer for a new set of
  trainable parameters (imports DeepSpeed lazily).
* :mod:`~weightwise.integrations.torch` - the one private flag of ``torch.optim`` we set.
* :mod:`~weightwise.integrations.checkpoints` - a model's weights out of Lightning's checkpoint
  layouts (``weightwise upcycle --checkpoint``); public APIs only, kept here beside the layouts.
* :mod:`~weightwise.integrations.versions` - ``require()``: the version check those modules run,
  raising ``UnsupportedVersionError`` with the installed and the tested versions.

transformers, DeepSpeed, peft and W&B are imported lazily throughout weightwise: importing
``weightwise.callbacks`` costs Lightning and torch, nothing more.
"""
