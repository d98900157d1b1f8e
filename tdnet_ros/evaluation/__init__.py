"""Evaluation of a segmenter on recordings: accuracy, temporal consistency, latency.

Three ways in, one recorder and one report:

* offline (:func:`evaluate_offline`): a rosbag2 (MCAP/sqlite3) or ROS 1 recording read with
  ``rosbags``, every frame run through the segmenter in this process; no ROS runtime;
* live (:func:`run_live` then :func:`measure_live`): the recording played into ROS 2 topics,
  ``segmenter_node`` in its own process, its outputs received over DDS;
* Cityscapes (:func:`evaluate_cityscapes`): the published ``leftImg8bit_sequence`` protocol.

:func:`write_report` writes results.json, report.md and the figures; ``tdnet-eval``
(:mod:`tdnet_ros.cli.evaluate`) is the command line of all three. Only :mod:`.live` uses rclpy, and only
when run.

Example::

    from tdnet_ros.evaluation import OfflineSettings, Provenance, evaluate_offline, write_offline_report
    from tdnet_ros.runtime import RuntimeConfig
    from tdnet_ros.segmenter import load_segmenter

    segmenter = load_segmenter(RuntimeConfig(device="cpu"), "model.pt")
    provenance = Provenance.of(segmenter, "model.pt", None, "my script")
    result = evaluate_offline("recording/", segmenter,
                              OfflineSettings(image_topic="/camera/image_raw",
                                              label_topic="/camera/labels"))
    results = write_offline_report(result, provenance, Path("outputs/eval"))
    results["miou"], results["temporal_consistency"], results["latency_ms"]["total"]
"""

from tdnet_ros.evaluation.bag import BagError, Recording
from tdnet_ros.evaluation.cityscapes import evaluate_cityscapes
from tdnet_ros.evaluation.live import LiveEvaluationError, LiveSettings, measure_live, run_live
from tdnet_ros.evaluation.offline import OfflineResult, OfflineSettings, evaluate_offline, write_offline_report
from tdnet_ros.evaluation.recorder import EvaluationRecorder
from tdnet_ros.evaluation.report import Provenance, write_report

__all__ = [
    "BagError",
    "EvaluationRecorder",
    "LiveEvaluationError",
    "LiveSettings",
    "OfflineResult",
    "OfflineSettings",
    "Provenance",
    "Recording",
    "evaluate_cityscapes",
    "evaluate_offline",
    "measure_live",
    "run_live",
    "write_offline_report",
    "write_report",
]
