"""The name weightwise 0.1 gave :mod:`weightwise.experts`; kept so that code written for it runs."""

from weightwise.experts import *  # noqa: F403
from weightwise.experts import __all__  # noqa: F401
