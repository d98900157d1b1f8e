"""tdnet_ros: TDNet video semantic segmentation, with a ROS 2 node around it.

The core (model, cache, pre/post-processing, metrics) imports torch and numpy only;
the ROS 2 node lives in `tdnet_ros.ros`.
"""

from .checkpoint import CheckpointError, load_model, save_checkpoint
from .config import ModelConfig
from .model import TDNet, build_model
from .segmenter import SegmentResult, Segmenter

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "SegmentResult",
    "Segmenter",
    "TDNet",
    "build_model",
    "load_model",
    "save_checkpoint",
]
