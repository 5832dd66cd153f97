"""Compatibility alias: the toy CLIP now lives in :mod:`bench.demo.toyclip`."""

from bench.demo.toyclip import *  # noqa: F403
from bench.demo.toyclip import __all__  # noqa: F401
from bench.demo.toyclip import _CompactText as _CompactText
from bench.demo.toyclip import _load_skimage as _load_skimage
from bench.demo.toyclip import _new_model as _new_model
from bench.demo.toyclip import _pad as _pad
from bench.demo.toyclip import _prompt_pair as _prompt_pair
from bench.demo.toyclip import _Vocab as _Vocab
from bench.demo.toyclip.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m bench.toyclip"))
