"""Every example config runs through LightningCLI (CPU, a few steps), so none of them rots."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

from cli import main  # noqa: E402

SMALL_LM = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
            "--data.init_args.n_bytes", "60000"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, extra",
    [
        ("bbc_reweight_prune.yaml", ["--data.init_args.limit_train", "64", "--data.init_args.limit_test", "32", "--trainer.max_epochs", "2"]),
        ("lm_lisa.yaml", SMALL_LM),
        ("moe_upcycling.yaml", [*SMALL_LM, "--trainer.callbacks.init_args.at_step", "3", "--trainer.callbacks.init_args.utility_window", "2"]),
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


def test_gpu_config_is_valid_yaml_for_the_trainer():
    import yaml

    trainer = yaml.safe_load((EXAMPLES / "configs" / "gpu.yaml").read_text())["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
