"""The node's input reliability rule and its no-images messages, without a ROS graph."""

import pytest

pytest.importorskip("rclpy")

from rclpy.qos import ReliabilityPolicy  # noqa: E402

from tdnet_ros.stream_stats import silence_message  # noqa: E402
from tdnet_ros.ros.node import matching_reliability  # noqa: E402

RELIABLE, BEST_EFFORT = ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT


def test_reliable_only_when_every_publisher_is_reliable():
    assert matching_reliability([RELIABLE]) == "reliable"
    assert matching_reliability([RELIABLE, RELIABLE]) == "reliable"
    # a best-effort publisher cannot serve a reliable subscription
    assert matching_reliability([RELIABLE, BEST_EFFORT]) == "best_effort"
    assert matching_reliability([BEST_EFFORT]) == "best_effort"
    # nobody yet: best effort matches the first publisher of either kind
    assert matching_reliability([]) == "best_effort"


COMMON = dict(silent_for=3.2, lost=0, publishers=1, publisher_kinds=["reliable"], subscribed="reliable",
              incompatible_policy="", transports="")


def test_stopped_sending_is_not_never_arrived():
    stopped = silence_message("/cam", **{**COMMON, "received": 5})
    assert stopped.startswith("camera stopped sending: no images on /cam for 3.2 s after 5 received")
    assert "publisher is gone" not in stopped
    gone = silence_message("/cam", **{**COMMON, "received": 5, "publishers": 0})
    assert gone.endswith("its publisher is gone")
    never = silence_message("/cam", **{**COMMON, "received": 0})
    assert never.startswith("no images received on /cam yet although 1 publisher(s) (reliable) exist")


def test_each_cause_is_named():
    nobody = silence_message("/cam", **{**COMMON, "received": 0, "publishers": 0, "publisher_kinds": []})
    assert "no publisher seen" in nobody and "FASTDDS_BUILTIN_TRANSPORTS=unset here" in nobody
    with_large = silence_message("/cam", **{**COMMON, "received": 0, "publishers": 0, "transports": "LARGE_DATA"})
    assert "FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA here" in with_large
    incompatible = silence_message("/cam", **{**COMMON, "received": 0, "publisher_kinds": ["best_effort"],
                                              "incompatible_policy": "RELIABILITY"})
    assert "policy RELIABILITY" in incompatible and "reliable subscription" in incompatible
    lost = silence_message("/cam", **{**COMMON, "received": 0, "lost": 7, "subscribed": "best_effort",
                                      "publisher_kinds": ["best_effort"]})
    assert "7 image(s) lost in transport" in lost and "large_data:=true" in lost
