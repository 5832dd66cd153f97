"""The toy CLIP's architecture: the open_clip config it trains
(``bench/demo/model_configs/zsad-tiny.json``) and its input size."""

from __future__ import annotations

ARCH = "zsad-tiny"
IMAGE_SIZE = 64
