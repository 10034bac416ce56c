"""ZeRO-1/2/3 per-rank memory, estimated analytically from a simulation's bytes by kind.

Nothing here is simulated: each phase's peak (by kind, one accelerator) is re-summed with the kinds a
ZeRO stage partitions divided by the number of data-parallel ranks, and the worst phase is kept.

* ZeRO-1 partitions optimizer state (and the optimizer's temporaries, which then cover one partition);
* ZeRO-2 also gradients;
* ZeRO-3 also parameters, plus a gathered working set of two units (the one computing and the one
  prefetched), a unit being the largest decoder layer or non-layer parameter (embedding, head),
  added in every phase (conservative: the optimizer step gathers nothing).

Activations and backward temporaries stay whole (each rank runs its own batch). Not modelled:
communication buckets (DeepSpeed's ``reduce_bucket_size``/``allgather_bucket_size``, 5e8 elements
by default), DeepSpeed's own bf16 master-weight layout, and the shift of the peak's moment within a
phase once some kinds shrink (the estimate is taken at each phase's unsharded peak).
"""

from __future__ import annotations

from benchmarks.memory.simulate import Simulation

SHARDED: dict[int, frozenset[str]] = {
    1: frozenset({"optimizer_state", "optimizer_temporaries"}),
    2: frozenset({"optimizer_state", "optimizer_temporaries", "gradients"}),
    3: frozenset({"optimizer_state", "optimizer_temporaries", "gradients", "parameters"}),
}


def per_rank(simulation: Simulation, ranks: int = 8) -> dict[str, int]:
    """Estimated peak bytes per rank for ZeRO stages 1-3 on ``ranks`` ranks: ``{"zero1": ..., ...}``."""
    out = {}
    for stage, sharded in SHARDED.items():
        gathered = 2 * simulation.largest_unit_bytes if stage == 3 else 0
        out[f"zero{stage}"] = round(
            max(
                sum(b / ranks if kind in sharded else b for kind, b in peak.items()) + gathered
                for peak in simulation.phase_peaks.values()
            )
        )
    return out
