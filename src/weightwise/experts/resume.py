"""What every callback that changes the model's structure mid-fit needs to resume from its checkpoints."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from weightwise.integrations.lightning import MethodPatch, check_trainer


class RestructuringCallback(Callback):
    """Base of ``ExpertUpcycling`` and ``DenseUpcycling``: a checkpoint written after the surgery holds
    the new structure, so resuming must give the module that structure before its weights load.

    Lightning loads the module's weights before any callback state, right after the module's own
    ``on_load_checkpoint`` hook; for the fit, that hook is wrapped to call :meth:`restructure` first
    when the checkpoint's state of this callback says ``done`` (the values are then loaded)."""

    done: bool
    _patch: MethodPatch | None = None

    def restructure(self, pl_module: pl.LightningModule) -> None:
        """Give ``pl_module`` the structure it has after the surgery (values do not matter)."""
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_trainer(trainer)

        def make_on_load_checkpoint(original: Any) -> Any:
            def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
                state = checkpoint.get("callbacks", {}).get(self.state_key) or {}
                if state.get("done") and not self.done:
                    self.restructure(pl_module)
                original(checkpoint)

            return on_load_checkpoint

        self._patch = MethodPatch(pl_module, "on_load_checkpoint", make_on_load_checkpoint)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unpatch()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unpatch()  # Lightning calls no teardown when fit raises

    def _unpatch(self) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
