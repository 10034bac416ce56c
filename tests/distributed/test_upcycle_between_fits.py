"""Upcycling between two sharded fits, end to end on 2 processes (gloo), each rank on its own rows:
the way out that ExpertUpcycling's and DenseUpcycling's refusal names under FSDP2
(``ModelParallelStrategy``) and ZeRO-3. A fit trains the saved model and writes its checkpoint (a DCP
directory, a DeepSpeed directory); ``weightwise upcycle MODEL_DIR GROWN --checkpoint CKPT`` writes the
grown (E -> 2E) or upcycled (dense -> MoE) model; a second fit of the same strategy trains it.
The jobs (tests/scripts/upcycle_jobs.py) run in the shared sharded launch (tests/support/distributed.py)."""

import pytest
import torch

from tests.scripts.upcycle_jobs import PROBE, STEPS
from tests.support.distributed import BETWEEN_FITS

pytestmark = pytest.mark.slow

EXPERTS = {"fsdp2/moe": 8, "fsdp2/dense": 4, "zero3/moe": 8, "zero3/dense": 4}


@pytest.mark.parametrize("name", [name for name, *_ in BETWEEN_FITS])
def test_the_command_writes_the_trained_function_as_a_moe_the_next_fit_trains(sharded_runs, name):
    from transformers import AutoModelForCausalLM

    first, second = sharded_runs(f"between/{name}/phase1"), sharded_runs(f"between/{name}/phase2")
    trained = first[0]["probe"]["end"]  # the trained model's loss on PROBE, measured inside the sharded fit
    assert trained != first[0]["probe"]["start"]  # the first fit did train

    grown = AutoModelForCausalLM.from_pretrained(sharded_runs.root / "between" / name / "grown").eval()
    assert type(grown).__name__ == "MixtralForCausalLM" and grown.config.num_local_experts == EXPERTS[name]
    with torch.no_grad():
        written = float(grown(input_ids=PROBE, labels=PROBE).loss)
    # duplicates of a top-1 Mixtral, granular splits and dense copies keep the function: the same fp32
    # weights, summed in another order (split experts, a single process instead of shards) - rounding only
    assert written == pytest.approx(trained, rel=1e-5, abs=0)

    for rank in second:  # the second fit: both ranks start from that function, step together, end on one model
        assert rank["steps"] == STEPS and rank["probe"]["start"] == pytest.approx(trained, rel=1e-5, abs=0)
    assert second[0]["probe"]["end"] == second[1]["probe"]["end"] != second[0]["probe"]["start"]
    for phase in (first, second):
        assert phase[0]["losses"] != phase[1]["losses"]  # each rank trained on its own rows
        assert all(torch.isfinite(torch.tensor(rank["losses"])).all() for rank in phase)


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "fsdp"])
def test_the_checkpoint_reader_reads_zero1_2_and_fsdp_sharded_checkpoints(sharded_runs, strategy):
    """The other formats the command reads, from checkpoints the shared launch writes anyway (a
    Classifier's ``self.net``): DeepSpeed ZeRO-1/2 directories, FSDPStrategy's sharded DCP directory."""
    from tests.support.models import Classifier
    from weightwise.integrations.checkpoints import CheckpointError, load_from_checkpoint

    first = sharded_runs.root / "sharded" / strategy / "first"
    net = Classifier().net
    load_from_checkpoint(net, first / "last.ckpt", prefix="net.")
    assert torch.equal(torch.cat([p.detach().flatten() for p in net.parameters()]), sharded_runs(f"sharded/{strategy}/first")[0]["params"])
    with pytest.raises(CheckpointError, match="pass --prefix 'net.'"):
        load_from_checkpoint(net, first / "last.ckpt")
