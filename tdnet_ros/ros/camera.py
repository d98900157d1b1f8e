"""One camera of the node: its subscription state over the ROS-free parts (newest-frame
slot, reset rule, statistics), its outputs, and its diagnostics status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.qos import ReliabilityPolicy

from tdnet_ros.frame_slot import FrameSlot
from tdnet_ros.reset_rule import ResetRule
from tdnet_ros.ros.outputs import CameraOutputs, FrameJob
from tdnet_ros.stream_stats import StreamStatistics, silence_message


def reliability_name(policy: Any) -> str:
    return "reliable" if policy == ReliabilityPolicy.RELIABLE else "best_effort"


def output_namespaces(topics: list[str], output_namespace: str) -> list[str]:
    """Where each camera's outputs go: ``<topic's namespace>/<output_namespace>``.

    ``/front/image_raw`` gives ``/front/segmentation``; a ``/compressed`` suffix is ignored.
    Cameras that would share a namespace get their topic's last name appended.
    """

    def without_transport(topic: str) -> str:
        return topic[: -len("/compressed")] if topic.endswith("/compressed") else topic

    first = [f"{without_transport(t).rsplit('/', 1)[0]}/{output_namespace}" for t in topics]
    return [f"{ns}/{without_transport(t).rsplit('/', 1)[1]}" if first.count(ns) > 1 else ns
            for t, ns in zip(topics, first)]


@dataclass
class Camera:
    """State of one camera. The executor thread puts frames into `slot`; the worker takes them."""

    topic: str
    output_namespace: str
    slot: FrameSlot[FrameJob] = field(default_factory=FrameSlot)
    reset_rule: ResetRule = field(default_factory=ResetRule)
    stats: StreamStatistics = field(default_factory=StreamStatistics)
    outputs: Optional[CameraOutputs] = None  # from configure to cleanup
    reset_service: Any = None
    subscription: Any = None  # while active
    reliability: str = ""  # of the current subscription: reliable | best_effort
    publisher_reliabilities: list[Any] = field(default_factory=list)  # last seen (qos_reliability auto)
    incompatible_policy: str = ""  # QoS policy a publisher was last found incompatible on

    @property
    def compressed(self) -> bool:
        return self.topic.endswith("/compressed")

    def offer(self, job: FrameJob) -> None:
        """Makes `job` the camera's pending frame; a frame still waiting is counted as dropped."""
        self.stats.received()
        if self.slot.put(job):
            self.stats.count("frames_dropped")


def camera_status(camera: Camera, *, node_name: str, segmenter: Any, config: Any, publishers: list[Any],
                  transports: str) -> DiagnosticStatus:
    """The camera's diagnostics: level and message (the most urgent problem), counters,
    rates, latency percentiles per stage, and the segmenter's device and memory."""
    snapshot = camera.stats.snapshot()
    counters = dict(snapshot.counters)
    counters.update({f"cache_resets_{kind}": count for kind, count in camera.reset_rule.counts.items()})
    counters["cache_resets_requested"] = camera.reset_rule.requested
    level, message = DiagnosticStatus.OK, "ok"
    if snapshot.silent_for_s > config.input_timeout_s:
        level = DiagnosticStatus.ERROR
        message = silence_message(
            camera.topic, silent_for=snapshot.silent_for_s, received=counters["frames_received"],
            lost=counters["frames_lost_in_transport"], publishers=len(publishers),
            publisher_kinds=sorted({reliability_name(i.qos_profile.reliability) for i in publishers}),
            subscribed=camera.reliability, incompatible_policy=camera.incompatible_policy, transports=transports,
        )
    elif (config.expected_rate_hz > 0 and camera.stats.running_for_s() > 5.0
          and snapshot.output_rate_hz < config.expected_rate_hz):
        level = DiagnosticStatus.WARN
        message = f"output rate {snapshot.output_rate_hz:.1f} Hz below expected_rate_hz {config.expected_rate_hz:.1f}"
    elif counters["frames_non_finite_output"]:
        level = DiagnosticStatus.ERROR
        message = (f"{counters['frames_non_finite_output']} frame(s) gave NaN/infinite model output "
                   "(not published): check the model's weights and input")
    elif snapshot.last_problem and counters["frames_invalid"] + counters["processing_errors"] > 0:
        level = DiagnosticStatus.WARN
        message = f"bad input: {snapshot.last_problem}"

    values = {
        "topic": camera.topic,
        "input_reliability": camera.reliability,
        "output_namespace": camera.output_namespace,
        "input_rate_hz": f"{snapshot.input_rate_hz:.2f}",
        "output_rate_hz": f"{snapshot.output_rate_hz:.2f}",
        **{key: str(value) for key, value in counters.items()},
        "reset_jump_limit_s": f"{camera.reset_rule.jump_limit_s():.3f}",
        **{f"rendered_{name}": str(snapshot.rendered.get(name, 0))
           for name in ("labels", "color", "overlay", "masks", "timing")},
    }
    for stage, quantiles in sorted(snapshot.latency_percentiles.items()):
        values.update({f"latency_ms/{stage}/{q}": f"{v:.3f}" for q, v in quantiles.items()})
    values.update(device=str(segmenter.device), precision=str(segmenter.precision), backend=str(segmenter.backend),
                  model_weights_mb=f"{segmenter.weights_bytes / 2**20:.1f}")
    if segmenter.device.type == "cuda":
        import torch

        values.update(
            gpu_memory_allocated_mb=f"{torch.cuda.memory_allocated(segmenter.device) / 2**20:.1f}",
            gpu_memory_reserved_mb=f"{torch.cuda.memory_reserved(segmenter.device) / 2**20:.1f}",
            gpu_memory_peak_mb=f"{torch.cuda.max_memory_allocated(segmenter.device) / 2**20:.1f}",
        )
    values["last_error"] = snapshot.last_problem
    return DiagnosticStatus(level=level, name=f"{node_name}: {camera.topic}", message=message,
                            hardware_id=str(segmenter.device),
                            values=[KeyValue(key=k, value=v) for k, v in values.items()])
