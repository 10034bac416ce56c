"""Every example config runs through LightningCLI (CPU, a few steps), so none of them rots."""

import sys
from pathlib import Path

import pytest
import torch

from examples.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


SMALL_LM = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
            "--data.init_args.n_bytes", "60000"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, extra",
    [
        ("bbc_reweight_prune.yaml", ["--data.init_args.limit_train", "64", "--data.init_args.limit_test", "32", "--trainer.max_epochs", "2"]),
        ("lm_lisa.yaml", SMALL_LM),
        ("moe_upcycling.yaml", [*SMALL_LM, "--trainer.callbacks.init_args.at_step", "3", "--trainer.callbacks.init_args.utility_window", "2"]),
        ("lm_reweighting.yaml", ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
                                 "--trainer.log_every_n_steps", "1", "--trainer.callbacks.init_args.warmup_steps", "2",
                                 "--data.init_args.val_articles", "20"]),
    ],
)
def test_example_config_trains(config, extra, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and the saved config land here
    cli = main(["fit", "--config", str(EXAMPLES / "configs" / config), "--trainer.logger", "false",
                "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false", *extra])
    assert cli.trainer.global_step > 0
    callbacks = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    if config == "bbc_reweight_prune.yaml":
        assert callbacks["DataPruning"].ledger["samples_visited"] < callbacks["DataPruning"].ledger["samples_full"]
    if config == "lm_lisa.yaml":
        assert len(callbacks["LayerwiseSampling"].history) >= 1
    if config == "moe_upcycling.yaml":
        assert callbacks["ExpertUpcycling"].done and cli.model.model.config.num_experts == 8
    if config == "lm_reweighting.yaml":  # past the warm-up, the streamed documents were weighted unequally
        metrics = cli.trainer.callback_metrics
        assert metrics["weightwise/weight_min"] < 1 < metrics["weightwise/weight_max"]
        assert 1 < metrics["val_ppl"] < 256  # better than a uniform guess over the 256 bytes
        # val_loss is the trained model's mean NLL over every target byte of the validated rows, val_ppl its exp
        model, rows = cli.model.eval(), list(cli.datamodule.val_dataloader())[:2]  # limit_val_batches=2
        with torch.no_grad():
            nll = [torch.nn.functional.cross_entropy(model.logits(b)[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                     ignore_index=-100, reduction="sum") for b in rows]
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in rows)
        torch.testing.assert_close(metrics["val_loss"], sum(nll) / tokens, rtol=1e-5, atol=0)
        torch.testing.assert_close(metrics["val_ppl"], (sum(nll) / tokens).exp(), rtol=1e-5, atol=0)


def test_gpu_config_is_valid_yaml_for_the_trainer():
    import yaml

    trainer = yaml.safe_load((EXAMPLES / "configs" / "gpu.yaml").read_text())["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"


def run_on_two_deepspeed_processes(tmp_path: Path, config: str, *extra: str) -> Path:
    """Run an example config with its CPU twin of the GPU switch (Lightning's DeepSpeedStrategy
    bridged to CPU, see tests/support/strategies.py, ZeRO-2 on 2 processes); return the checkpoint directory."""
    import os
    import subprocess

    deepspeed_yaml = tmp_path / "deepspeed_cpu.yaml"
    deepspeed_yaml.write_text(
        "trainer:\n  devices: 2\n  strategy:\n    class_path: tests.support.strategies.CPUDeepSpeedStrategy\n    init_args: {stage: 2}\n"
    )
    python_path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]  # examples, tests
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "examples.cli", "fit", "--config", str(EXAMPLES / "configs" / config),
         "--config", str(deepspeed_yaml), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path), *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    assert checkpoint.is_dir() and (checkpoint / "checkpoint").is_dir()  # DeepSpeed's sharded checkpoint
    shards = sorted(p.name for p in (checkpoint / "checkpoint").glob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer partition per rank
    optim = torch.load(checkpoint / "checkpoint" / shards[0], weights_only=False)["optimizer_state_dict"]
    assert optim["zero_stage"] == 2
    return checkpoint


@pytest.mark.slow
def test_bbc_config_switches_to_deepspeed_zero2_on_two_processes(tmp_path):
    checkpoint = run_on_two_deepspeed_processes(
        tmp_path, "bbc_reweight_prune.yaml", "--trainer.max_epochs", "2",
        "--data.init_args.limit_train", "64", "--data.init_args.limit_test", "32", "--data.init_args.batch_size", "8",
    )
    states = torch.load(checkpoint / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    ledger = states["callbacks"]["DataPruning"]["ledger"]
    assert 0 < ledger["samples_visited"] < ledger["samples_full"]  # RS2 pruning ran under DeepSpeed


@pytest.mark.slow
def test_layerwise_config_switches_to_deepspeed_zero2_on_two_processes(tmp_path):
    """The LISA config with the loss-credit policy (LISA itself is compared with DDP in tests/distributed/test_deepspeed.py)."""
    checkpoint = run_on_two_deepspeed_processes(
        tmp_path, "lm_lisa.yaml", *SMALL_LM, "--trainer.callbacks.init_args.interval", "2",
        "--trainer.callbacks.init_args.policy", "loss_credit",
    )
    states = torch.load(checkpoint / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    layerwise = states["callbacks"]["LayerwiseSampling"]
    assert len(layerwise["history"]) == 3  # 6 steps, a new draw every 2
    assert layerwise["policy"]["scores"].abs().sum() > 0  # it learned from the loss changes of its periods
    optim = torch.load(next((checkpoint / "checkpoint").glob("*optim_states.pt")), weights_only=False)["optimizer_state_dict"]
    # ZeRO holds the split groups of the last period: 2 of 8 layers, plus embeddings/head/norm.
    layers = {group["weightwise_group"][1] for group in optim["base_optimizer_state"]["param_groups"]}
    assert layers == {None} | set(states["callbacks"]["LayerwiseSampling"]["active"]) and len(layers) == 3
