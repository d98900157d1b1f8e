"""segmenter_node as a lifecycle node, driven through its lifecycle services over real DDS
(what a lifecycle manager or `ros2 lifecycle set` does), in its own process: with
autostart false it waits unconfigured; configure loads the model and latches the class
map (ClassTable and vision_msgs/LabelInfo reach a late subscriber); activate serves
frames; deactivate stops serving and keeps the model; cleanup releases it; configure and
activate again serve again. Configure errors without autostart leave it unconfigured."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
lifecycle_msgs = pytest.importorskip("lifecycle_msgs")

from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from tdnet_ros.ros.interfaces import load_messages  # noqa: E402
from tdnet_ros.ros.testing import GraphClient, NodeProcess, make_image, make_tiny_checkpoint, pick_domain_id  # noqa: E402

NODE = "/segmenter_node"
TOPIC = "/life_cam/image"
LABELS = "/life_cam/segmentation/labels"
RELIABLE = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class Managed:
    def __init__(self, extra: list[str], tmp: Path) -> None:
        domain = pick_domain_id()
        self.node = NodeProcess(["-p", "autostart:=false", "-p", f"cameras:=['{TOPIC}']", "-p", "device:=cpu",
                                 *extra], domain_id=domain, log_path=tmp / "node.log")
        self.client = GraphClient("lifecycle_test", domain)

    def state(self) -> str:
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.client.call(GetState, f"{NODE}/get_state", GetState.Request(), timeout=5).current_state.label
            except TimeoutError:
                assert self.node.alive() and time.monotonic() < deadline, self.node.log()

    def change(self, transition: int) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition))
        return self.client.call(ChangeState, f"{NODE}/change_state", request, timeout=60).success

    def close(self) -> int | None:
        self.client.close()
        code, _ = self.node.stop()
        self.node.kill()
        return code


def labels_arrive(managed: Managed, publisher, recorder, seed: int, timeout: float) -> bool:
    """Sends frames until one comes back labelled (or `timeout`)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    deadline = time.monotonic() + timeout
    stamp = time.time_ns()
    while time.monotonic() < deadline:
        stamp += 100_000_000
        publisher.publish(make_image(rgb, stamp_ns=stamp, frame_id="cam"))
        if recorder.wait_for(lambda m: True, 0.5) is not None:
            return True
    return False


def test_lifecycle_transitions_over_the_services(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pt")
    managed = Managed(["-p", f"checkpoint:={checkpoint}"], tmp_path)
    msgs = load_messages()
    try:
        assert managed.state() == "unconfigured"
        assert "waiting for a lifecycle manager" in managed.node.log()
        assert "ready:" not in managed.node.log()

        assert managed.change(Transition.TRANSITION_CONFIGURE)
        assert managed.state() == "inactive"
        # A late subscriber gets the latched class map: the package's table and LabelInfo.
        table = managed.client.subscribe(msgs.ClassTable, "/life_cam/segmentation/class_table", LATCHED)
        message = table.wait_for(lambda m: True, 20)
        assert message is not None and message.checkpoint == str(checkpoint) and len(message.classes) == 19
        vision_msgs = pytest.importorskip("vision_msgs.msg")
        info = managed.client.subscribe(vision_msgs.LabelInfo, "/life_cam/segmentation/label_info", LATCHED)
        label_info = info.wait_for(lambda m: True, 20)
        assert label_info is not None
        assert [(c.class_id, c.class_name) for c in label_info.class_map] == [
            (c.id, c.name) for c in message.classes]
        assert label_info.class_map[0].class_name == "road"

        publisher = managed.client.publisher(Image, TOPIC, RELIABLE)
        labels = managed.client.subscribe(Image, LABELS, RELIABLE)
        assert not labels_arrive(managed, publisher, labels, 1, 3.0)  # inactive: not subscribed yet
        assert managed.client.node.count_subscribers(TOPIC) == 0

        assert managed.change(Transition.TRANSITION_ACTIVATE)
        assert managed.state() == "active"
        assert "ready:" in managed.node.log()
        assert labels_arrive(managed, publisher, labels, 2, 30.0), managed.node.log()

        assert managed.change(Transition.TRANSITION_DEACTIVATE)
        assert managed.state() == "inactive"
        assert managed.client.node.count_subscribers(TOPIC) == 0
        labels.messages.clear()
        assert not labels_arrive(managed, publisher, labels, 3, 2.0)

        assert managed.change(Transition.TRANSITION_CLEANUP)
        assert managed.state() == "unconfigured"
        assert "model released" in managed.node.log()

        # Configure again (the model loads again) and serve again.
        assert managed.change(Transition.TRANSITION_CONFIGURE)
        assert managed.change(Transition.TRANSITION_ACTIVATE)
        assert managed.state() == "active"
        assert labels_arrive(managed, publisher, labels, 4, 30.0), managed.node.log()
    finally:
        code = managed.close()
    assert code == 0, managed.node.log()
    assert "Traceback" not in managed.node.log()


def test_configure_error_without_autostart_stays_unconfigured(tmp_path: Path) -> None:
    managed = Managed(["-p", f"checkpoint:={tmp_path / 'missing.pt'}"], tmp_path)
    try:
        assert managed.state() == "unconfigured"
        assert not managed.change(Transition.TRANSITION_CONFIGURE)
        assert managed.state() == "unconfigured"
        errors = [line for line in managed.node.log().splitlines() if "configure failed:" in line]
        assert len(errors) == 1 and "parameter 'checkpoint'" in errors[0] and "missing.pt" in errors[0], errors
        assert managed.node.alive()
    finally:
        code = managed.close()
    assert code == 0
    assert "Traceback" not in managed.node.log()
