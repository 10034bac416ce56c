"""Version checks for the libraries whose internals weightwise touches."""

from __future__ import annotations

import importlib.metadata
import warnings

from packaging.version import Version


class UnsupportedVersionError(RuntimeError):
    """An installed library lacks a piece weightwise relies on; the message names the versions."""


def installed_version(distribution: str) -> Version | None:
    """The installed version of a distribution (``None`` when it is not installed)."""
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


def require(distribution: str, minimum: str, tested: str, missing: list[str], *, purpose: str) -> None:
    """Check an installed library against what weightwise needs of it.

    Args:
        distribution: the PyPI name (``"lightning"``, ``"deepspeed"``).
        minimum: the oldest version known to work; older ones raise.
        tested: the range tested, for messages and a warning outside it (e.g. ``">=2.4,<2.7"``).
        missing: names of private pieces that were looked for and not found; any raises.
        purpose: what needs them, for the message.

    Raises:
        UnsupportedVersionError: the library is older than ``minimum`` or lacks a piece.
    """
    from packaging.specifiers import SpecifierSet

    version = installed_version(distribution)
    where = f"{distribution} {version}" if version is not None else f"{distribution} (not installed)"
    if version is None or version < Version(minimum) or missing:
        lacks = f"; it lacks {', '.join(missing)}" if missing else ""
        raise UnsupportedVersionError(
            f"{purpose} needs {distribution}>={minimum} (tested: {tested}), found {where}{lacks}."
            f" Install a tested version, e.g. pip install '{distribution}{tested}'."
        )
    if version not in SpecifierSet(tested):
        warnings.warn(
            f"{purpose} was tested with {distribution}{tested}, found {version}; it found every piece it needs,"
            " but report a problem at the weightwise issue tracker if training misbehaves.",
            stacklevel=3,
        )
