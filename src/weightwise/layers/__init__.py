"""Layers: which transformer layers train now, and freezing that frees memory for real.

Functional core: :mod:`~weightwise.layers.stack` (finding a model's layer stack),
:mod:`~weightwise.layers.policies` (which layers train each period: LISA, IST, BAdam's cycles),
:mod:`~weightwise.layers.probes` (IST's suppression probes), :mod:`~weightwise.layers.freezing`
(freezing that also releases optimizer state), :mod:`~weightwise.layers.influence` (ShortGPT's block
influence, for reporting and for the ``"block_influence"`` policy). Lightning side: :mod:`~weightwise.layers.callback`
(``LayerwiseSampling``); DeepSpeed's ZeRO rebuild is in :mod:`weightwise.integrations.deepspeed`.
"""

from weightwise.layers.freezing import HostMasters, OptimizerStateStash, activate_layers, optimizer_state_bytes
from weightwise.layers.influence import block_influence, influence_totals, redundant_layers
from weightwise.layers.policies import (
    BlockInfluenceLayers,
    ISTLayers,
    LayerPolicy,
    LossCreditLayers,
    OrderedBlocks,
    UniformLayers,
)
from weightwise.layers.probes import suppressed
from weightwise.layers.stack import find_layer_stack

__all__ = [
    "HostMasters",
    "BlockInfluenceLayers",
    "ISTLayers",
    "LayerPolicy",
    "LossCreditLayers",
    "OptimizerStateStash",
    "OrderedBlocks",
    "UniformLayers",
    "activate_layers",
    "block_influence",
    "find_layer_stack",
    "influence_totals",
    "optimizer_state_bytes",
    "redundant_layers",
    "suppressed",
]
