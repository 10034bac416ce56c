"""Finding a model's stack of transformer layers (the units layerwise sampling turns on and off)."""

from __future__ import annotations

from torch import nn


def find_layer_stack(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's repeated layer stack: ``(dotted name, ModuleList)``.

    With ``path`` (e.g. ``"model.layers"``), that module. Otherwise the longest *outermost*
    ``nn.ModuleList`` whose children all have one class - the decoder/encoder stack of every
    transformers model (``model.layers`` for Llama, Qwen2/3, Mistral, Mixtral, OLMoE;
    ``transformer.h`` for GPT-2; ``encoder.layer`` for BERT/MiniLM) and of most hand-written ones.
    Lists inside another ``ModuleList`` are never the stack: a Mixture-of-Experts block of
    transformers 4.x keeps its experts in a ``ModuleList`` that can be longer than the stack itself,
    and with a decoder list of mixed layer classes (hybrid models) or of one layer it would be the
    only uniform list; such models need ``layers=``.

    Raises:
        ValueError: no such stack (or ``path`` is not a ModuleList); the message names the fix.
    """
    if path is not None:
        module = model.get_submodule(path)
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            raise ValueError(f"{path!r} is a {type(module).__name__}, not a ModuleList of at least 2 layers")
        return path, module
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    # A list inside another list (of any length or classes) is inside a layer: with a mixed-class or
    # one-layer decoder list, an MoE block's expert list would otherwise be the only uniform candidate.
    outermost = [
        (name, module)
        for name, module in lists
        if len(module) >= 2
        and len({type(m) for m in module}) == 1
        and not any(other is not module and name.startswith(f"{other_name}.") for other_name, other in lists if other_name)
    ]
    if not outermost:
        raise ValueError(
            f"found no stack of repeated layers in {type(model).__name__}; pass layers='dotted.path.to.ModuleList'"
        )
    return max(outermost, key=lambda item: len(item[1]))
