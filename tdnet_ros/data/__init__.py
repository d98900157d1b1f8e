"""Rendered street-video dataset: generator, Cityscapes-style and rosbag2 writers.

``classes`` is dependency-free; the other modules need numpy, OpenCV, pybullet
(``street``) and rosbags (``writers``) and are imported lazily on attribute access
so that ``from tdnet_ros.data.classes import CLASS_NAMES`` stays cheap.
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
