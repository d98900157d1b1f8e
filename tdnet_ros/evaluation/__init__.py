"""Evaluation of a segmenter on recordings: accuracy, temporal consistency, latency.

Offline mode (:func:`evaluate_offline`) reads a rosbag2 (MCAP/sqlite3) or ROS 1 recording
with ``rosbags`` and runs every frame through the segmenter in this process; it needs no
ROS runtime. The live mode's player and evaluator node live in :mod:`.live` (the only
module here that imports rclpy). ``tdnet-eval`` is the command line of both.
"""

from tdnet_ros.evaluation.bag import BagError, Recording
from tdnet_ros.evaluation.offline import OfflineResult, OfflineSettings, evaluate_offline
from tdnet_ros.evaluation.recorder import EvaluationRecorder
from tdnet_ros.evaluation.report import Provenance, write_report

__all__ = [
    "BagError",
    "EvaluationRecorder",
    "OfflineResult",
    "OfflineSettings",
    "Provenance",
    "Recording",
    "evaluate_offline",
    "write_report",
]
