"""The fence: each library's private pieces are probed at start-up, with errors naming the versions.

One test pins each library: if an upgrade removes a piece weightwise relies on, these fail first,
with the same message a user would get when a callback is set up.
"""

import ast
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from tests.support.training import trainer
from weightwise.integrations import deepspeed as ds
from weightwise.integrations import lightning as lt
from weightwise.integrations import versions
from weightwise.integrations.torch import mark_stepped
from weightwise.integrations.versions import UnsupportedVersionError

SRC = Path(__file__).resolve().parents[2] / "src" / "weightwise"


def test_lightning_installed_has_every_private_piece():
    lt.check_trainer(trainer())  # raises or warns otherwise
    assert versions.installed_version("lightning") >= Version(lt.MINIMUM)


def test_a_lightning_without_the_piece_fails_at_start_up_naming_the_versions():
    stripped = SimpleNamespace(fit_loop=SimpleNamespace())  # neither _logger_connector nor max_batches
    with pytest.raises(UnsupportedVersionError, match=r"lightning>=2\.4 \(tested: >=2\.4,<2\.7\), found lightning 2\..*lacks"):
        lt.check_trainer(stripped)


def test_an_old_or_untested_version_is_named(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda name: Version("0.14.0"))
    with pytest.raises(UnsupportedVersionError, match=r"deepspeed>=0\.14\.5.*found deepspeed 0\.14\.0"):
        ds.check_version()
    monkeypatch.setattr(versions, "installed_version", lambda name: Version("0.25.0"))
    with pytest.warns(UserWarning, match="was tested with deepspeed>=0.14.5,<0.20, found 0.25.0"):
        ds.check_version()


def test_deepspeed_installed_has_every_private_piece():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the tested range: no warning either
        ds.check_version()


def test_deepspeed_settings_the_rebuild_cannot_carry_are_each_named():
    config = {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "mics_shard_size": 8, "zenflow": {}},
        "fp16": {"enabled": True},
        "optimizer": {"type": "Adam"},
        "compile": {"deepcompile": True},
    }
    problems = "; ".join(ds.unsupported_settings(config))
    for name in ("ZeRO-Offload", "fp16", "MiCS", "ZenFlow", "DeepCompile", "optimizer in the DeepSpeed config"):
        assert name in problems
    assert ds.unsupported_settings({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}) == []


def test_deepspeed_fp16_is_refused_from_the_trainer_precision_before_lightning_writes_the_config():
    # Trainer(strategy=DeepSpeedStrategy(...), precision="16-mixed"): the callbacks' setup sees a config without "fp16".
    config = {"zero_optimization": {"stage": 2}}
    for precision in ("16-mixed", "16-true"):
        assert any("fp16" in problem for problem in ds.unsupported_settings(config, precision))
    assert ds.unsupported_settings(config, "bf16-mixed") == []


def test_a_compiled_deepspeed_engine_is_refused_by_name():
    class CompiledEngine:
        is_compiled = True
        optimizer = None

    with pytest.raises(ValueError, match=r"engine.compile\(\)"):
        ds.check_engine(CompiledEngine())


def test_torch_lr_schedulers_read_the_flag_mark_stepped_sets():
    parameter = torch.nn.Parameter(torch.zeros(1))
    for marked in (False, True):
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, 1)
        if marked:
            mark_stepped(optimizer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schedule.step()
        assert any("before `optimizer.step()`" in str(w.message) for w in caught) != marked


def test_no_private_api_outside_integrations():
    """Other libraries' private attributes (``._name`` on their objects) appear only in integrations/."""
    private = {"_logger_connector", "_configure_optimizer", "_opt_called", "max_batches", "_sampler", "_data_fetcher", "_combined_loader"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if "integrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
                names = [arg.value for arg in node.args[1:2] if isinstance(arg, ast.Constant)]
                offenders += [f"{path.relative_to(SRC)}:{node.lineno} {node.func.id}(..., {n!r})" for n in names if n in private]
    assert offenders == []


def test_heavy_optional_libraries_are_imported_lazily():
    lazy = {"transformers", "deepspeed", "peft", "wandb"}
    top_level = []
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: function bodies import lazily
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            top_level += [f"{path.relative_to(SRC)}: {name}" for name in names if name.split(".")[0] in lazy]
    assert top_level == []
    # and at run time: importing every public face pulls in none of deepspeed, peft, wandb
    # (transformers is imported by torchmetrics, which Lightning itself imports, where it is installed)
    code = (
        "import sys, weightwise, weightwise.callbacks, weightwise.samplers, weightwise.losses, weightwise.experts;"
        "print(sorted(m for m in ('deepspeed', 'peft', 'wandb') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
