"""Under FSDP2 (ModelParallelStrategy) and DeepSpeed the upcycling callbacks refuse at fit start with
the command that upcycles between fits - and that command, as printed, runs on the checkpoint the fit
writes. (The refusals are checked on the Trainer, without launching the strategy; the 2-process runs
of the route are tests/distributed/test_upcycle_between_fits.py.)"""

import re
import shlex

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import AutoModelForCausalLM

from tests.scripts.dense_jobs import DenseLM
from tests.support.models import TinyMoELM, moe_loader
from tests.support.strategies import CPUDeepSpeedStrategy
from tests.support.training import trainer
from weightwise.callbacks import DenseUpcycling, ExpertUpcycling
from weightwise.cli import main


def saved_and_reloaded(module, folder):
    """The module's transformers model as users have it: loaded with from_pretrained (its name_or_path)."""
    module.model.save_pretrained(folder)
    module.model = AutoModelForCausalLM.from_pretrained(folder).train()
    return module


def refusal(callback, strategy, module, checkpoints) -> str:
    run = trainer(strategy=strategy, callbacks=[callback, ModelCheckpoint(dirpath=checkpoints, save_last=True)], enable_checkpointing=True)
    with pytest.raises(MisconfigurationException) as refused:
        callback.on_fit_start(run, module)
    return str(refused.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "callback", "strategy", "expected"),
    [
        (
            TinyMoELM,
            ExpertUpcycling(at_step=5, factor=2),
            ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
            ("cannot run under ModelParallelStrategy (FSDP2)", "--factor 2 --method duplicate --selection weight-norm --cap 3", 8),
        ),
        (
            DenseLM,
            DenseUpcycling(at_step=5, num_experts=4, top_k=2, method="drop"),
            CPUDeepSpeedStrategy(stage=3),
            ("cannot run under DeepSpeed", "--from-dense --experts 4 --top-k 2 --method drop --drop-ratio 0.5 --seed 0", 4),
        ),
    ],
    ids=["experts-fsdp2", "dense-zero3"],
)
def test_the_refusal_names_a_command_that_runs_on_the_fits_checkpoint(tmp_path, make, callback, strategy, expected):
    refused_under, options, experts = expected
    module = saved_and_reloaded(make(), tmp_path / "start")
    message = refusal(callback, strategy, module, tmp_path / "ckpts")
    assert refused_under in message and options in message and "fresh optimizer" in message
    command = re.search(r"`(weightwise upcycle [^`]*)`", message).group(1)
    assert f"{tmp_path / 'start'} GROWN_DIR --checkpoint {tmp_path / 'ckpts' / 'last.ckpt'} --prefix 'model.'" in command

    # the same checkpointing on one device writes last.ckpt; the printed command grows it
    trainer(max_steps=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)], enable_checkpointing=True).fit(
        make(), moe_loader()
    )
    main(shlex.split(command.replace("GROWN_DIR", str(tmp_path / "grown")))[1:])
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "grown")
    assert type(grown).__name__ == "MixtralForCausalLM" and grown.config.num_local_experts == experts
