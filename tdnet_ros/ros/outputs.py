"""One camera's outputs: its publishers and the assembly of its messages.

Handed its publishers, message types, renderer and statistics, never the node: the
rendering is the core's (masks.Renderer), the encoding the codec's (image_encoding), the
counting the statistics' (stream_stats); this module only puts them into messages.
"""

from __future__ import annotations

import array
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from sensor_msgs.msg import Image, RegionOfInterest

from tdnet_ros.image_encoding import encode_labels, encode_rgb
from tdnet_ros.masks import Renderer
from tdnet_ros.stream_stats import StreamStatistics

#: Outputs a camera publishes per frame (each only while somebody subscribes to it).
FRAME_OUTPUTS = ("labels", "color", "overlay", "masks", "timing")

try:  # on every ROS 2 install (ros-<distro>-vision-msgs); optional elsewhere
    from vision_msgs.msg import LabelInfo, VisionClass
except ImportError:  # pragma: no cover - depends on the install
    LabelInfo = VisionClass = None


@dataclass
class FrameJob:
    """A received message waiting for the worker."""

    msg: Any  # serialized Image bytes, an Image or a CompressedImage
    received_ns: int  # time.monotonic_ns() at reception
    wall_received_ns: int  # time.time_ns() at reception


@dataclass
class PreparedFrame:
    """A decoded frame on its way to the segmenter."""

    job: FrameJob
    rgb: np.ndarray  # (H, W, 3) uint8
    header: Any  # std_msgs/Header of the camera image (stamp and frame_id carried to every output)
    stamp_ns: int
    wanted: dict[str, bool]  # output -> somebody subscribes to it
    start_ns: int  # time.monotonic_ns() when the worker took the frame
    decoded_ns: int


@dataclass
class OutputPublishers:
    labels: Any
    color: Any
    overlay: Any
    masks: Any
    timing: Any
    class_table: Any  # latched
    label_info: Any  # latched vision_msgs/LabelInfo; None without vision_msgs

    @classmethod
    def create(cls, create_publisher: Callable[..., Any], namespace: str, msgs: Any, output_qos: Any,
               latched_qos: Any) -> "OutputPublishers":
        return cls(
            labels=create_publisher(Image, f"{namespace}/labels", output_qos),
            color=create_publisher(Image, f"{namespace}/color", output_qos),
            overlay=create_publisher(Image, f"{namespace}/overlay", output_qos),
            masks=create_publisher(msgs.ClassMasks, f"{namespace}/masks", output_qos),
            timing=create_publisher(msgs.SegmentationTiming, f"{namespace}/timing", output_qos),
            class_table=create_publisher(msgs.ClassTable, f"{namespace}/class_table", latched_qos),
            label_info=(create_publisher(LabelInfo, f"{namespace}/label_info", latched_qos)
                        if LabelInfo is not None else None),
        )

    def all(self) -> list[Any]:
        return [p for p in (self.labels, self.color, self.overlay, self.masks, self.timing, self.class_table,
                            self.label_info) if p is not None]

    def subscribed(self) -> dict[str, bool]:
        """Which per-frame outputs somebody subscribes to."""
        return {name: getattr(self, name).get_subscription_count() > 0 for name in FRAME_OUTPUTS}


class CameraOutputs:
    """Builds and publishes one camera's messages."""

    def __init__(self, publishers: OutputPublishers, msgs: Any, renderer: Renderer, class_names: list[str],
                 stats: StreamStatistics) -> None:
        self.publishers = publishers
        self.msgs = msgs
        self.renderer = renderer
        self.class_names = class_names
        self.stats = stats

    def publish_class_map(self, stamp: Any, model: str, checkpoint: str) -> None:
        """The latched class map: the package's ClassTable (with colours) and, where
        vision_msgs is installed, the ecosystem's LabelInfo."""
        msgs = self.msgs
        table = msgs.ClassTable(model=model, checkpoint=checkpoint)
        table.header.stamp = stamp
        for class_id, (name, color) in enumerate(zip(self.class_names, self.renderer.class_colors)):
            table.classes.append(msgs.ClassInfo(id=class_id, name=name, color=[int(c) for c in color]))
        self.publishers.class_table.publish(table)
        if self.publishers.label_info is not None:
            info = LabelInfo(threshold=0.0)  # labels are an argmax: no score threshold applies
            info.header.stamp = stamp
            info.class_map = [VisionClass(class_id=i, class_name=name) for i, name in enumerate(self.class_names)]
            self.publishers.label_info.publish(info)

    def publish(self, frame: PreparedFrame, result: Any, segmented_ns: int, dropped: int, resets: int) -> None:
        """Renders and publishes the outputs somebody subscribes to, then records the timing."""
        header, wanted, labels = frame.header, frame.wanted, result.labels  # labels: (H, W) at the camera's size
        stamp = dict(sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec), frame_id=header.frame_id)
        publishers = self.publishers
        stage_ms: dict[str, float] = {}
        rendered: list[str] = []

        def done(name: str, began_ns: int) -> None:
            stage_ms[f"output/{name}"] = (time.monotonic_ns() - began_ns) / 1e6
            rendered.append(name)

        if wanted["labels"]:
            began = time.monotonic_ns()
            publishers.labels.publish(encode_labels(labels, **stamp))
            done("labels", began)
        if wanted["color"] or wanted["overlay"]:
            began = time.monotonic_ns()
            color = self.renderer.color(labels)  # (H, W, 3) RGB
            if wanted["color"]:
                publishers.color.publish(encode_rgb(color, **stamp))
                done("color", began)
            if wanted["overlay"]:
                began = time.monotonic_ns()
                publishers.overlay.publish(encode_rgb(self.renderer.overlay(frame.rgb, color), **stamp))
                done("overlay", began)
        if wanted["masks"]:
            began = time.monotonic_ns()
            publishers.masks.publish(self._masks(header, labels))
            done("masks", began)
        published_ns = time.monotonic_ns()

        job, stamp_ns = frame.job, frame.stamp_ns
        stage_ms.update({f"segmenter/{k}": float(v) for k, v in result.timings.items()})
        stage_ms.update(
            receive=(job.wall_received_ns - stamp_ns) / 1e6,
            queue=(frame.start_ns - job.received_ns) / 1e6,
            decode=(frame.decoded_ns - frame.start_ns) / 1e6,
            segment=(segmented_ns - frame.decoded_ns) / 1e6,
            publish=(published_ns - segmented_ns) / 1e6,
            node=(published_ns - job.received_ns) / 1e6,
            end_to_end=(time.time_ns() - stamp_ns) / 1e6,
        )
        if wanted["timing"]:
            publishers.timing.publish(self._timing(header, result, stage_ms, stamp_ns, dropped, resets))
            rendered.append("timing")
        self.stats.published(stage_ms, rendered)

    def _timing(self, header: Any, result: Any, stage_ms: dict[str, float], stamp_ns: int, dropped: int,
                resets: int) -> Any:
        timing = self.msgs.SegmentationTiming()
        timing.header = header
        timing.path = int(result.path)
        timing.cache_warm = bool(result.cache_warm)
        timing.batch_size = int(result.batch_size)
        timing.stage_names = list(result.timings.keys())
        timing.stage_ms = [float(v) for v in result.timings.values()]
        for stage in ("receive", "queue", "decode", "segment", "publish", "node"):
            setattr(timing, f"{stage}_ms", stage_ms[stage])
        timing.end_to_end_ms = (time.time_ns() - stamp_ns) / 1e6
        timing.dropped_frames = dropped
        timing.cache_resets = resets
        return timing

    def _masks(self, header: Any, labels: np.ndarray) -> Any:
        message = self.msgs.ClassMasks()
        message.header = header
        message.height, message.width = labels.shape
        for region in self.renderer.masks(labels):
            entry = self.msgs.ClassMask()
            entry.class_id = region.class_id
            entry.class_name = self.class_names[region.class_id]
            entry.pixel_count = region.pixel_count
            entry.roi = RegionOfInterest(x_offset=region.x, y_offset=region.y, width=region.width,
                                         height=region.height)
            mask = array.array("B")
            mask.frombytes(memoryview(region.mask).cast("B"))
            entry.mask = mask
            message.masks.append(entry)
        return message


def destroy_publishers(publishers: Optional[OutputPublishers], destroy_publisher: Callable[[Any], Any]) -> None:
    if publishers is not None:
        for publisher in publishers.all():
            destroy_publisher(publisher)
