"""Every ``>>>`` example in weightwise's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import weightwise

MODULES = sorted(m.name for m in pkgutil.walk_packages(weightwise.__path__, "weightwise."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), raise_on_error=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_public_callback_and_sampler_has_an_example():
    from weightwise import callbacks, samplers

    public = [getattr(face, name) for face in (callbacks, samplers) for name in face.__all__]
    # Exported for type annotations and state inspection, never constructed by users (a fit installs it).
    internal = {"PerSampleLossReducer"}
    missing = [
        obj.__name__ for obj in public if isinstance(obj, type) and obj.__name__ not in internal and ">>>" not in (obj.__doc__ or "")
    ]
    assert missing == []
