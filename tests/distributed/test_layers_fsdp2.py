"""LayerwiseSampling under Lightning's ModelParallelStrategy (FSDP2) and FSDPStrategy (FSDP1), real
2-process runs on CPU (gloo).

FSDP2: each decoder layer of a tiny Llama and then the root are wrapped by ``fully_shard`` over a 2-rank
data-parallel mesh (``tests.scripts.fsdp2_jobs``), so every parameter is a DTensor of which each rank
holds half. FSDP1: ``use_orig_params=True``, each decoder layer its own unit. Each rank trains on other
samples. The jobs run in the sharded group's launch (``tests/support/distributed.py``).
"""

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from tests.scripts.fsdp2_jobs import LAYERS
from tests.support.models import TinyLlama
from tests.support.strategies import CPUFSDPStrategy
from tests.support.training import trainer
from weightwise.callbacks import LayerwiseSampling

pytestmark = pytest.mark.slow

RUNS = [("fsdp2", p) for p in ("lisa", "ist", "badam", "block_influence")] + [("fsdp1", p) for p in ("lisa", "ist", "block_influence")]


@pytest.mark.parametrize(("fsdp", "policy"), RUNS)
def test_every_policy_chooses_the_same_layers_on_both_ranks(sharded_runs, fsdp, policy):
    rank0, rank1 = sharded_runs(f"layers_{fsdp}/{policy}/straight")
    assert rank0["history"] == rank1["history"] and rank0["active"] == rank1["active"]
    assert len({tuple(layers) for layers in rank0["history"]}) > 1  # the choice changed: the test has teeth
    assert len(rank0["active"]) == 8  # a step each, 4 epochs of 2
    # the scores behind the draws, equal exactly: IST's from probe losses averaged over the ranks' different
    # micro-batches, block influence's from sums over both ranks' tokens
    assert (rank0["importance"] is None) == (policy in ("lisa", "badam"))
    if rank0["importance"] is not None:
        assert torch.equal(rank0["importance"], rank1["importance"])


@pytest.mark.parametrize(("fsdp", "policy"), RUNS)
def test_frozen_layers_hold_no_gradient_and_no_optimizer_state_on_any_rank(sharded_runs, fsdp, policy):
    for rank in sharded_runs(f"layers_{fsdp}/{policy}/straight"):
        assert 0 < rank["local_numel"] < rank["numel"]  # sharded: this rank holds part of the parameters
        for step, (active, grads, states) in enumerate(zip(rank["active"], rank["grads"], rank["states"])):
            assert grads == [i in active for i in range(LAYERS)], step
            if policy == "ist":  # IST keeps the state of layers that trained before (the reference's choice)
                ever = {i for earlier in rank["active"][: step + 1] for i in earlier}
                assert states == [i in ever for i in range(LAYERS)], step
            else:
                assert states == [i in active for i in range(LAYERS)], step
        # embeddings, head and final norm: train under LISA, IST and block influence; frozen for the run under BAdam
        assert set(rank["outside"]) == {(policy != "badam",) * 2}


@pytest.mark.parametrize(("fsdp", "policy"), RUNS)
def test_the_module_is_given_back_trainable_and_unpatched(sharded_runs, fsdp, policy):
    for rank in sharded_runs(f"layers_{fsdp}/{policy}/straight"):
        assert all(rank["requires_grad"]) and not rank["patched"]


def test_the_module_is_given_back_when_fit_raises_mid_period(sharded_runs):
    for rank in sharded_runs("layers_fsdp2/lisa/raised"):  # raised at step 4, two of six layers trainable then
        assert len(rank["active"]) == 4 and set(rank["active"][-1]) != set(range(LAYERS))
        assert all(rank["requires_grad"]) and not rank["patched"]


def test_fsdp2_mixed_precision_trains_layers_frozen_when_fsdp2_initialised(sharded_runs):
    """bf16 weights (MixedPrecisionPolicy): FSDP2 fixes a group's gradient dtypes at its first forward, from
    what requires grad then; LayerwiseSampling recomputes them, so layers frozen at that moment train later
    with their gradients reduced to fp32 (torch 2.13 raised on the bf16 gradient before)."""
    for rank in sharded_runs("layers_fsdp2/lisa/bf16"):
        assert rank["grad_dtypes"] == {"torch.float32"}
        first = set(rank["history"][0])
        assert any(set(layers) - first for layers in rank["history"][1:])  # layers frozen at the first forward trained later
        assert [states == [i in active for i in range(LAYERS)] for active, states in zip(rank["active"], rank["states"])] == [True] * 8


@pytest.mark.parametrize(("fsdp", "policy"), [("fsdp2", "lisa"), ("fsdp2", "ist"), ("fsdp1", "lisa"), ("fsdp1", "ist")])
def test_fsdp_trains_like_ddp_running_the_same_layerwise_sampling(sharded_runs, fsdp, policy):
    # Same process group, same data per rank; FSDP reduce-scatters the averaged gradient where DDP
    # all-reduces it, which may round the 2-rank average differently in the last bit: 8 AdamW steps at
    # lr 1e-2 keep such a difference far below 1e-6 (the runs agree exactly on this machine).
    sharded, ddp = sharded_runs(f"layers_{fsdp}/{policy}/straight"), sharded_runs(f"layers_fsdp2/{policy}/ddp")
    for rank, expected in zip(sharded, ddp):
        assert rank["history"] == expected["history"]
        assert torch.allclose(rank["params"], expected["params"], rtol=0, atol=1e-6)
    assert torch.equal(sharded[0]["params"], sharded[1]["params"])  # both ranks gathered the same model


@pytest.mark.parametrize(("fsdp", "policy"), [("fsdp2", "lisa"), ("fsdp2", "ist"), ("fsdp1", "lisa")])
def test_a_sharded_checkpoint_resumes_mid_period_like_the_uninterrupted_run(sharded_runs, fsdp, policy):
    checkpoint = sharded_runs.root / f"layers_{fsdp}/{policy}/first/last.ckpt"
    assert (checkpoint / ".metadata").is_file()  # torch.distributed.checkpoint's directory
    straight, resumed = sharded_runs(f"layers_{fsdp}/{policy}/straight"), sharded_runs(f"layers_{fsdp}/{policy}/resumed")
    if fsdp == "fsdp2":  # the checkpoint lists the parameters that held optimizer state: the layers trained so far (IST) or now (LISA)
        state = torch.load(checkpoint / "meta.pt", weights_only=False)["callbacks"]
        (saved,) = [value for key, value in state.items() if key.startswith("LayerwiseSampling")]
        listed = {int(name.split(".layers.")[1].split(".")[0]) for name in saved["optimizer_state_params"] if ".layers." in name}
        assert listed == {i for i in range(LAYERS) if sharded_runs(f"layers_{fsdp}/{policy}/first")[0]["states"][-1][i]}
    for rank, expected in zip(resumed, straight):
        assert rank["history"] == expected["history"]
        assert rank["active"] == expected["active"][4:] and rank["grads"] == expected["grads"][4:]
        assert rank["states"] == expected["states"][4:]  # frozen layers hold no state again after the resume (LISA)
        assert torch.allclose(rank["params"], expected["params"], rtol=0, atol=1e-6)


def test_fsdp1_releases_a_frozen_layers_gradient_only_when_the_layer_is_its_own_unit(sharded_runs):
    """What FSDPStrategy(use_orig_params=True) holds on each rank with layer 0 frozen at steps 2-3 of 6
    (``fsdp2_jobs.fsdp1_frozen``): the measurement behind LayerwiseSampling's FSDP1 condition."""
    for rank in sharded_runs("layers_fsdp1/frozen/layer"):
        full, without = rank["numel"] // 2, (rank["numel"] - rank["layer_numel"]) // 2  # this rank's half
        assert rank["flat_grad_numel"] == [full, full, without, without, full, full]
        assert rank["orig_states"] == [True, True, False, False, True, True]
    rank0, rank1 = sharded_runs("layers_fsdp1/frozen/model")
    for rank in (rank0, rank1):  # one flat parameter for the model: its gradient keeps the frozen layer's elements
        assert rank["flat_grad_numel"] == [rank["numel"] // 2] * 6
    assert rank0["orig_states"] == [True, True, False, False, True, True]  # rank 1's half holds no element of layer 0


def test_fsdp1_refuses_flat_parameters_and_layers_sharing_a_unit_naming_the_fixes():
    sampling = LayerwiseSampling("lisa")
    with pytest.raises(MisconfigurationException, match="use_orig_params=False.*use_orig_params=True.*ModelParallelStrategy"):
        sampling.setup(trainer(strategy=CPUFSDPStrategy(use_orig_params=False), max_steps=1), TinyLlama(2), "fit")
    run = trainer(strategy=CPUFSDPStrategy(use_orig_params=True), max_steps=1)
    sampling.setup(run, TinyLlama(2), "fit")
    with pytest.raises(MisconfigurationException, match=r"layers \[0, 1\] share a flat parameter.*auto_wrap_policy=\{LlamaDecoderLayer\}"):
        sampling.on_fit_start(run, TinyLlama(2))
