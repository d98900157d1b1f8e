"""Interoperability with a default-configured ROS 2 graph, measured with real processes.

The camera is `tdnet_ros.ros.dds_probe` in its own process (a default rclpy participant,
or one with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA), the node is `segmenter_node` in
another, with Fast DDS's default transports or the LARGE_DATA opt-in, started before or
after the camera. For each case: is the node discovered, and how many of the camera's
1280x720 frames come back as label images? `pytest -s` prints the table the README shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from tdnet_ros.ros.testing import NodeProcess, make_tiny_checkpoint, pick_domain_id, ros_environment  # noqa: E402

FRAMES = 10
TOPIC = "/probe/image_raw"
CAMERAS = {  # name: (reliability, large_data)
    "default, reliable": ("reliable", False),
    "default, best effort": ("best_effort", False),
    "LARGE_DATA, best effort": ("best_effort", True),
}
NODES = {"node default": False, "node LARGE_DATA": True}
ORDERS = ("node first", "camera first")
RESULTS: dict[tuple[str, str, str], dict] = {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dds") / "tiny.pt")


def _wait_ready(node: NodeProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while "ready:" not in node.log():
        assert node.alive() and time.monotonic() < deadline, node.log()[-3000:]
        time.sleep(0.1)


def run_case(checkpoint: Path, tmp: Path, camera: str, node_setting: str, order: str) -> dict:
    reliability, camera_large_data = CAMERAS[camera]
    domain = pick_domain_id()
    probe_command = [sys.executable, "-m", "tdnet_ros.ros.dds_probe", "--topic", TOPIC,
                     "--reliability", reliability, "--frames", str(FRAMES), "--size", "1280x720",
                     "--discovery-timeout", "15", "--labels-timeout", "8"]
    probe_env = ros_environment(domain, camera_large_data)

    def start_node() -> NodeProcess:
        return NodeProcess(
            ["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", f"cameras:=[{TOPIC}]",
             "-p", "use_cv_bridge:=false"],
            domain_id=domain, log_path=tmp / "node.log", large_data=NODES[node_setting],
        )

    node = probe = None
    try:
        if order == "node first":
            node = start_node()
            _wait_ready(node)
            probe = subprocess.Popen(probe_command, env=probe_env, stdout=subprocess.PIPE, text=True)
        else:
            probe = subprocess.Popen(probe_command, env=probe_env, stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)  # the camera's participant is up before the node starts
            node = start_node()
        out, _ = probe.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        result["node_log"] = node.log()
        return result
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
        if node is not None:
            node.stop()
            node.kill()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("node_setting", list(NODES))
@pytest.mark.parametrize("camera", list(CAMERAS))
def test_dds_matrix(checkpoint, tmp_path, camera, node_setting, order):
    result = run_case(checkpoint, tmp_path, camera, node_setting, order)
    RESULTS[camera, node_setting, order] = result
    log = result.pop("node_log")
    same_transports = CAMERAS[camera][1] == NODES[node_setting]
    if same_transports:
        # Interoperability first: with matching settings (the default included) the node is
        # discovered by the camera and discovers it.
        assert result["node_discovered"], (result, log[-3000:])
    if same_transports and CAMERAS[camera][0] == "reliable":
        # The node follows a reliable camera: camera-sized images arrive, in both start orders.
        assert result["labels_received"] >= FRAMES - 1, (result, log[-3000:])
    if same_transports and node_setting == "node LARGE_DATA":
        assert result["labels_received"] >= FRAMES - 1, (result, log[-3000:])
    if same_transports and order == "node first":
        # Subscribed best effort before any publisher existed; a reliable camera makes the
        # node resubscribe reliable, said once.
        switches = log.count("subscribing reliable instead of best_effort")
        assert switches == (1 if CAMERAS[camera][0] == "reliable" else 0), log[-3000:]
    assert "Traceback" not in log


def test_print_the_matrix():
    """The README table (run after the cases: `pytest -s test/test_dds_matrix.py`)."""
    if not RESULTS:
        pytest.skip("run with the matrix cases")
    lines = ["| camera | node | order | node discovered | labels for 1280x720 frames |", "| --- | --- | --- | --- | --- |"]
    for (camera, node_setting, order), r in sorted(RESULTS.items()):
        found = "yes" if r["node_discovered"] else "no"
        lines.append(f"| {camera} | {node_setting} | {order} | {found} | "
                     f"{r['labels_received']}/{FRAMES if r['node_discovered'] else '-'} |")
    print("\n" + "\n".join(lines))
    assert len(RESULTS) == len(CAMERAS) * len(NODES) * len(ORDERS)
