"""Helpers to drive the segmentation node from another process over real DDS.

Used by the integration tests and the overhead benchmark: :class:`NodeProcess` runs
``segmenter_node`` as its own process; :class:`GraphClient` is an rclpy node in the calling
process, with its own context and domain, spinning in a background thread, that publishes
images and records what comes back.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

#: The explicit opt-in for camera-sized images over best effort (see README, "Large
#: images"); the tests set it in both processes, the node never sets it itself.
LARGE_DATA_ENV = {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"}
LOCALHOST_ONLY_VARIABLES = ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY")


def pick_domain_id() -> int:
    """A ROS domain id for one test run (1..101), unlikely to collide with a parallel run.

    Fast DDS listens on port 7400 + 250 * domain + offset; from domain 102 on, those ports
    fall in Linux's ephemeral range (32768-60999), where any socket on the machine may
    already hold them, and discovery can then fail. ROS 2 advises 0..101 on Linux for this
    reason.
    """
    return random.Random(os.getpid() ^ time.time_ns()).randint(1, 101)


def ros_environment(domain_id: int, large_data: bool = True) -> dict[str, str]:
    """Environment for a node process: the domain, large-data transports (or Fast DDS's
    defaults with `large_data` false), the default discovery range."""
    env = dict(os.environ)
    env.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
    if large_data:
        env.update(LARGE_DATA_ENV)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    # Fast DDS's localhost-only discovery replaces the large-data transports (measured:
    # 0.9 MB best-effort images were then lost again), so tests keep the default range.
    for name in LOCALHOST_ONLY_VARIABLES:
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
    env["RCUTILS_COLORIZED_OUTPUT"] = "0"
    return env


class NodeProcess:
    """``segmenter_node`` in its own process, its output captured to a file."""

    def __init__(self, ros_args: list[str], *, domain_id: int, log_path: Path,
                 env: Optional[dict[str, str]] = None, large_data: bool = True) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        environment = ros_environment(domain_id, large_data)
        environment.update(env or {})
        self.command = [sys.executable, "-m", "tdnet_ros.ros.entry", "--ros-args", *ros_args]
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=environment
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_exit(self, timeout: float) -> Optional[int]:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, signum: int = signal.SIGINT, timeout: float = 5.0) -> tuple[Optional[int], float]:
        """Sends ``signum``; returns (exit code or None if still running, seconds to exit)."""
        start = time.monotonic()
        if self.alive():
            self.process.send_signal(signum)
        code = self.wait_exit(timeout)
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(5)
        self._log.close()


class Recorder:
    """Messages received on one subscription, with waiting helpers (thread-safe)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._condition = threading.Condition()

    def __call__(self, message: Any) -> None:
        with self._condition:
            self.messages.append(message)
            self._condition.notify_all()

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float) -> Optional[Any]:
        """The first message (old or new) satisfying ``predicate``, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._condition:
            while True:
                for message in self.messages[checked:]:
                    if predicate(message):
                        return message
                checked = len(self.messages)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._condition.wait(remaining)

    def wait_count(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._condition:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True


class GraphClient:
    """An rclpy node in this process (own context and domain), spun in a background thread."""

    def __init__(self, name: str, domain_id: int, large_data: bool = True) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        # Read by Fast DDS when this context creates its participant.
        if large_data:
            os.environ.update(LARGE_DATA_ENV)
        else:
            os.environ.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
        for variable in LOCALHOST_ONLY_VARIABLES:
            os.environ.pop(variable, None)
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id,
                   signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, Exception):
            pass

    def subscribe(self, message_type: Any, topic: str, qos: Any = 10) -> Recorder:
        recorder = Recorder()
        recorder.subscription = self.node.create_subscription(message_type, topic, recorder, qos)
        return recorder

    def unsubscribe(self, recorder: Recorder) -> None:
        self.node.destroy_subscription(recorder.subscription)

    def publisher(self, message_type: Any, topic: str, qos: Any) -> Any:
        return self.node.create_publisher(message_type, topic, qos)

    def wait_for_subscribers(self, publisher: Any, count: int = 1, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if publisher.get_subscription_count() >= count:
                return True
            time.sleep(0.05)
        return False

    def call(self, service_type: Any, name: str, request: Any, timeout: float = 10.0) -> Any:
        """Calls a service and returns its response (raises TimeoutError)."""
        client = self.node.create_client(service_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {name} not available after {timeout} s")
            future = client.call_async(request)
            deadline = time.monotonic() + timeout
            while not future.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service {name} did not answer within {timeout} s")
                time.sleep(0.01)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)


#: Seconds an attempt waits for the node's subscriptions before a fresh participant is tried.
DISCOVERY_ATTEMPT_S = 15.0


def connect(name: str, domain_id: int, node: NodeProcess, build: Callable[[GraphClient], list[Any]],
            timeout: float = 60.0) -> GraphClient:
    """A GraphClient whose endpoints `build(client)` created, once the node subscribes to
    every publisher `build` returned.

    Now and then two DDS participants on one host never discover each other, while a
    fresh participant does at once: an attempt not matched within DISCOVERY_ATTEMPT_S is
    closed and `build` runs again on a new client.

    Raises:
        TimeoutError: not matched within `timeout`, or the node exited (its log attached).
    """
    deadline = time.monotonic() + timeout
    while True:
        client = GraphClient(name, domain_id)
        publishers = build(client)
        attempt_end = min(deadline, time.monotonic() + DISCOVERY_ATTEMPT_S)
        while time.monotonic() < attempt_end and node.alive():
            if all(publisher.get_subscription_count() > 0 for publisher in publishers):
                return client
            time.sleep(0.05)
        client.close()
        if time.monotonic() >= deadline or not node.alive():
            state = "exited" if not node.alive() else f"did not subscribe within {timeout:.0f} s"
            raise TimeoutError(f"segmenter_node {state}:\n{node.log()[-3000:]}")


def assert_each_cannot_start(cases: dict[str, tuple[list[str], list[str]]], log_dir: Path,
                             timeout: float = 120.0) -> None:
    """Starts one node per case {name: (ROS arguments, expected fragments)}, all at once
    (most of each run is importing torch); each must exit 1 after exactly one
    `cannot start:` error line holding its fragments, and no traceback."""
    domain = pick_domain_id()
    processes = {
        name: NodeProcess(args, domain_id=domain, log_path=Path(log_dir) / f"{index}.log")
        for index, (name, (args, _)) in enumerate(cases.items())
    }
    try:
        for name, process in processes.items():
            code = process.wait_exit(timeout)
            log = process.log()
            assert code == 1, f"{name}: exit code {code}\n{log}"
            errors = [line for line in log.splitlines() if "[ERROR]" in line]
            assert len(errors) == 1 and "cannot start: " in errors[0], f"{name}: expected one error line\n{log}"
            for fragment in cases[name][1]:
                assert fragment in errors[0], f"{name}: '{fragment}' not in {errors[0]!r}"
            assert "Traceback" not in log and "weights_only" not in log, f"{name}\n{log}"
    finally:
        for process in processes.values():
            process.kill()


def make_image(rgb: np.ndarray, *, stamp_ns: int, frame_id: str, encoding: str = "rgb8",
               padding: int = 0) -> Any:
    """A ``sensor_msgs/Image`` of an rgb8 frame (other encodings: pack them yourself)."""
    import array

    from sensor_msgs.msg import Image

    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, width * 3)
    if padding:
        rows = np.concatenate([rows, np.zeros((height, padding), np.uint8)], axis=1)
    image = Image(height=height, width=width, encoding=encoding, step=rows.shape[1], is_bigendian=0)
    image.header.stamp.sec, image.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    image.header.frame_id = frame_id
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(rows).tobytes())
    image.data = data
    return image


def stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_tiny_checkpoint(path: Path, name: str = "td4-tiny", seed: int = 0, **overrides: Any) -> Path:
    """Saves a random-weights checkpoint of a named variant (fast on a CPU for tests).

    ``overrides`` replace fields of the variant's configuration (e.g. ``input_size``).
    """
    import torch

    from tdnet_ros import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(build_model(ModelConfig.from_name(name, **overrides)), path)
    return Path(path)


def diagnostics_values(status: Any) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}
