"""The launch file and what it starts: executable, parameter file, rviz2 config, messages.

The launch file runs for real: the package is built by its ament_cmake build into a staged
prefix, and the real `launch`/`launch_ros` (installed into the venv from
../shared/ros-launch by scripts/install.sh) run it; the graph is probed over DDS.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "segment.launch.py"


def launch_constants() -> dict[str, str]:
    """Module-level string constants of the launch file (read without importing launch)."""
    tree = ast.parse(LAUNCH_FILE.read_text())
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    constants[target.id] = node.value.value
    return constants


def params_file() -> dict:
    content = yaml.safe_load((REPO / "config" / launch_constants()["PARAMS_FILE"]).read_text())
    return content["/**"]["ros__parameters"]


def test_launch_file_names_what_exists() -> None:
    constants = launch_constants()
    package_xml = (REPO / "package.xml").read_text()
    assert f"<name>{constants['PACKAGE']}</name>" in package_xml
    # The executable is a console script of the installed package, pointing at the node.
    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    entry = scripts.get(constants["EXECUTABLE"])
    assert entry is not None, f"no console script {constants['EXECUTABLE']} (pip install -e .)"
    assert entry.value == "tdnet_ros.ros.entry:main"
    assert callable(entry.load())
    # colcon (ament_cmake) installs the same executable where `ros2 run` looks for it.
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "DESTINATION lib/${PROJECT_NAME}" in cmake and constants["EXECUTABLE"] in cmake
    assert "install(DIRECTORY launch config DESTINATION share/${PROJECT_NAME})" in cmake
    assert (REPO / "config" / constants["PARAMS_FILE"]).is_file()
    assert (REPO / "config" / constants["RVIZ_FILE"]).is_file()
    text = LAUNCH_FILE.read_text()
    for argument in ("camera", "cameras", "params_file", "namespace", "autostart"):
        assert f'DeclareLaunchArgument("{argument}"' in text, argument
    assert "FASTDDS_BUILTIN_TRANSPORTS" in text


def test_rviz_config_shows_camera_overlay_and_labels() -> None:
    rviz = yaml.safe_load((REPO / "config" / launch_constants()["RVIZ_FILE"]).read_text())
    displays = rviz["Visualization Manager"]["Displays"]
    topics = {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}
    assert {"/image", "/segmentation/overlay", "/segmentation/color", "/segmentation/labels"} <= topics


def test_params_file_covers_the_node_parameters_with_valid_values() -> None:
    from dataclasses import fields

    pytest.importorskip("rclpy")
    from tdnet_ros.ros.parameters import NodeConfig, check_value

    values = params_file()
    assert set(values) == {f.name for f in fields(NodeConfig)}
    for name, value in values.items():
        assert check_value(name, value) is None, name
        default = getattr(NodeConfig(), name)
        assert value == default, f"{name}: file {value!r} != NodeConfig default {default!r}"


def test_class_table_is_cityscapes() -> None:
    table = yaml.safe_load((REPO / "config" / "cityscapes_classes.yaml").read_text())["classes"]
    assert [c["id"] for c in table] == list(range(19))
    assert [c["name"] for c in table][:3] == ["road", "sidewalk", "building"]
    assert table[13] == {"id": 13, "name": "car", "color": [0, 0, 142]}
    assert table[10]["color"] == [70, 130, 180]  # sky


def test_every_message_definition_is_built() -> None:
    pytest.importorskip("rclpy")
    from tdnet_ros.ros.interfaces import load_messages

    msgs = load_messages()
    cmake = (REPO / "CMakeLists.txt").read_text()
    for path in sorted((REPO / "msg").glob("*.msg")):
        assert f'"msg/{path.name}"' in cmake, f"{path.name} not in rosidl_generate_interfaces"
        message_type = getattr(msgs, path.stem)
        assert message_type.__name__ == path.stem
        fields_in_file = [
            line.split()[1] for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert list(message_type.get_fields_and_field_types()) == fields_in_file


def test_params_file_loads_into_the_node(tmp_path: Path) -> None:
    pytest.importorskip("rclpy")
    from rcl_interfaces.srv import GetParameters
    from rclpy.parameter import parameter_value_to_python

    from tdnet_ros.ros.testing import GraphClient, NodeProcess, make_tiny_checkpoint, pick_domain_id

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pt")
    domain = pick_domain_id()
    node = NodeProcess(
        ["--params-file", str(REPO / "config" / launch_constants()["PARAMS_FILE"]),
         "-p", f"checkpoint:={checkpoint}"],
        domain_id=domain, log_path=tmp_path / "node.log",
    )
    client = GraphClient("params_test", domain)
    try:
        expected = params_file()
        names = sorted(expected)
        deadline = time.monotonic() + 60
        while True:
            try:
                response = client.call(GetParameters, "/segmenter_node/get_parameters",
                                       GetParameters.Request(names=names), timeout=5)
                break
            except TimeoutError:
                assert node.alive() and time.monotonic() < deadline, node.log()
        loaded = {name: parameter_value_to_python(value) for name, value in zip(names, response.values)}
        expected["checkpoint"] = str(checkpoint)
        assert {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in loaded.items()} == expected
        # The default camera is the relative topic `image`, resolved in the node's namespace.
        assert re.search(r"camera '/image' \(Image, best_effort following its publishers\) -> /segmentation/", node.log())
    finally:
        client.close()
        code, _ = node.stop()
        node.kill()
    assert code == 0


# The driver runs launch.LaunchService on its own main thread (launch demands it), in its
# own process, until SIGINT; the test probes the graph over DDS meanwhile. A process
# started from a background job inherits SIGINT ignored (POSIX shells do that), and launch
# then never sees the test's SIGINT: the driver restores Python's default first, as an
# interactive `ros2 launch` has it.
LAUNCH_DRIVER = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from launch import LaunchDescription, LaunchService
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
arguments = dict(a.split(":=", 1) for a in sys.argv[2:])
service = LaunchService()
service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
    PythonLaunchDescriptionSource(sys.argv[1]), launch_arguments=arguments.items())]))
sys.exit(service.run())
"""


class Launch:
    """`launch/segment.launch.py` (from the staged install) running in a driver process."""

    def __init__(self, staged: "StagedInstall", arguments: dict[str, str], domain: int, log: Path) -> None:
        self.log_path = log
        self.domain = domain
        self.client = None
        env = staged.environment()
        env.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
        env.update(ROS_DOMAIN_ID=str(domain), PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
        self._log = open(log, "wb")
        command = [sys.executable, "-c", LAUNCH_DRIVER, str(staged.launch_file)]
        command += [f"{k}:={v}" for k, v in arguments.items()]
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log()[-4000:]
            time.sleep(0.2)

    def connect(self, name: str, large_data: bool):
        """A DDS participant in the launch's domain (closed by `close`)."""
        from tdnet_ros.ros.testing import GraphClient

        self.client = GraphClient(name, self.domain, large_data=large_data)
        return self.client

    def close(self) -> int | None:
        """Closes the client, stops the launch with SIGINT; its exit code (None: it hung)."""
        if self.client is not None:
            self.client.close()
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(20)
        except subprocess.TimeoutExpired:
            code = None
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        return code


def _wait_topics(client, topics: set[str], timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        listed = dict(client.node.get_topic_names_and_types())
        if topics <= set(listed) or time.monotonic() > deadline:
            return listed
        time.sleep(0.2)


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None,
                    reason="launch_ros is not installed (bash ../shared/ros-launch/install.sh .venv)")
def test_launch_file_runs_with_remap_namespace_and_stops_cleanly(staged: "StagedInstall", tmp_path: Path) -> None:
    from tdnet_ros.ros.testing import make_tiny_checkpoint, pick_domain_id

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pt")
    domain = pick_domain_id()
    launch = Launch(staged, {"camera": "/launch_cam/image", "checkpoint": str(checkpoint), "device": "cpu",
                             "namespace": "launch_test", "rviz": "false"}, domain, tmp_path / "launch.log")
    try:
        launch.wait_for_line("ready:")
        assert "DDS transports middleware default" in launch.log()  # nothing set behind the user's back
        # A default-configured participant sees the node, its remapped input and its outputs.
        client = launch.connect("launch_test_client", large_data=False)
        topics = _wait_topics(client, {"/launch_cam/image", "/launch_cam/segmentation/labels"})
        assert "/launch_cam/image" in topics and "/launch_cam/segmentation/labels" in topics, sorted(topics)
        deadline = time.monotonic() + 30
        while ("segmenter_node", "/launch_test") not in client.node.get_node_names_and_namespaces():
            assert time.monotonic() < deadline, client.node.get_node_names_and_namespaces()
            time.sleep(0.2)
        assert client.node.count_subscribers("/launch_cam/image") == 1
        assert lifecycle_state(client, "/launch_test/segmenter_node") == "active"
        assert "rviz2" not in launch.log()  # rviz:=false starts no rviz2
    finally:
        code = launch.close()
    assert code == 0, launch.log()[-4000:]
    log = launch.log()
    assert re.search(r"\[segmenter_node-1\]: process has finished cleanly", log), log[-4000:]
    assert "Traceback" not in log


def lifecycle_state(client, node: str) -> str:
    from lifecycle_msgs.srv import GetState

    return client.call(GetState, f"{node}/get_state", GetState.Request(), timeout=20).current_state.label


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None,
                    reason="launch_ros is not installed (bash ../shared/ros-launch/install.sh .venv)")
def test_launch_without_autostart_leaves_the_node_to_a_lifecycle_manager(staged: "StagedInstall",
                                                                         tmp_path: Path) -> None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    from tdnet_ros.ros.testing import make_tiny_checkpoint, pick_domain_id

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pt")
    domain = pick_domain_id()
    launch = Launch(staged, {"checkpoint": str(checkpoint), "device": "cpu", "autostart": "false"}, domain,
                    tmp_path / "launch.log")
    try:
        launch.wait_for_line("waiting for a lifecycle manager")
        client = launch.connect("launch_lifecycle_client", large_data=False)
        assert lifecycle_state(client, "/segmenter_node") == "unconfigured"
        for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            request = ChangeState.Request(transition=Transition(id=transition))
            assert client.call(ChangeState, "/segmenter_node/change_state", request, timeout=60).success
        assert lifecycle_state(client, "/segmenter_node") == "active"
        assert "ready:" in launch.log()
    finally:
        code = launch.close()
    assert code == 0, launch.log()[-4000:]
    assert "Traceback" not in launch.log()


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None,
                    reason="launch_ros is not installed (bash ../shared/ros-launch/install.sh .venv)")
def test_launch_keeps_the_parameter_files_values_unless_arguments_are_given(
        staged: "StagedInstall", tmp_path: Path) -> None:
    from rclpy.qos import DurabilityPolicy, QoSProfile

    from tdnet_ros.ros.interfaces import load_messages
    from tdnet_ros.ros.testing import make_tiny_checkpoint, pick_domain_id

    checkpoint = make_tiny_checkpoint(tmp_path / "mine.pt", seed=3)
    user_file = tmp_path / "my_robot.yaml"
    user_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": {
        "checkpoint": str(checkpoint), "device": "cpu", "cameras": ["/yaml_a/image", "/yaml_b/image"]}}}))
    domain = pick_domain_id()
    launch = Launch(staged, {"params_file": str(user_file), "large_data": "true"}, domain, tmp_path / "launch.log")
    try:
        launch.wait_for_line("ready:")
        assert "DDS transports LARGE_DATA" in launch.log()  # large_data:=true reached the node
        client = launch.connect("launch_yaml_client", large_data=True)
        wanted = {"/yaml_a/segmentation/labels", "/yaml_b/segmentation/labels"}
        topics = _wait_topics(client, wanted)
        assert wanted <= set(topics), sorted(topics)
        assert "/segmentation/labels" not in topics  # not the launch file's default camera
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        table = client.subscribe(load_messages().ClassTable, "/yaml_a/segmentation/class_table", latched)
        message = table.wait_for(lambda m: True, 30)
        assert message is not None and message.checkpoint == str(checkpoint)  # the file's, not the bundled model
    finally:
        code = launch.close()
    assert code == 0, launch.log()[-4000:]


class StagedInstall:
    """The package built by its ament_cmake build (what `colcon build` runs) into a staged
    prefix inside a temporary folder; the venv itself is not touched."""

    def __init__(self, tmp: Path) -> None:
        self.prefix = Path(sys.prefix)  # the venv: also where the ROS wheels' CMake packages are
        self.env = dict(os.environ, AMENT_PREFIX_PATH=str(self.prefix), CMAKE_PREFIX_PATH=str(self.prefix),
                        PATH=f"{self.prefix / 'bin'}{os.pathsep}{os.environ['PATH']}")
        build, self.stage = tmp / "build", tmp / "stage"
        for command in (
            ["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={self.prefix}",
             f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF", "-Wno-dev"],
            ["cmake", "--build", str(build), "-j", "2"],
            ["cmake", "--install", str(build)],
        ):
            # DESTDIR stages the install in tmp: the venv itself is not touched.
            result = subprocess.run(command, env={**self.env, "DESTDIR": str(self.stage)},
                                    capture_output=True, text=True)
            assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        self.root = self.stage / self.prefix.relative_to(self.prefix.anchor)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        self.site = self.root / "lib" / version / "site-packages"
        self.launch_file = self.root / "share" / launch_constants()["PACKAGE"] / "launch" / LAUNCH_FILE.name

    def environment(self) -> dict[str, str]:
        """As a sourced ROS install's setup would: the staged prefix first on the ament index
        (then the venv's ROS packages), its Python packages first, the venv's bin/ on PATH."""
        return {**self.env, "AMENT_PREFIX_PATH": f"{self.root}{os.pathsep}{self.prefix}",
                "PYTHONPATH": str(self.site)}


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> StagedInstall:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    return StagedInstall(tmp_path_factory.mktemp("ament"))


def test_ament_cmake_build_installs_what_ros2_run_and_launch_need(staged: StagedInstall, tmp_path: Path) -> None:
    """The colcon (ament_cmake) build, run here with plain CMake against the venv's ROS
    prefix: executable, launch, config, and the Python package merged with its messages."""
    root = staged.root
    constants = launch_constants()
    executable = root / "lib" / constants["PACKAGE"] / constants["EXECUTABLE"]
    assert executable.is_file() and os.access(executable, os.X_OK)
    share = root / "share" / constants["PACKAGE"]
    assert (share / "launch" / LAUNCH_FILE.name).is_file()
    assert (share / "config" / constants["PARAMS_FILE"]).is_file()
    assert (share / "config" / constants["RVIZ_FILE"]).is_file()
    assert (root / "share" / "ament_index" / "resource_index" / "packages" / constants["PACKAGE"]).is_file()
    site = staged.site
    package = site / constants["PACKAGE"]
    assert (package / "ros" / "node.py").is_file() and (package / "msg" / "_class_masks.py").is_file()
    # The package's own __init__ wins over the generated (empty) one.
    assert (package / "__init__.py").read_text() == (REPO / "tdnet_ros" / "__init__.py").read_text()
    probe = subprocess.run(
        [sys.executable, "-c", "import tdnet_ros.msg, tdnet_ros.ros.node; print(tdnet_ros.msg.__file__)"],
        env={**staged.env, "PYTHONPATH": str(site)}, capture_output=True, text=True, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(package))
