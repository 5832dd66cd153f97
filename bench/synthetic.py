"""Compatibility alias: the synthetic defects now live in :mod:`bench.demo.synthetic`."""

from bench.demo.synthetic import *  # noqa: F403
from bench.demo.synthetic import __all__  # noqa: F401
