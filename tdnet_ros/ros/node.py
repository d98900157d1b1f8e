"""The segmentation node: camera images in; labels, colours, overlay, masks, timing out.

A lifecycle node: `autostart` (default true) configures and activates it at start, so it
just runs; with `autostart:=false` a lifecycle manager (or `ros2 lifecycle set`) drives
configure (load the model), activate (warm up, subscribe), deactivate and cleanup.

One model serves every camera; each camera is its own stream of the segmenter (its own
feature cache). Subscription callbacks only store the newest message of their camera; a
single worker thread takes the newest pending frame of every camera and runs them through
the model together (cameras at the same sub-network step as one batch), so frames that
arrive while the model is busy replace the waiting one and are counted as dropped, never
queued.

Run it (console script `segmenter_node` = tdnet_ros.ros.entry, which installs the stop
handlers before importing this module):
    .venv/bin/segmenter_node --ros-args --params-file config/segmenter.yaml \
        -r image:=/camera/image_raw
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import fields
from typing import Any, Callable, Optional

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.event_handler import SubscriptionEventCallbacks, UnsupportedEventTypeError
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_policy_name_from_kind,
)
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from tdnet_ros.image_encoding import ImageLimits, decode_image
from tdnet_ros.masks import Renderer
from tdnet_ros.preprocess import check_frame
from tdnet_ros.reset_rule import ResetSettings
from tdnet_ros.runtime import scales_text
from tdnet_ros.ros.camera import Camera, camera_status, output_namespaces, reliability_name
from tdnet_ros.ros.interfaces import load_messages
from tdnet_ros.ros.outputs import CameraOutputs, FrameJob, OutputPublishers, PreparedFrame, destroy_publishers
from tdnet_ros.segmenter import LoadError, load_segmenter
from tdnet_ros.stream_stats import LOST_HINT
from tdnet_ros.ros.parameters import (
    NodeConfig,
    ParameterError,
    apply_parameters,
    declare_parameters,
    help_text,
    parameter_file_problem,
    parameter_file_warnings,
    runtime_config,
    unknown_parameter_warnings,
)

NODE_NAME = "segmenter_node"


def _integers_to_doubles(parameters: list[Parameter]) -> list[Parameter]:
    """Runtime changes: an integer for a double parameter (`ros2 param set ... overlay_alpha 1`)."""
    doubles = {f.name for f in fields(NodeConfig) if isinstance(f.default, float)}
    return [
        Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
        if p.name in doubles and p.type_ == Parameter.Type.INTEGER else p
        for p in parameters
    ]


class FatalError(RuntimeError):
    """The node cannot run with its configuration; the message says why."""


def _reliability(name: str) -> ReliabilityPolicy:
    return ReliabilityPolicy.RELIABLE if name == "reliable" else ReliabilityPolicy.BEST_EFFORT


#: Seconds between looks at each camera topic's publishers (qos_reliability auto).
FOLLOW_PUBLISHERS_PERIOD_S = 0.25


def matching_reliability(publisher_reliabilities: list[Any]) -> str:
    """The input reliability that serves every publisher seen, and large images best.

    A reliable subscription receives only from reliable publishers; a best-effort one from
    both, but over Fast DDS's default transports it loses camera-sized images that a
    reliable one gets (their fragments are resent). So: reliable when every publisher is
    reliable, best effort when any is best effort or none is seen yet (it matches the
    first publisher of either kind; the subscription is recreated once it is known).
    """
    if publisher_reliabilities and all(r == ReliabilityPolicy.RELIABLE for r in publisher_reliabilities):
        return "reliable"
    return "best_effort"


def resolve_cameras(node: Node, topics: list[str]) -> list[str]:
    """The cameras' fully resolved topic names (namespace and remapping applied).

    Raises:
        ParameterError: a name that does not resolve, or two entries naming one topic.
    """
    resolved = []
    for topic in topics:
        try:
            resolved.append(node.resolve_topic_name(topic))
        except Exception as error:  # rclpy raises RCLError / ValueError for invalid names
            reason = re.sub(r",? at /\S+:\d+", "", str(error)).strip()[:200]
            raise ParameterError(f"parameter 'cameras': '{topic}' is not a valid topic name ({reason})") from None
    for index, name in enumerate(resolved):
        if name in resolved[:index]:
            first = topics[resolved.index(name)]
            raise ParameterError(
                f"parameter 'cameras': '{first}' and '{topics[index]}' are the same topic {name}"
            )
    return resolved


def check_distinct_outputs(topics: list[str], namespaces: list[str]) -> None:
    """Refuses cameras that would publish to the same output topics."""
    for index, namespace in enumerate(namespaces):
        if namespace in namespaces[:index]:
            first = topics[namespaces.index(namespace)]
            raise ParameterError(
                f"parameter 'cameras': '{first}' and '{topics[index]}' would both publish to {namespace}/: "
                "give one of them another topic name"
            )


def load_class_table(path: str, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Reads a class table YAML (``classes: [{id, name, color}]``).

    Raises:
        FatalError: unreadable file, bad entries, or a class count other than the model's.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            content = yaml.safe_load(stream)
        entries = sorted(content["classes"], key=lambda entry: int(entry["id"]))
        names = [str(entry["name"]) for entry in entries]
        colors = np.array([[int(c) for c in entry["color"]] for entry in entries], np.int64)
        ids = [int(entry["id"]) for entry in entries]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, OverflowError) as error:
        raise FatalError(f"class table '{path}': cannot read it ({str(error)[:200]})") from None
    if ids != list(range(num_classes)):
        raise FatalError(
            f"class table '{path}': has ids {ids[:5]}... ({len(ids)} classes), the model "
            f"predicts ids 0..{num_classes - 1}"
        )
    if colors.shape != (num_classes, 3) or colors.min() < 0 or colors.max() > 255:
        raise FatalError(f"class table '{path}': colours must be [r, g, b] in 0..255")
    return names, colors.astype(np.uint8)


class RosLogHandler(logging.Handler):
    """Forwards the core's Python log records (backend fallbacks, graph captures, size
    changes) to the node's ROS logger, so that they reach /rosout and the console."""

    def __init__(self, logger: Any) -> None:
        super().__init__(logging.INFO)
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            self._logger.error(message)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(message)
        else:
            self._logger.info(message)


class SegmenterNode(LifecycleNode):
    """Runs the TDNet segmenter on one or more camera topics, as a managed (lifecycle) node.

    configure: parameters -> runtime configuration, load the model, create the outputs and
    publish the class map; activate: warm-up, then subscribe; deactivate: unsubscribe, keep
    the model; cleanup: release the model (and its GPU memory). With `autostart` (default)
    the node drives itself to active.

    Raises (from ``__init__``):
        ParameterError: a parameter value cannot work; nothing is left running.
    """

    def __init__(self, *, node_name: str = NODE_NAME, stop_requested: Optional[threading.Event] = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._stop_requested = stop_requested or threading.Event()
        given = list(getattr(self, "_parameter_overrides", {}))
        self.config = declare_parameters(self)
        for line in unknown_parameter_warnings(given) + parameter_file_warnings(sys.argv, self.get_fully_qualified_name()):
            self.get_logger().warning(line)
        self.add_pre_set_parameters_callback(_integers_to_doubles)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        core_log = logging.getLogger("tdnet_ros")
        core_log.setLevel(logging.INFO)
        core_log.propagate = False
        core_log.handlers = [RosLogHandler(self.get_logger())]
        self.msgs = load_messages()
        self.segmenter: Any = None
        self.cameras: list[Camera] = []
        self.transition_error = ""  # why the last configure or activate failed (autostart: exit 1)
        self._warmed_up = False
        self._batching = self.config.batch_cameras
        self._wakeup = threading.Condition()
        self._stopping = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._active_timers: list[Any] = []
        self._own_services: list[Any] = []
        self._diagnostics_publisher: Any = None
        self._limits = ImageLimits(self.config.max_image_pixels, self.config.min_image_size)
        self._convert = None  # cv_bridge's conversion where installed and wanted

    # --- lifecycle transitions ------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._attempt(self._configure, self._release, "configure failed")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._attempt(self._activate, self.stop_serving, "activate failed")

    def _attempt(self, work: Callable[[], None], undo: Callable[[], Any], failure: str) -> TransitionCallbackReturn:
        """Runs a transition's work; on failure undoes it and keeps the reason in
        `transition_error` (logged here without autostart; with it, run() says `cannot start`)."""
        self.transition_error = ""
        try:
            work()
            return TransitionCallbackReturn.SUCCESS
        except ShutdownRequested:  # a stop request during start-up: no error to report
            undo()
            return TransitionCallbackReturn.FAILURE
        except Exception as error:  # rclpy would turn it into ERROR and drop the reason
            undo()
            known = isinstance(error, (FatalError, ParameterError))
            self.transition_error = str(error) if known else f"{failure}: {error!r}"
            if not self.config.autostart:
                self.get_logger().error(f"{failure}: {error}" if known else self.transition_error)
            return TransitionCallbackReturn.FAILURE

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_serving()
        self.get_logger().info("inactive: subscriptions closed, model kept")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("unconfigured: model released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_serving()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_serving()
        self._release()
        return TransitionCallbackReturn.SUCCESS  # back to unconfigured

    # --- configure: the model and the outputs ---------------------------------------------

    def _configure(self) -> None:
        config = self.config
        self._check_stop()
        resolved = resolve_cameras(self, config.cameras)
        namespaces = output_namespaces(resolved, config.output_namespace)
        check_distinct_outputs(config.cameras, namespaces)
        try:
            self.segmenter = load_segmenter(runtime_config(config), config.checkpoint, config.model)
        except LoadError as error:
            raise FatalError(error.named(f"parameter '{error.setting}'")) from None
        self._check_stop()
        names = list(self.segmenter.class_names)
        colors = np.asarray(self.segmenter.class_colors, dtype=np.uint8)
        if config.class_table:
            names, colors = load_class_table(config.class_table, self.segmenter.num_classes)
        self._convert = self._cv_bridge_conversion() if config.use_cv_bridge else None
        self.get_logger().info(
            "image conversion: " + ("cv_bridge" if self._convert else "tdnet_ros.image_encoding (zero-copy)"))
        output_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=config.output_depth,
                                reliability=_reliability(config.output_reliability),
                                durability=DurabilityPolicy.VOLATILE)
        latched_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._batching = config.batch_cameras
        self._warmed_up = False
        self.cameras = []
        for topic, namespace in zip(resolved, namespaces):
            camera = Camera(topic, namespace)
            publishers = OutputPublishers.create(self.create_publisher, namespace, self.msgs, output_qos, latched_qos)
            camera.outputs = CameraOutputs(publishers, self.msgs, Renderer(colors, config.overlay_alpha), names,
                                           camera.stats)
            camera.outputs.publish_class_map(self.get_clock().now().to_msg(), model=self.segmenter.config.name,
                                             checkpoint=str(self.segmenter.checkpoint or ""))
            camera.reset_service = self.create_service(
                Trigger, f"{namespace}/reset", lambda request, response, c=camera: self._on_reset(response, [c]))
            self.cameras.append(camera)
        self._own_services.append(self.create_service(
            Trigger, "~/reset", lambda request, response: self._on_reset(response, self.cameras)))
        self._diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._apply_settings()
        self.get_logger().info(
            f"configured: {self.segmenter.num_classes} classes on {self.segmenter.device} "
            f"({self.segmenter.precision}, backend {self.segmenter.backend}), {len(self.cameras)} camera(s)")

    def _cv_bridge_conversion(self) -> Optional[Callable[[Any], np.ndarray]]:
        try:
            from cv_bridge import CvBridge
        except ImportError:
            return None
        bridge = CvBridge()
        return lambda msg: bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8")

    def _release(self) -> None:
        """Everything configure made: outputs, services, the model and its GPU memory."""
        for camera in self.cameras:
            if camera.outputs is not None:
                destroy_publishers(camera.outputs.publishers, self.destroy_publisher)
            if camera.reset_service is not None:
                self.destroy_service(camera.reset_service)
        for service in self._own_services:
            self.destroy_service(service)
        if self._diagnostics_publisher is not None:
            self.destroy_publisher(self._diagnostics_publisher)
        self._own_services, self._diagnostics_publisher, self.cameras = [], None, []
        if self.segmenter is not None:
            on_cuda = self.segmenter.device.type == "cuda"
            self.segmenter = None
            gc.collect()
            if on_cuda:
                import torch

                torch.cuda.empty_cache()

    # --- activate: warm-up, subscriptions, worker -------------------------------------------

    def _activate(self) -> None:
        if not self._warmed_up:
            self._warm_up([camera.topic for camera in self.cameras])
            self._warmed_up = True
        self._check_stop()
        self._stopping.clear()
        for camera in self.cameras:
            camera.slot.clear()
            reliability = self.config.qos_reliability
            if reliability == "auto":
                reliability = matching_reliability(self._publisher_reliabilities(camera.topic))
            self._subscribe(camera, reliability)
            following = " following its publishers" if self.config.qos_reliability == "auto" else ""
            self.get_logger().info(
                f"camera '{camera.topic}' ({'CompressedImage' if camera.compressed else 'Image'}, "
                f"{reliability}{following}) -> {camera.output_namespace}/"
                "{labels,color,overlay,masks,timing,class_table,label_info}")
        self._active_timers.append(self.create_timer(1.0, self._publish_diagnostics))
        if self.config.qos_reliability == "auto":
            self._active_timers.append(self.create_timer(FOLLOW_PUBLISHERS_PERIOD_S, self._follow_publishers))
        self._worker = threading.Thread(target=self._work, name="segmenter-worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"ready: segmenting with {self.segmenter.num_classes} classes on {self.segmenter.device} "
            f"({self.segmenter.precision}, backend {self.segmenter.backend}, preprocess "
            f"{self.segmenter.preprocess}, input {self._input_size_text()}, DDS transports "
            f"{os.environ.get('FASTDDS_BUILTIN_TRANSPORTS') or 'middleware default'})")

    def stop_serving(self, timeout: float = 1.0) -> bool:
        """Closes the subscriptions and timers and stops the worker; True when it ended in time."""
        for camera in self.cameras:
            if camera.subscription is not None:
                self.destroy_subscription(camera.subscription)
                camera.subscription = None
        for timer in self._active_timers:
            self.destroy_timer(timer)
        self._active_timers = []
        return self.stop(timeout)

    def _check_stop(self) -> None:
        """Start-up is abandoned between its steps once a stop is requested."""
        if self._stop_requested.is_set():
            raise ShutdownRequested()

    def _warm_up(self, topics: list[str]) -> None:
        """Captures/compiles/loads every step for every camera (and for all cameras as one
        batch) before any subscription exists, so that no frame waits for it."""
        if self.segmenter.input_size == "frame":
            self.get_logger().info("input_size is frame: each camera's steps are prepared at its first frame")
            return
        started = time.monotonic()
        self.segmenter.warm_up(streams=tuple(topics), batched=self._batching, should_stop=self._stop_requested.is_set)
        self._check_stop()
        self.get_logger().info(
            f"warm-up ({self.segmenter.backend}, {len(topics)} camera(s)) took {time.monotonic() - started:.2f} s")

    def _input_size_text(self) -> str:
        size = self.segmenter.input_size or self.segmenter.config.input_size
        text = size if isinstance(size, str) else f"{size[0]}x{size[1]}"
        scales = self.segmenter.scales
        return text if len(scales) == 1 else f"{text} at scales {scales_text(scales)}"

    def _publisher_reliabilities(self, topic: str) -> list[Any]:
        return [info.qos_profile.reliability for info in self.get_publishers_info_by_topic(topic)]

    def _subscribe(self, camera: Camera, reliability: str) -> None:
        """(Re)creates the camera's input subscription with ``reliability``."""
        if camera.subscription is not None:
            self.destroy_subscription(camera.subscription)
            camera.subscription = None
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=self.config.qos_depth,
            reliability=_reliability(reliability),
            durability=DurabilityPolicy.VOLATILE,  # matches volatile and transient-local publishers alike
        )
        events = SubscriptionEventCallbacks(
            incompatible_qos=lambda info, c=camera: self._on_incompatible_qos(c, info),
            message_lost=lambda info, c=camera: self._on_lost(c, info.total_count_change),
        )
        message_type = CompressedImage if camera.compressed else Image
        callback = lambda msg, c=camera: self._on_image(c, msg)  # noqa: E731
        # Raw images arrive serialized and are read without copying their pixels
        # (rclpy's deserialization copies them twice: most of the node's overhead).
        options = dict(event_callbacks=events, raw=not camera.compressed and self._convert is None)
        try:
            camera.subscription = self.create_subscription(message_type, camera.topic, callback, qos, **options)
        except UnsupportedEventTypeError:  # an RMW without message-lost events
            events.message_lost = None
            camera.subscription = self.create_subscription(message_type, camera.topic, callback, qos, **options)
        camera.reliability = reliability

    def _follow_publishers(self) -> None:
        """qos_reliability auto: resubscribes a camera whose publishers call for the other
        reliability (a publisher appeared, left or changed), with one log line per change.

        rclpy's BEST_AVAILABLE would resolve once, when the subscription is created, and
        then match neither a later best-effort publisher nor a later reliable one."""
        for camera in self.cameras:
            publishers = self._publisher_reliabilities(camera.topic)
            camera.publisher_reliabilities = publishers
            wanted = matching_reliability(publishers)
            if not publishers or wanted == camera.reliability or camera.subscription is None:
                continue  # no publisher left: keep what matched the last one
            kinds = sorted({reliability_name(r) for r in publishers})
            self.get_logger().info(
                f"topic '{camera.topic}': {len(publishers)} publisher(s) ({', '.join(kinds)}): "
                f"subscribing {wanted} instead of {camera.reliability}")
            camera.incompatible_policy = ""
            self._subscribe(camera, wanted)

    # --- callbacks (executor thread): never wait on the model ---------------------------

    def _on_image(self, camera: Camera, msg: Any) -> None:
        camera.offer(FrameJob(msg=msg, received_ns=time.monotonic_ns(), wall_received_ns=time.time_ns()))
        with self._wakeup:
            self._wakeup.notify()

    def _on_lost(self, camera: Camera, count: int) -> None:
        """Messages the middleware reports lost in transport (best effort)."""
        total = camera.stats.count("frames_lost_in_transport", int(count))
        self._report(camera, "lost", f"{count} message(s) lost in transport (total {total}): {LOST_HINT}")

    def _on_incompatible_qos(self, camera: Camera, info: Any) -> None:
        policy = qos_policy_name_from_kind(info.last_policy_kind)
        camera.incompatible_policy = policy
        if self.config.qos_reliability == "auto":
            return  # the next _follow_publishers resubscribes (not from inside this handler)
        self.get_logger().warning(
            f"topic '{camera.topic}': a publisher with incompatible QoS was found (policy "
            f"{policy}); it cannot deliver images to this node, which "
            f"subscribes {self.config.qos_reliability} with depth {self.config.qos_depth}. "
            "Match the publisher, e.g. set parameter qos_reliability to auto or best_effort.")

    def _on_reset(self, response: Any, cameras: list[Camera]) -> Any:
        for camera in cameras:
            camera.reset_rule.request()
        response.success = True
        response.message = "cache reset requested for " + ", ".join(c.topic for c in cameras)
        return response

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        reason = apply_parameters(self.config, parameters)
        if reason:
            self.get_logger().warning(f"parameter change refused: {reason}")
        else:
            self._apply_settings()
        return SetParametersResult(successful=reason is None, reason=reason or "")

    def _apply_settings(self) -> None:
        """The run-time-changeable parameters, handed to the parts that use them."""
        config = self.config
        settings = ResetSettings(period_factor=config.reset_period_factor, min_jump_s=config.reset_time_jump_s,
                                 max_jump_s=max(config.reset_time_jump_max_s, config.reset_time_jump_s))
        self._limits = ImageLimits(config.max_image_pixels, config.min_image_size)
        for camera in self.cameras:
            camera.reset_rule.settings = settings
            if camera.outputs is not None:
                camera.outputs.renderer.overlay_alpha = config.overlay_alpha

    def _publish_diagnostics(self) -> None:
        if self.segmenter is None or self._diagnostics_publisher is None:
            return
        message = DiagnosticArray()
        message.header.stamp = self.get_clock().now().to_msg()
        transports = os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", "")
        message.status = [
            camera_status(camera, node_name=self.get_name(), segmenter=self.segmenter, config=self.config,
                          publishers=self.get_publishers_info_by_topic(camera.topic), transports=transports)
            for camera in self.cameras
        ]
        self._diagnostics_publisher.publish(message)

    def _report(self, camera: Camera, kind: str, problem: str, counter: Optional[str] = None) -> None:
        """Counts a problem and logs it, at most once per error_log_period_s per kind."""
        text = camera.stats.problem(kind, problem, self.config.error_log_period_s, counter)
        if text is not None:
            self.get_logger().error(f"topic '{camera.topic}': {text}")

    # --- the worker thread ---------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            with self._wakeup:
                pending = [(camera, job) for camera in self.cameras if (job := camera.slot.take()) is not None]
                if not pending:
                    self._wakeup.wait(timeout=0.1)
                    continue
            self._process(pending)

    def _prepare(self, camera: Camera, job: FrameJob) -> Optional[PreparedFrame]:
        """Decodes a frame and applies a due cache reset. None, after counting it, for bad
        input and when nobody subscribes to any output."""
        start_ns = time.monotonic_ns()
        try:
            decoded = decode_image(job.msg, self._limits, self._convert)
            check_frame(decoded.rgb)  # what the segmenter will demand: refused here, alone
        except ValueError as error:  # ImageEncodingError, SerializedImageError
            # Throttled per kind of problem: the message up to its first number or quoted
            # string (those come from the sender: keying by them would let it flood the log).
            kind = "input:" + re.match(r"[^0-9'\"]{0,40}", str(error)).group(0)
            self._report(camera, kind, str(error), counter="frames_invalid")
            return None
        decoded_ns = time.monotonic_ns()
        wanted = camera.outputs.publishers.subscribed()
        if not any(wanted.values()):
            camera.stats.count("frames_skipped_no_subscribers")
            return None
        stamp_ns = decoded.sec * 1_000_000_000 + decoded.nanosec
        reason = camera.reset_rule.check(stamp_ns, decoded.rgb.shape[:2], decoded.frame_id)
        if reason:
            self.segmenter.reset(stream=camera.topic)
            camera.stats.count("cache_resets")
            self.get_logger().info(f"topic '{camera.topic}': feature cache reset ({reason})")
        header = Header(stamp=Time(sec=decoded.sec, nanosec=decoded.nanosec), frame_id=decoded.frame_id)
        return PreparedFrame(job, decoded.rgb, header, stamp_ns, wanted, start_ns, decoded_ns)

    def _process(self, pending: list[tuple[Camera, FrameJob]]) -> None:
        """Segments the pending frames, all cameras in one segmenter call when batching,
        and publishes each camera's outputs. No camera's failure stops another's output."""
        prepared = []
        for camera, job in pending:
            frame = self._guarded(camera, self._prepare, camera, job)
            if frame is not None:
                prepared.append((camera, frame))
        if self._batching and len(prepared) > 1:
            try:
                self._segment_and_publish(prepared)
                return
            except Exception as error:  # e.g. out of GPU memory for the batch
                if self._stopping.is_set():
                    return
                self._batching = False
                self.get_logger().error(
                    f"a batch of {len(prepared)} cameras failed ({error!r}): cameras run one by one from now on")
        for item in prepared:
            self._guarded(item[0], self._segment_and_publish, [item])

    def _segment_and_publish(self, prepared: list[tuple[Camera, PreparedFrame]]) -> None:
        results = self.segmenter.segment_batch({camera.topic: frame.rgb for camera, frame in prepared})
        segmented_ns = time.monotonic_ns()
        for camera, frame in prepared:
            result = results[camera.topic]
            if not result.finite:
                # Poisoned weights or activations: never publish such labels as a valid
                # segmentation; start the stream afresh so the cache does not carry it on.
                self.segmenter.reset(stream=camera.topic)
                camera.stats.count("frames_non_finite_output")
                self._report(camera, "non-finite", "the model's output for a frame holds NaN or infinity: "
                             "no labels published for it, feature cache reset")
                continue
            self._guarded(camera, camera.outputs.publish, frame, result, segmented_ns,
                          camera.stats.counter("frames_dropped"), camera.stats.counter("cache_resets"))

    def _guarded(self, camera: Camera, work: Callable[..., Any], *args: Any) -> Any:
        """work(*args) for one camera; an unexpected error is counted and logged for that camera only."""
        try:
            return work(*args)
        except Exception as error:  # keep serving the other cameras whatever happens
            if not self._stopping.is_set():
                self._report(camera, "processing", f"unexpected error: {error!r}", counter="processing_errors")
            return None

    def stop(self, timeout: float = 1.0) -> bool:
        """Stops the worker; True when it ended within ``timeout`` seconds."""
        self._stopping.set()
        with self._wakeup:
            self._wakeup.notify_all()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(timeout)
            return not worker.is_alive()
        return True


class ShutdownRequested(Exception):
    """SIGINT/SIGTERM arrived while the node was starting: it stops without serving."""


def run(args: Optional[list[str]], stop_requested: threading.Event) -> int:
    """Runs the node until ``stop_requested`` is set (SIGINT/SIGTERM, see entry.py): exit 0.

    Returns 1, after one error message, when the configuration cannot work.
    """
    # The executor is spun in short slices, so the process reacts to a stop request
    # within ~0.1 s even while the worker is in the middle of a frame.
    arguments = list(args if args is not None else sys.argv)
    own = arguments[1: arguments.index("--ros-args")] if "--ros-args" in arguments else arguments[1:]
    if "-h" in own or "--help" in own:
        print(help_text())
        return 0
    # Frames may be read-only views of the received buffer; the core only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    problem = parameter_file_problem(arguments)
    if problem:  # said here in one line: rcl would add its own lines and a traceback
        print(f"[ERROR] [{NODE_NAME}]: cannot start: {problem}", file=sys.stderr)
        return 1
    try:
        rclpy.init(args=arguments, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as error:  # RCLError: e.g. a missing or non-YAML --params-file
        reason = re.sub(r",? at /\S+:\d+", "", str(error)).strip()
        print(f"[ERROR] [{NODE_NAME}]: cannot start: {reason}", file=sys.stderr)
        return 1
    if stop_requested.is_set():
        return 0
    logger = rclpy.logging.get_logger(NODE_NAME)
    try:
        node = SegmenterNode(stop_requested=stop_requested)
    except ParameterError as error:
        logger.error(f"cannot start: {error}")
        rclpy.try_shutdown()
        return 1
    if node.config.autostart:
        started = node.trigger_configure() == TransitionCallbackReturn.SUCCESS and (
            node.trigger_activate() == TransitionCallbackReturn.SUCCESS)
        if not started:
            if node.transition_error and not stop_requested.is_set():
                logger.error(f"cannot start: {node.transition_error}")
            node.destroy_node()
            rclpy.try_shutdown()
            return 0 if stop_requested.is_set() else 1
    else:
        node.get_logger().info("autostart is false: unconfigured, waiting for a lifecycle manager")

    if os.environ.get("FASTDDS_BUILTIN_TRANSPORTS") and any(
            os.environ.get(name, "").upper() in ("LOCALHOST", "1")
            for name in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY")):
        # Measured with Fast DDS 3.2: localhost-only discovery replaces the large-data
        # transports, and camera-sized best-effort images are lost again.
        node.get_logger().warning(
            "ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST / ROS_LOCALHOST_ONLY=1 is set beside "
            "FASTDDS_BUILTIN_TRANSPORTS: with Fast DDS this replaces the chosen transports and "
            "camera-sized images over best effort may never arrive (see README, 'Large images')"
        )
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    clean = True
    try:
        while not stop_requested.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        clean = node.stop_serving(timeout=0.5)
        executor.shutdown(timeout_sec=0.2)
        node.destroy_node()
        rclpy.try_shutdown()
    if not clean:
        # The worker is inside a long model call: do not wait for it (the shutdown
        # deadline matters more than a frame nobody will receive).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
