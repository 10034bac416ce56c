"""Versioned state dicts (docs/architecture.md, contract 4: state is checkpointed).

Every stateful weightwise object writes ``{"version": N, ...}``. Loading reads the version, refuses
a state from a newer weightwise with an error naming the fix, and lets the owner migrate an older
layout (version 0 is the layout of weightwise 0.1, which wrote no version).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VERSION_KEY = "version"


def with_version(state: dict[str, Any], version: int) -> dict[str, Any]:
    """``state`` with its layout version."""
    return {VERSION_KEY: version, **state}


def state_version(state: Mapping[str, Any], owner: str, current: int) -> int:
    """The layout version of a saved ``state`` of ``owner`` (0 when unversioned).

    Raises:
        ValueError: the state was written by a newer weightwise (version above ``current``).
    """
    version = int(state.get(VERSION_KEY, 0))
    if version > current:
        raise ValueError(
            f"the checkpoint holds {owner} state of layout version {version}, newer than this weightwise reads"
            f" ({current}); upgrade weightwise to resume it"
        )
    return version
