"""A copy of the evaluated recording with the prediction topic added.

Predictions are collected during the evaluation (PNG-compressed, keyed by the camera
message's position on its topic) and written in one pass over the source recording
afterwards, each right after its camera message with the same receive time, so that the
new bag plays back in order. rosbag2 sources are copied message for message (raw CDR);
ROS 1 sources get a rosbag2 bag with the prediction topic only (their messages are not
CDR and are left out, which the report notes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tdnet_ros.evaluation.bag import Recording


def prediction_topic(image_topic: str, name: str = "labels",
                     output_namespace: str = "segmentation") -> str:
    """Where the node publishes a camera's ``name`` output: ``<camera namespace>/
    <output_namespace>/<name>``, e.g. ``/camera/image_raw`` -> ``/camera/segmentation/labels``
    (a ``/compressed`` suffix is ignored, as the node does)."""
    if image_topic.endswith("/compressed"):
        image_topic = image_topic[: -len("/compressed")]
    namespace = image_topic.rsplit("/", 1)[0] if "/" in image_topic else ""
    if namespace and not namespace.startswith("/"):
        namespace = "/" + namespace
    return f"{namespace}/{output_namespace}/{name}"


@dataclass
class PredictionBagWriter:
    """Collects predicted label maps and writes them into a new rosbag2 recording.

    Args:
        output: folder of the new bag (must not exist).
        image_topic: the evaluated camera topic.
        storage: ``"mcap"`` or ``"sqlite3"``.
    """

    output: Path
    image_topic: str
    storage: str = "mcap"
    labels_topic: str = field(init=False)
    _predictions: dict[int, tuple[int, str, bytes]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.labels_topic = prediction_topic(self.image_topic)
        if self.storage not in ("mcap", "sqlite3"):
            raise ValueError(f"storage must be 'mcap' or 'sqlite3', got {self.storage!r}")

    def add(self, index: int, stamp_ns: int, frame_id: str, labels: np.ndarray) -> None:
        """Keeps the prediction for camera message ``index`` (position on its topic)."""
        ok, png = cv2.imencode(".png", labels)
        if ok:
            self._predictions[index] = (stamp_ns, frame_id, png.tobytes())

    def write(self, source: Path) -> tuple[Path, list[str]]:
        """Writes the new bag from ``source``; returns its path and remarks for the report."""
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        typestore = get_typestore(Stores.LATEST)
        image_type = typestore.types["sensor_msgs/msg/Image"]
        header_type = typestore.types["std_msgs/msg/Header"]
        time_type = typestore.types["builtin_interfaces/msg/Time"]
        plugin = StoragePlugin.MCAP if self.storage == "mcap" else StoragePlugin.SQLITE3
        remarks: list[str] = []

        def label_message(stamp_ns: int, frame_id: str, png: bytes) -> Any:
            labels = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            height, width = labels.shape
            stamp = time_type(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
            return image_type(
                header=header_type(stamp=stamp, frame_id=frame_id), height=height,
                width=width, encoding="mono8", is_bigendian=0, step=width,
                data=np.ascontiguousarray(labels).reshape(-1),
            )

        with Recording(source) as recording, Writer(
            self.output, version=Writer.VERSION_LATEST, storage_plugin=plugin
        ) as writer:
            copy = not recording.is_ros1
            if copy and self.labels_topic in {c.topic for c in recording.reader.connections}:
                taken = self.labels_topic
                self.labels_topic = prediction_topic(self.image_topic, "labels",
                                                     "segmentation_evaluated")
                remarks.append(
                    f"the source already has a topic {taken}: predictions are on "
                    f"{self.labels_topic}"
                )
            labels_connection = writer.add_connection(
                self.labels_topic, "sensor_msgs/msg/Image", typestore=typestore
            )
            if not copy:
                remarks.append(
                    "the source is a ROS 1 bag: the prediction bag holds the prediction "
                    "topic only"
                )
            connections: dict[int, Any] = {}
            if copy:
                for connection in recording.reader.connections:
                    if connection.topic in {c.topic for c in connections.values()}:
                        continue
                    if connection.msgdef.data and connection.digest:
                        definition: dict[str, Any] = {"msgdef": connection.msgdef.data,
                                                      "rihs01": connection.digest}
                    elif connection.msgtype in typestore.types:
                        # Recorded before bags carried type definitions: take them from
                        # the message store.
                        definition = {"typestore": typestore}
                    else:
                        remarks.append(f"topic {connection.topic} ({connection.msgtype}) has "
                                       "no type definition and is not copied")
                        continue
                    connections[connection.id] = writer.add_connection(
                        connection.topic, connection.msgtype, serialization_format="cdr",
                        **definition,
                    )
            by_topic = {c.topic: c for c in connections.values()}
            image_index = -1
            for connection, bag_time, raw in recording.reader.messages():
                if copy:
                    target = connections.get(connection.id) or by_topic.get(connection.topic)
                    if target is not None:
                        writer.write(target, bag_time, raw)
                if connection.topic != self.image_topic:
                    continue
                image_index += 1
                prediction = self._predictions.get(image_index)
                if prediction is not None:
                    message = label_message(*prediction)
                    writer.write(
                        labels_connection, bag_time,
                        typestore.serialize_cdr(message, "sensor_msgs/msg/Image"),
                    )
        return self.output, remarks
