"""Rendered street-video dataset: generator, Cityscapes-style and rosbag2 writers.

The class table is the core's (``tdnet_ros.classes``). These modules need numpy,
OpenCV, pybullet (``street``) and rosbags (``writers``) and are imported lazily on
attribute access.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MAX_RARE_OBJECT_RATE",
    "Frame",
    "StreetConfig",
    "StreetScene",
    "rare_object_rate_problem",
    "generate_sequence",
    "write_cityscapes",
    "write_rosbag",
]

# StreetConfig.rare_object_rate's upper bound, here so that configurations can check it
# without pybullet: beyond it, buses and trucks would crowd the cars out
MAX_RARE_OBJECT_RATE = 4.0


def rare_object_rate_problem(value: float) -> str | None:
    """What is wrong with `value` as a rare-object rate, worded to follow the setting's name
    ("must be within ..."), or None where it is within 1..MAX_RARE_OBJECT_RATE."""
    if 1.0 <= value <= MAX_RARE_OBJECT_RATE:  # false for nan too
        return None
    return f"must be within 1..{MAX_RARE_OBJECT_RATE:g} (1: the usual scenes), got {value:g}"


def __getattr__(name: str) -> Any:
    if name in {"Frame", "StreetConfig", "StreetScene", "generate_sequence"}:
        from tdnet_ros.data import street

        return getattr(street, name)
    if name in {"write_cityscapes", "write_rosbag"}:
        from tdnet_ros.data import writers

        return getattr(writers, name)
    raise AttributeError(f"module 'tdnet_ros.data' has no attribute {name!r}")
