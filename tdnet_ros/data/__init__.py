"""Rendered street-video dataset: generator, Cityscapes-style and rosbag2 writers.

The class table is the core's (``tdnet_ros.classes``). These modules need numpy,
OpenCV, pybullet (``street``) and rosbags (``writers``) and are imported lazily on
attribute access.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Frame",
    "StreetConfig",
    "StreetScene",
    "generate_sequence",
    "write_cityscapes",
    "write_rosbag",
]


def __getattr__(name: str) -> Any:
    if name in {"Frame", "StreetConfig", "StreetScene", "generate_sequence"}:
        from tdnet_ros.data import street

        return getattr(street, name)
    if name in {"write_cityscapes", "write_rosbag"}:
        from tdnet_ros.data import writers

        return getattr(writers, name)
    raise AttributeError(f"module 'tdnet_ros.data' has no attribute {name!r}")
