"""segmenter_node's life cycle, as separate processes over real DDS: configuration errors
stop it with one clear error and exit code 1; SIGINT/SIGTERM stop it with exit code 0
within 2 s, idle or in the middle of a frame; with a reliable subscription it warns about
incompatible publishers, computes only the outputs somebody subscribes to, and refuses an
8000x8000 image without stopping.
"""

from __future__ import annotations

import array
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from tdnet_ros.ros.interfaces import load_messages  # noqa: E402
from tdnet_ros.ros.testing import (  # noqa: E402
    GraphClient,
    NodeProcess,
    assert_each_cannot_start,
    connect,
    diagnostics_values,
    make_image,
    make_tiny_checkpoint,
    pick_domain_id,
    stamp_ns,
)

msgs = load_messages()
RELIABLE = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def frame(seed: int, height: int = 480, width: int = 640) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- configuration errors ----------------------------------------------------------------


def test_configuration_errors_stop_the_node_with_one_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    wrong_architecture = tmp_path / "other.pkl"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, wrong_architecture)
    small_table = tmp_path / "classes.yaml"
    small_table.write_text("classes:\n  - {id: 0, name: road, color: [1, 2, 3]}\n")
    cases = {
        "missing checkpoint": (["-p", "checkpoint:=/nonexistent/model.pt"],
                               ["parameter 'checkpoint'", "/nonexistent/model.pt"]),
        "corrupt checkpoint": (["-p", f"checkpoint:={corrupt}"], ["parameter 'checkpoint'", str(corrupt)]),
        "other architecture": (["-p", f"checkpoint:={wrong_architecture}", "-p", "model:=td4-psp18"],
                               ["parameter 'checkpoint'", str(wrong_architecture)]),
        "unknown model": (["-p", f"checkpoint:={checkpoint}", "-p", "model:=td9-imaginary"],
                          ["parameter 'model'", "td9-imaginary"]),
        "model without checkpoint": (["-p", "model:=td4-psp18"],
                                     ["parameter 'model' is 'td4-psp18' but 'checkpoint' is empty"]),
        "bad reliability": (["-p", f"checkpoint:={checkpoint}", "-p", "qos_reliability:=sometimes"],
                            ["parameter 'qos_reliability': 'sometimes' is not one of auto, best_effort, reliable"]),
        "alpha out of range": (["-p", f"checkpoint:={checkpoint}", "-p", "overlay_alpha:=3.0"],
                               ["parameter 'overlay_alpha'"]),
        "bad device": (["-p", f"checkpoint:={checkpoint}", "-p", "device:=gpu0"],
                       ["parameter 'device': 'gpu0' is not auto, cpu, cuda or cuda:N"]),
        "bad backend": (["-p", f"checkpoint:={checkpoint}", "-p", "backend:=trt"],
                        ["parameter 'backend': 'trt' is not one of auto, eager, compile, cuda-graph, onnx, tensorrt"]),
        "bad input size": (["-p", f"checkpoint:={checkpoint}", "-p", "input_size:=720p"],
                           ["parameter 'input_size': '720p' is not empty, HEIGHTxWIDTH"]),
        "scales not from 1": (["-p", f"checkpoint:={checkpoint}", "-p", "scales:=[1.5]"],
                              ["parameter 'scales': scales must start with 1.0"]),
        "scales with prebuilt steps": (["-p", f"checkpoint:={checkpoint}", "-p", "backend:=onnx",
                                        "-p", "scales:=[1.0, 1.5]"],
                                       ["parameter 'scales': scales [1.0, 1.5] need the eager, compile or cuda-graph"]),
        "class table of another size": (
            ["-p", f"checkpoint:={checkpoint}", "-p", f"class_table:={small_table}"],
            [f"class table '{small_table}'", "0..18"]),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = (["-p", f"checkpoint:={checkpoint}", "-p", "device:=cuda"],
                                      ["parameter 'device' is 'cuda'", "CUDA is not available"])
    assert_each_cannot_start(cases, tmp_path)


def test_missing_engines_fall_back_with_one_warning_before_ready(checkpoint: Path, tmp_path: Path) -> None:
    node = NodeProcess(
        ["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "backend:=onnx",
         "-p", f"engine_dir:={tmp_path / 'engines'}", "-p", "input_size:=96x160",
         "-p", "cameras:=[/left/image,/right/image]"],
        domain_id=pick_domain_id(), log_path=tmp_path / "node.log",
    )
    try:
        deadline = time.monotonic() + 120
        while "ready:" not in node.log() and node.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = node.log()
        (ready,) = [line for line in log.splitlines() if "ready:" in line]
        assert "backend eager" in ready and "input 96x160" in ready and "preprocess cv2" in ready, ready
        warnings = [line for line in log.splitlines() if "[WARN]" in line]
        assert len(warnings) == 1, log
        assert "onnx backend unavailable at input 96x160, running eager" in warnings[0]
        assert "tdnet-build-engines --backend onnx" in warnings[0]
        # the warning came during the warm-up, before the node said it was ready
        assert log.index(warnings[0]) < log.index(ready)
        assert "warm-up (eager, 2 camera(s))" in log
        code, _ = node.stop()
        assert code == 0, log
    finally:
        node.kill()


def test_multi_scale_labels_arrive_as_the_core_computes_them(checkpoint: Path, tmp_path: Path) -> None:
    """`scales: [1, 2]` (an integer array in YAML, taken as doubles): the node runs each
    frame at both scales, says so when ready, and publishes the labels of the core's
    multi-scale segmenter."""
    from tdnet_ros.segmenter import Segmenter

    domain = pick_domain_id()
    node = NodeProcess(["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "scales:=[1, 2]",
                        "-p", "use_cv_bridge:=false"],
                       domain_id=domain, log_path=tmp_path / "node.log")
    reference = Segmenter.from_checkpoint(checkpoint, device="cpu", scales=(1.0, 2.0))
    received = {}

    def endpoints(client: GraphClient) -> list:
        received["labels"] = client.subscribe(Image, "segmentation/labels")
        received["publisher"] = client.publisher(Image, "image", qos_profile_sensor_data)
        return [received["publisher"]]

    try:
        client = connect("scales_client", domain, node, endpoints)
        try:
            (ready,) = [line for line in node.log().splitlines() if "ready:" in line]
            assert "input 128x256 at scales 1 2" in ready, ready
            stamp = time.time_ns()
            for index in range(3):
                rgb = frame(40 + index, 96, 200)
                stamp += 100_000_000
                expected = reference.segment(rgb).labels
                received["publisher"].publish(make_image(rgb, stamp_ns=stamp, frame_id="camera"))
                message = received["labels"].wait_for(lambda m: stamp_ns(m.header.stamp) == stamp, 30.0)
                assert message is not None, node.log()[-3000:]
                labels = np.frombuffer(bytes(message.data), np.uint8).reshape(96, message.step)[:, :200]
                np.testing.assert_array_equal(labels, expected)
        finally:
            client.close()
    finally:
        node.stop()
        node.kill()


# --- signals -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that takes seconds per frame on a CPU (to be caught mid-frame)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("slow") / "narrow.pt", "td4-r18-narrow",
                                input_size=(1537, 3073))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("mid_frame", [False, True], ids=["idle", "mid-frame"])
def test_signals_exit_cleanly_within_two_seconds(
    signum: int, mid_frame: bool, checkpoint: Path, slow_checkpoint: Path, tmp_path: Path
) -> None:
    domain = pick_domain_id()
    model = slow_checkpoint if mid_frame else checkpoint
    node = NodeProcess(["-p", f"checkpoint:={model}", "-p", "device:=cpu", "-r", "image:=/sig/image"],
                       domain_id=domain, log_path=tmp_path / "node.log")
    endpoints = {}

    def build(client: GraphClient) -> list:
        endpoints["timing"] = client.subscribe(msgs.SegmentationTiming, "/sig/segmentation/timing")
        endpoints["publisher"] = client.publisher(Image, "/sig/image", qos_profile_sensor_data)
        return [endpoints["publisher"]]

    client = None
    try:
        client = connect("signal_test", domain, node, build)
        publisher, timing = endpoints["publisher"], endpoints["timing"]
        time.sleep(0.5)
        if mid_frame:
            base = time.time_ns()
            publisher.publish(make_image(frame(0), stamp_ns=base, frame_id="sig"))
            first = timing.wait_for(lambda m: stamp_ns(m.header.stamp) == base, 60)
            assert first is not None, node.log()
            frame_seconds = first.segment_ms / 1e3
            assert frame_seconds > 0.3, f"model too fast ({frame_seconds:.2f} s) to catch mid-frame"
            publisher.publish(make_image(frame(1), stamp_ns=base + 10**8, frame_id="sig"))
            time.sleep(min(0.15, frame_seconds / 3))  # delivered, and the model is running
            assert len(timing.messages) == 1, "the second frame finished before the signal"
        code, seconds = node.stop(signum, timeout=10)
        assert code == 0, f"exit code {code}\n{node.log()}"
        assert seconds < 2.0, f"took {seconds:.2f} s to exit"
        assert "Traceback" not in node.log()
    finally:
        if client is not None:
            client.close()
        node.kill()
        node.kill()


# --- a node with a reliable subscription -------------------------------------------------------

TOPIC, OUT = "/rel_cam/image", "/rel_cam/segmentation"


class ReliableNode:
    def __init__(self, checkpoint: Path, tmp: Path) -> None:
        self.domain = pick_domain_id()
        self.node = NodeProcess(
            ["-p", f"checkpoint:={checkpoint}", "-p", "device:=auto", "-p", f"cameras:=[{TOPIC}]",
             "-p", "qos_reliability:=reliable", "-p", "qos_depth:=2"],
            domain_id=self.domain, log_path=tmp / "node.log",
        )
        try:
            self.client = connect("reliable_test", self.domain, self.node, self._endpoints)
        except BaseException:
            self.node.kill()  # a failed set-up leaves no node running
            raise
        self.stamp = time.time_ns()

    def _endpoints(self, client: GraphClient) -> list:
        self.publisher = client.publisher(Image, TOPIC, RELIABLE)
        self.diagnostics = client.subscribe(DiagnosticArray, "/diagnostics")
        return [self.publisher]

    def status(self) -> dict[str, str]:
        count = len(self.diagnostics.messages)
        assert self.diagnostics.wait_count(count + 1, 5.0), "no diagnostics"
        return diagnostics_values(self.diagnostics.messages[count].status[0])

    def send(self, image: np.ndarray | None = None, message: Image | None = None) -> int:
        self.stamp += 10**8
        if message is None:
            message = make_image(image, stamp_ns=self.stamp, frame_id="rel")
        message.header.stamp.sec, message.header.stamp.nanosec = divmod(self.stamp, 10**9)
        self.publisher.publish(message)
        return self.stamp


@pytest.fixture(scope="module")
def reliable(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    harness = ReliableNode(checkpoint, tmp_path_factory.mktemp("reliable"))
    yield harness
    harness.client.close()
    code, _ = harness.node.stop()
    harness.node.kill()
    assert code == 0


def test_device_auto_without_cuda_warns_and_runs_on_cpu(reliable: ReliableNode) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto picks it")
    log = reliable.node.log()
    warnings = [line for line in log.splitlines() if "CUDA is not available: running on the CPU" in line]
    assert len(warnings) == 1 and "[WARN]" in warnings[0], log
    assert reliable.status()["device"] == "cpu"


def test_incompatible_publisher_qos_is_reported(reliable: ReliableNode) -> None:
    best_effort = reliable.client.publisher(Image, TOPIC, qos_profile_sensor_data)
    deadline = time.monotonic() + 20
    expected = f"topic '{TOPIC}': a publisher with incompatible QoS was found (policy RELIABILITY"
    while expected not in reliable.node.log():
        assert time.monotonic() < deadline, reliable.node.log()
        time.sleep(0.2)
    line = next(line for line in reliable.node.log().splitlines() if expected in line)
    assert "[WARN]" in line and "qos_reliability" in line
    reliable.client.node.destroy_publisher(best_effort)


def test_outputs_nobody_subscribes_to_are_not_computed(reliable: ReliableNode) -> None:
    h = reliable
    labels = h.client.subscribe(Image, f"{OUT}/labels", RELIABLE)
    time.sleep(1.0)  # discovery of the new subscription
    before = h.status()
    for index in range(3):
        stamp = h.send(frame(index))
        assert labels.wait_for(lambda m: stamp_ns(m.header.stamp) == stamp, 20), h.node.log()
    after = h.status()
    rendered = {k: int(after[f"rendered_{k}"]) - int(before[f"rendered_{k}"])
                for k in ("labels", "color", "overlay", "masks", "timing")}
    assert rendered == {"labels": 3, "color": 0, "overlay": 0, "masks": 0, "timing": 0}

    h.client.unsubscribe(labels)
    time.sleep(1.5)
    before = h.status()
    for index in range(2):
        h.send(frame(10 + index))
        time.sleep(0.3)
    time.sleep(1.0)
    after = h.status()
    assert int(after["frames_skipped_no_subscribers"]) - int(before["frames_skipped_no_subscribers"]) == 2
    assert after["frames_processed"] == before["frames_processed"]


def test_8000x8000_image_is_refused_and_the_node_keeps_running(reliable: ReliableNode) -> None:
    h = reliable
    labels = h.client.subscribe(Image, f"{OUT}/labels", RELIABLE)
    time.sleep(1.0)
    before = h.status()
    huge = Image(height=8000, width=8000, encoding="mono8", step=8000)
    data = array.array("B")
    data.frombytes(bytes(8000 * 8000))
    huge.data = data
    h.send(message=huge)
    expected = f"topic '{TOPIC}': image 8000x8000 has 64000000 pixels, more than the limit 16777216"
    deadline = time.monotonic() + 30
    while expected not in h.node.log():
        assert time.monotonic() < deadline, h.node.log()
        time.sleep(0.2)
    assert h.node.alive()
    stamp = h.send(frame(20))
    assert labels.wait_for(lambda m: stamp_ns(m.header.stamp) == stamp, 20), "no output after the huge image"
    after = h.status()
    assert int(after["frames_invalid"]) - int(before["frames_invalid"]) == 1


def test_output_rate_below_expectation_is_a_warning(reliable: ReliableNode) -> None:
    from rcl_interfaces.msg import Parameter as ParameterMsg
    from rcl_interfaces.msg import ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    h = reliable

    def set_rate(rate: float) -> None:
        value = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=rate)
        request = SetParameters.Request(parameters=[ParameterMsg(name="expected_rate_hz", value=value)])
        result = h.client.call(SetParameters, "/segmenter_node/set_parameters", request).results[0]
        assert result.successful, result.reason

    labels = h.client.subscribe(Image, f"{OUT}/labels", RELIABLE)
    time.sleep(1.0)
    set_rate(50.0)
    try:
        for index in range(8):  # about 4 Hz, far below 50 Hz
            h.send(frame(30 + index))
            time.sleep(0.25)
        count = len(h.diagnostics.messages)
        assert h.diagnostics.wait_count(count + 1, 5.0)
        status = h.diagnostics.messages[count].status[0]
        assert status.level == DiagnosticStatus.WARN, status
        assert "below expected_rate_hz 50.0" in status.message
        assert labels.messages, "frames were not processed"
    finally:
        set_rate(0.0)
        h.client.unsubscribe(labels)


def test_a_camera_that_stopped_sending_is_told_apart_from_one_never_heard(reliable: ReliableNode) -> None:
    h = reliable
    time.sleep(2.5)  # > input_timeout_s (2 s) since the last image; our publisher stays
    count = len(h.diagnostics.messages)
    assert h.diagnostics.wait_count(count + 1, 5.0)
    status = h.diagnostics.messages[count].status[0]
    assert status.level == DiagnosticStatus.ERROR
    # Images arrived before: the camera stopped sending (not "never arrived").
    assert f"camera stopped sending: no images on {TOPIC} for" in status.message, status.message
    assert "received" in status.message and "publisher is gone" not in status.message
