"""Is the segmentation node reachable from here? A camera-like probe over real DDS.

    python -m tdnet_ros.ros.dds_probe --topic /camera/image_raw --reliability reliable
    FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA python -m tdnet_ros.ros.dds_probe --reliability best_effort

Run it in the shell (and with the environment) your camera driver uses. It publishes
`--frames` images of `--size` on `--topic`, as a camera with that reliability would,
subscribes to the node's label images (`<topic's namespace>/segmentation/labels`), and
prints one JSON line: whether the node was discovered (its labels topic is listed and it
subscribes to the camera topic), how many frames were sent, and how many label images came
back for them. Exit code 0 when every frame came back, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np


def labels_topic(topic: str, output_namespace: str = "segmentation") -> str:
    return f"{topic.rsplit('/', 1)[0]}/{output_namespace}/labels"


def probe(topic: str, reliability: str, frames: int, size: tuple[int, int], rate_hz: float,
          discovery_timeout: float, labels_timeout: float, settle_s: float) -> dict:
    import rclpy
    from rclpy.qos import QoSProfile, qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from tdnet_ros.ros.testing import Recorder, make_image, stamp_ns

    rclpy.init()
    node = rclpy.create_node("tdnet_dds_probe")
    try:
        camera_qos = qos_profile_sensor_data if reliability == "best_effort" else QoSProfile(depth=10)
        publisher = node.create_publisher(Image, topic, camera_qos)
        recorder = Recorder()
        output = labels_topic(topic)
        node.create_subscription(Image, output, recorder, QoSProfile(depth=frames))

        def spin_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=min(0.05, max(end - time.monotonic(), 0)))

        began = time.monotonic()
        discovered = False
        while time.monotonic() - began < discovery_timeout:
            listed = any(name == output for name, _ in node.get_topic_names_and_types())
            if listed and publisher.get_subscription_count() > 0 and node.count_publishers(output) > 0:
                discovered = True
                break
            spin_for(0.1)
        discovery_s = time.monotonic() - began
        sent: list[int] = []
        if discovered:
            spin_for(settle_s)  # the node may resubscribe to match this publisher's QoS
            height, width = size
            rng = np.random.default_rng(0)
            base = time.time_ns()
            for index in range(frames):
                rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                stamp = base + index * int(1e9 / rate_hz)
                publisher.publish(make_image(rgb, stamp_ns=stamp, frame_id="probe"))
                sent.append(stamp)
                spin_for(1.0 / rate_hz)
            deadline = time.monotonic() + labels_timeout
            while time.monotonic() < deadline:
                if len({stamp_ns(m.header.stamp) for m in recorder.messages} & set(sent)) == len(sent):
                    break
                spin_for(0.1)
        returned = len({stamp_ns(m.header.stamp) for m in recorder.messages} & set(sent))
        return {"topic": topic, "reliability": reliability, "node_discovered": discovered,
                "discovery_s": round(discovery_s, 2), "frames_sent": len(sent), "labels_received": returned}
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--topic", default="/probe/image_raw", help="camera topic the node subscribes to")
    parser.add_argument("--reliability", choices=("reliable", "best_effort"), default="reliable",
                        help="the camera publisher's reliability (best_effort = sensor-data profile)")
    parser.add_argument("--frames", type=int, default=10, help="images to publish")
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--rate", type=float, default=5.0, help="images per second")
    parser.add_argument("--discovery-timeout", type=float, default=20.0, help="seconds to wait for the node")
    parser.add_argument("--labels-timeout", type=float, default=10.0,
                        help="seconds to wait for label images after the last frame")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between discovering the node and the first frame")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    if args.frames < 1 or not 0 < args.rate <= 1000 or min(width, height) < 1:
        parser.error("--frames must be >= 1, --rate within (0, 1000] and --size positive")
    result = probe(args.topic, args.reliability, args.frames, (height, width), args.rate,
                   args.discovery_timeout, args.labels_timeout, args.settle)
    print(json.dumps(result), flush=True)
    return 0 if result["labels_received"] == args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
