"""A transformers model's weights out of the checkpoint a Lightning fit left behind.

``weightwise upcycle --checkpoint`` reads what the user's strategy saved (docs/architecture.md,
"Integrations"); the layouts are Lightning's (tested with Lightning 2.6, torch 2.13, DeepSpeed 0.19):

* **a file** (``.ckpt``: single device, DDP, ``FSDPStrategy(state_dict_type="full")``,
  ``ModelParallelStrategy(save_distributed_checkpoint=False)``): a ``torch.save`` dict, the
  LightningModule's ``state_dict`` under ``"state_dict"``;
* **a directory with ``.metadata``** (``ModelParallelStrategy``/FSDP2, and ``FSDPStrategy``'s sharded
  checkpoints): a ``torch.distributed.checkpoint`` (DCP) directory whose module weights sit under
  ``state_dict.`` (ModelParallelStrategy) or ``model.`` (FSDPStrategy). They are read with DCP's public
  ``load(..., no_dist=True)`` straight into the model's own tensors: only the model's weights are
  read, never the optimizer state, and no process group is needed;
* **a directory with a ``latest`` file** (``DeepSpeedStrategy``, ZeRO-1/2/3): consolidated with
  DeepSpeed's public ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (the
  fp32 master weights), the ``_forward_module.`` prefix of Lightning's module wrapper removed as
  Lightning's own ``convert_zero_checkpoint_to_fp32_state_dict`` does.

The optimizer state in the checkpoint is not read: it belongs to the old shapes, and the next fit
builds its optimizer afresh.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

Format = Literal["file", "distributed", "deepspeed"]

DCP_ROOTS = ("state_dict.", "model.")
"""Where Lightning puts the module's weights in a DCP directory: ModelParallelStrategy, FSDPStrategy."""

LIGHTNING_WRAPPER = "_forward_module."
"""The prefix of Lightning's ``_LightningModuleWrapperBase`` in DeepSpeed's module names."""


class CheckpointError(ValueError):
    """A checkpoint that cannot fill the model; the message says what was found and the fix."""


def checkpoint_format(path: str | Path) -> Format:
    """Which kind of Lightning checkpoint ``path`` is (see the module doc).

    Raises:
        CheckpointError: ``path`` does not exist or is none of the three.
    """
    path = Path(path)
    if path.is_file():
        return "file"
    if (path / ".metadata").is_file():
        return "distributed"
    if (path / "latest").is_file():
        return "deepspeed"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    raise CheckpointError(
        f"{path} is not a Lightning checkpoint: expected a file (.ckpt), a distributed checkpoint directory"
        " (with .metadata: ModelParallelStrategy, FSDP) or a DeepSpeed checkpoint directory (with 'latest')"
    )


def load_from_checkpoint(model: nn.Module, path: str | Path, prefix: str = "model.") -> Format:
    """Fill ``model`` (built from the trained model's config) with its weights in a Lightning checkpoint.

    Args:
        model: the transformers model, any weights; every persistent tensor of it is overwritten.
        path: the checkpoint file or directory (see the module doc).
        prefix: where the model sits in the LightningModule: ``"model."`` for ``self.model``, ``""``
            when the LightningModule is the model.

    Returns:
        The checkpoint's format.

    Raises:
        CheckpointError: an unknown format, a prefix under which the model's weights are not (the
            message names the prefixes where they are), or weights that do not fit the model
            (another configuration).
    """
    if prefix and not prefix.endswith("."):
        prefix += "."
    kind = checkpoint_format(path)
    target = model.state_dict()
    if kind == "distributed":
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        shapes = {name: meta.size for name, meta in stored.items() if isinstance(meta, TensorStorageMetadata)}
        root = next((r for r in DCP_ROOTS if any(n.startswith(r) for n in shapes)), None)
        if root is None:
            raise CheckpointError(f"{path} holds no module weights under {' or '.join(DCP_ROOTS)}; is it a Lightning checkpoint?")
        _match({n.removeprefix(root): size for n, size in shapes.items() if n.startswith(root)}, target, prefix, path)
        # DCP copies into the tensors it is given: the model's own, so only its weights are read
        dcp_load({f"{root}{prefix}{k}": v for k, v in target.items()}, checkpoint_id=str(path), no_dist=True)
        return kind
    if kind == "file":
        # a Lightning checkpoint is a pickle (hyperparameters, callback states): read only checkpoints you trust
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        if not isinstance(saved, Mapping) or "state_dict" not in saved:
            raise CheckpointError(f"{path} has no 'state_dict': not a Lightning checkpoint")
        state = saved["state_dict"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = {k.removeprefix(LIGHTNING_WRAPPER): v for k, v in get_fp32_state_dict_from_zero_checkpoint(str(path)).items()}
    _match({k: v.shape for k, v in state.items()}, target, prefix, path)
    model.load_state_dict({k: state[prefix + k] for k in target}, strict=True)
    return kind


def _match(available: Mapping[str, torch.Size], target: Mapping[str, Tensor], prefix: str, path: str | Path) -> None:
    """Raise unless the checkpoint holds exactly the model's tensors, in their shapes, under ``prefix``."""
    present = set(available)
    missing = [k for k in target if prefix + k not in present]
    if missing:
        roots = _prefixes_holding(present, target)
        if roots:
            fix = "pass " + " or ".join(f"--prefix {r!r}" for r in roots)
        else:
            tops = Counter(name.split(".", 1)[0] + "." if "." in name else name for name in available)
            fix = (
                "no prefix holds all of them - is the model folder the configuration of the trained model? The checkpoint's"
                f" names start with: {', '.join(f'{t!r} ({n})' for t, n in tops.most_common(8))}"
            )
        raise CheckpointError(
            f"{path} has no weights of the model under prefix {prefix!r} ({len(missing)} of {len(target)} missing, e.g."
            f" {prefix + missing[0]!r}): {fix}"
        )
    extra = sorted(n for n in present if n.startswith(prefix) and n.removeprefix(prefix) not in target)
    if extra and prefix:  # with no prefix, the LightningModule may hold more than the model (a reference model, a head)
        raise CheckpointError(
            f"{path} holds {len(extra)} tensors under {prefix!r} the model lacks (e.g. {extra[0]!r}): the model folder's"
            " configuration is not the trained model's"
        )
    wrong = [k for k in target if tuple(available[prefix + k]) != tuple(target[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{len(wrong)} weights in {path} do not fit the model built from the folder's configuration, e.g. {prefix + k!r}:"
            f" {tuple(available[prefix + k])} saved, {tuple(target[k].shape)} in the model"
        )


def _prefixes_holding(present: set[str], target: Mapping[str, Tensor]) -> list[str]:
    """Every prefix under which all of the model's tensors are found."""
    anchor = max(target, key=len)  # the longest name: the fewest false candidates
    candidates = [name.removesuffix(anchor) for name in present if name.endswith(anchor)]
    return sorted(p for p in candidates if (p == "" or p.endswith(".")) and all(p + k in present for k in target))
