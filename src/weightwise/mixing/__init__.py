"""Online domain mixing: learn the data mixture while the model trains (docs/architecture.md).

The unit is the domain (web, code, books, a language): every sample carries one, a policy moves
the domains' weights from the per-domain training losses (reduced over every rank), and the loader
draws the next batches by them.

* Policies (:mod:`weightwise.mixing.policies`, functional core): :class:`ODM`, :class:`ADO`,
  :class:`Aioli`, :class:`DoReMi`, :class:`FixedMixture` (natural, uniform, given).
* Data: :class:`MixtureBatchSampler` (map-style data, a domain id per dataset index) and
  :class:`MixingStream` (one iterable dataset per domain), both sharded over ranks (and workers),
  drawing with the same weights on every rank (:mod:`weightwise.mixing.table`).
* :class:`DomainMixing`: the thin Lightning callback that connects a policy to the data, logs the
  weights and the tokens per domain, and checkpoints all of it.
"""

from weightwise.mixing.callback import DomainMixing
from weightwise.mixing.domains import DomainStats, document_domains, excess_loss, held_out_losses
from weightwise.mixing.draws import DOMAIN_KEY
from weightwise.mixing.policies import ADO, ODM, Aioli, DoReMi, FixedMixture, MixingPolicy
from weightwise.mixing.sampler import MixtureBatchSampler
from weightwise.mixing.stream import MixingStream
from weightwise.mixing.table import WeightTable

__all__ = [
    "ADO",
    "DOMAIN_KEY",
    "Aioli",
    "DoReMi",
    "DomainMixing",
    "DomainStats",
    "FixedMixture",
    "MixingPolicy",
    "MixingStream",
    "MixtureBatchSampler",
    "ODM",
    "WeightTable",
    "document_domains",
    "excess_loss",
    "held_out_losses",
]
