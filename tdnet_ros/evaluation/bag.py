"""Reading camera and label topics from recordings, without a ROS install.

rosbag2 (MCAP or sqlite3) and ROS 1 ``.bag`` files are read with ``rosbags``' AnyReader.
Each message is decoded into a numpy array or into a :class:`DecodeFailure` that says what
is wrong with it; nothing a recording contains raises out of the iterators, so the
evaluator can skip, count and name bad messages. Only problems with the recording as a
whole (unreadable, topic missing, topic of the wrong type) raise :class:`BagError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdnet_ros.image_encoding import (
    ImageEncodingError,
    compressed_to_rgb,
    image_msg_to_rgb,
)

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
RAW_IMAGE_TYPE = "sensor_msgs/msg/Image"
# Label images carry class ids; 16-bit ids above 254 are out of range for 8-bit maps and
# become the ignore label.
LABEL_ENCODINGS = {"mono8": np.uint8, "8UC1": np.uint8, "mono16": np.uint16, "16UC1": np.uint16}
IGNORE_LABEL = 255
# Refuse frames larger than this before decoding them (a corrupt header can claim anything).
DEFAULT_MAX_PIXELS = 40_000_000


class BagError(RuntimeError):
    """The recording cannot be read, or lacks a topic the evaluation needs."""


@dataclass(frozen=True)
class TopicSummary:
    """One topic of a recording."""

    name: str
    msgtype: str
    count: int


@dataclass(frozen=True)
class DecodeFailure:
    """Why a message could not be used; the evaluator reports it and moves on."""

    reason: str


@dataclass(frozen=True)
class BagFrame:
    """One message of the camera or label topic, decoded.

    Attributes:
        index: position of the message on its topic (0-based, in recording order).
        stamp_ns: header stamp in nanoseconds (None if the header could not be read).
        bag_time_ns: time the recorder received the message.
        frame_id: header frame_id.
        data: (H, W, 3) uint8 RGB for camera topics, (H, W) uint8 class ids for label
            topics, or the reason it could not be decoded.
        message: the deserialized message (kept for writing prediction bags).
    """

    index: int
    stamp_ns: int | None
    bag_time_ns: int
    frame_id: str
    data: np.ndarray | DecodeFailure
    message: Any = None


def stamp_to_ns(stamp: Any) -> int:
    """Nanoseconds of a ``builtin_interfaces/Time`` (ROS 2) or ROS 1 ``time``."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def is_ros1_bag(path: Path) -> bool:
    return path.is_file() and path.suffix == ".bag"


def _default_typestore() -> Any:
    """Type definitions for rosbag2 recordings that carry none (recorded before Iron)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.LATEST)


class Recording:
    """An open recording: topic listing and decoded message iterators.

    Use as a context manager::

        with Recording(path) as bag:
            for frame in bag.images("/camera/image_raw"):
                ...
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: Any = None
        # Errors that ended an iteration early (the storage is damaged past some point).
        self.read_errors: list[str] = []

    def __enter__(self) -> "Recording":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Opens the recording.

        Raises:
            BagError: the path is missing or not a readable rosbag2 folder, rosbag2 storage
                file or ROS 1 bag.
        """
        from rosbags.highlevel import AnyReader

        path = self.path
        if not path.exists():
            raise BagError(f"recording {path} does not exist")
        # A storage file given directly (x.mcap / x.db3): open its folder when it has
        # metadata; rosbags also reads a bare .mcap file.
        if path.is_file() and path.suffix in (".db3", ".mcap") and (
            path.parent / "metadata.yaml"
        ).exists():
            path = path.parent
        try:
            reader = AnyReader([path], default_typestore=_default_typestore())
            reader.open()
        except Exception as error:  # rosbags raises several unrelated types
            reader = self._open_salvaged(path, error)
            if reader is None:
                raise BagError(
                    f"cannot read recording {self.path}: {error} "
                    "(expected a rosbag2 folder or .mcap/.db3 file, or a ROS 1 .bag file)"
                    + _metadata_topics(path)
                ) from error
        self._reader = reader

    def _open_salvaged(self, path: Path, error: Exception) -> Any | None:
        """A reader over the complete part of a damaged MCAP recording (cut off by power
        loss, or with garbage after it), or None. What was lost goes to `read_errors`."""
        import tempfile

        from rosbags.highlevel import AnyReader

        from tdnet_ros.evaluation.mcap_salvage import salvage_mcap

        files = sorted(path.glob("*.mcap")) if path.is_dir() else [path] if path.suffix == ".mcap" else []
        if len(files) != 1:
            return None
        self._salvage_dir = tempfile.TemporaryDirectory(prefix="tdnet_salvage_")
        salvage = salvage_mcap(files[0], Path(self._salvage_dir.name) / files[0].name)
        if salvage is None:
            return None
        try:
            reader = AnyReader([salvage.path], default_typestore=_default_typestore())
            reader.open()
        except Exception:
            return None
        kept = sum(c.msgcount for c in reader.connections)
        expected = _metadata_message_count(path)
        lost = f"{expected - kept} of {expected} messages lost" if expected is not None else (
            "the number of messages lost is unknown (no metadata.yaml)")
        self.read_errors.append(
            f"recording {self.path} is damaged ({error}): read its {kept} complete messages; {lost}; "
            f"{salvage.dropped_bytes} bytes after the last complete record were not readable"
        )
        return reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if getattr(self, "_salvage_dir", None) is not None:
            self._salvage_dir.cleanup()
            self._salvage_dir = None

    @property
    def is_ros1(self) -> bool:
        return not self._reader.is2

    @property
    def reader(self) -> Any:
        """The underlying ``rosbags`` AnyReader (open)."""
        if self._reader is None:
            raise BagError(f"recording {self.path} is not open")
        return self._reader

    def topics(self) -> list[TopicSummary]:
        """All topics of the recording, sorted by name."""
        return [
            TopicSummary(name, info.msgtype or "?", info.msgcount)
            for name, info in sorted(self.reader.topics.items())
        ]

    def describe_topics(self) -> str:
        """The topic list as text, for error messages."""
        topics = self.topics()
        if not topics:
            return "the recording has no topics"
        lines = [f"  {t.name}  [{t.msgtype}]  {t.count} messages" for t in topics]
        return "topics in the recording:\n" + "\n".join(lines)

    def _connections(self, topic: str, allowed_types: tuple[str, ...], role: str) -> list[Any]:
        connections = [c for c in self.reader.connections if c.topic == topic]
        if not connections:
            raise BagError(
                f"{role} topic '{topic}' is not in recording {self.path}; "
                f"{self.describe_topics()}"
            )
        wrong = sorted({c.msgtype for c in connections if c.msgtype not in allowed_types})
        if wrong:
            raise BagError(
                f"{role} topic '{topic}' in {self.path} has type {', '.join(wrong)}, expected "
                f"{' or '.join(allowed_types)}; {self.describe_topics()}"
            )
        return connections

    def check_topic(self, topic: str, role: str, allowed_types: tuple[str, ...]) -> int:
        """Checks that ``topic`` exists with an allowed type; returns its message count.

        Raises:
            BagError: missing topic or wrong type; the message lists the recording's topics.
        """
        connections = self._connections(topic, allowed_types, role)
        return sum(c.msgcount for c in connections)

    def _messages(self, topic: str, allowed_types: tuple[str, ...], role: str
                  ) -> Iterator[tuple[int, int, Any, Any | DecodeFailure]]:
        """(index, bag time, connection, message or failure) for each message on a topic."""
        connections = self._connections(topic, allowed_types, role)
        messages = self.reader.messages(connections=connections)
        index = -1
        while True:
            try:
                connection, bag_time, raw = next(messages)
            except StopIteration:
                return
            except Exception as error:  # a storage file cut off or corrupt mid-way
                self.read_errors.append(
                    f"reading {topic} stopped after {index + 1} messages: "
                    f"{type(error).__name__}: {error}"
                )
                return
            index += 1
            try:
                message: Any = self.reader.deserialize(raw, connection.msgtype)
            except Exception as error:  # truncated or corrupt serialization
                yield index, bag_time, connection, DecodeFailure(
                    f"message cannot be deserialized as {connection.msgtype}: {error}"
                )
                continue
            yield index, bag_time, connection, message

    def images(
        self, topic: str, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> Iterator[BagFrame]:
        """Camera frames of ``topic`` (Image in any supported encoding, or CompressedImage)."""
        for index, bag_time, connection, message in self._messages(
            topic, IMAGE_TYPES, "image"
        ):
            if isinstance(message, DecodeFailure):
                yield BagFrame(index, None, bag_time, "", message)
                continue
            stamp, frame_id = _header_fields(message)
            try:
                if connection.msgtype == RAW_IMAGE_TYPE:
                    rgb = image_msg_to_rgb(message, max_pixels=max_pixels)
                else:
                    rgb = compressed_to_rgb(message.format, message.data, max_pixels=max_pixels)
                data: np.ndarray | DecodeFailure = rgb
            except ImageEncodingError as error:
                data = DecodeFailure(str(error))
            except Exception as error:  # anything else a malformed message may trigger
                data = DecodeFailure(f"cannot convert image: {type(error).__name__}: {error}")
            yield BagFrame(index, stamp, bag_time, frame_id, data, message)

    def labels(self, topic: str) -> Iterator[BagFrame]:
        """Ground-truth label maps of ``topic`` (mono8 class ids; mono16 ids above 254 ignored)."""
        for index, bag_time, _connection, message in self._messages(
            topic, (RAW_IMAGE_TYPE,), "label"
        ):
            if isinstance(message, DecodeFailure):
                yield BagFrame(index, None, bag_time, "", message)
                continue
            stamp, frame_id = _header_fields(message)
            try:
                data: np.ndarray | DecodeFailure = label_image_to_array(
                    message.height, message.width, message.encoding, message.step,
                    message.is_bigendian, message.data,
                )
            except ImageEncodingError as error:
                data = DecodeFailure(str(error))
            yield BagFrame(index, stamp, bag_time, frame_id, data)


def _metadata_message_count(path: Path) -> int | None:
    """The message count a rosbag2 folder's metadata.yaml states, or None."""
    metadata = path / "metadata.yaml" if path.is_dir() else path.parent / "metadata.yaml"
    try:
        import yaml

        return int(yaml.safe_load(metadata.read_text())["rosbag2_bagfile_information"]["message_count"])
    except Exception:  # no metadata, or not the expected layout
        return None


def _metadata_topics(path: Path) -> str:
    """The topics a rosbag2 folder's metadata.yaml lists (for errors when storage fails)."""
    metadata = path / "metadata.yaml" if path.is_dir() else path.parent / "metadata.yaml"
    try:
        import yaml

        info = yaml.safe_load(metadata.read_text())["rosbag2_bagfile_information"]
        topics = [
            f"  {entry['topic_metadata']['name']}  [{entry['topic_metadata']['type']}]  "
            f"{entry['message_count']} messages"
            for entry in info["topics_with_message_count"]
        ]
    except Exception:  # no metadata, or not the expected layout: nothing to add
        return ""
    return "; topics listed in its metadata.yaml:\n" + "\n".join(topics)


def _header_fields(message: Any) -> tuple[int | None, str]:
    try:
        return stamp_to_ns(message.header.stamp), str(message.header.frame_id)
    except (AttributeError, TypeError, ValueError):
        return None, ""


def label_image_to_array(
    height: int, width: int, encoding: str, step: int, is_bigendian: int | bool, data: Any
) -> np.ndarray:
    """Class ids of a label image (``mono8``/``8UC1``, or ``mono16``/``16UC1``).

    Returns:
        (H, W) uint8 class ids; 16-bit ids that do not fit below the ignore label (255)
        become 255.

    Raises:
        ImageEncodingError: unsupported encoding, or fields that do not describe the data.
    """
    dtype = LABEL_ENCODINGS.get(encoding)
    if dtype is None:
        raise ImageEncodingError(
            f"label image encoding '{encoding}' is not a class-id encoding "
            f"(supported: {', '.join(LABEL_ENCODINGS)})"
        )
    if height <= 0 or width <= 0:
        raise ImageEncodingError(f"empty label image: width {width}, height {height}")
    item = np.dtype(dtype).itemsize
    row_bytes = width * item
    if step < row_bytes:
        raise ImageEncodingError(
            f"step {step} is smaller than width x {item} = {row_bytes} for {encoding}"
        )
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size < step * height:
        raise ImageEncodingError(
            f"label data has {buffer.size} bytes, expected step x height = {step} x {height}"
            f" = {step * height}"
        )
    rows = buffer[: step * height].reshape(height, step)[:, :row_bytes]  # (H, W*item)
    if item == 1:
        return np.ascontiguousarray(rows)
    values = np.ascontiguousarray(rows).view(">u2" if is_bigendian else "<u2")  # (H, W)
    return np.where(values < IGNORE_LABEL, values, IGNORE_LABEL).astype(np.uint8)
