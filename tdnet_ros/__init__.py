"""tdnet_ros: TDNet video semantic segmentation, with a ROS 2 node around it.

The core (model, cache, pre/post-processing, metrics) imports torch and numpy only;
the ROS 2 node lives in `tdnet_ros.ros`. The names below are imported on first use, so
that importing a light submodule (the node's entry point, which must answer signals from
its first moment) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ModelConfig": "config",
    "TDNet": "model",
    "build_model": "model",
    "SegmentResult": "segmenter",
    "Segmenter": "segmenter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tdnet_ros' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
