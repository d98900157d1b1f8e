"""The launch file and what it starts: executable, parameter file, rviz2 config, messages.

`launch`/`launch_ros` are not installable from PyPI, so the launch file itself runs only
where they import (a ROS 2 install with this package built); everywhere else these tests
check what it names exists and that its parameter file loads into the real node.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
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
    assert entry.value == "tdnet_ros.ros.node:main"
    assert callable(entry.load())
    # colcon (ament_cmake) installs the same executable where `ros2 run` looks for it.
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "DESTINATION lib/${PROJECT_NAME}" in cmake and constants["EXECUTABLE"] in cmake
    assert "install(DIRECTORY launch config DESTINATION share/${PROJECT_NAME})" in cmake
    assert (REPO / "config" / constants["PARAMS_FILE"]).is_file()
    assert (REPO / "config" / constants["RVIZ_FILE"]).is_file()
    text = LAUNCH_FILE.read_text()
    for argument in ("camera", "cameras", "params_file", "namespace"):
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
        assert re.search(r"camera '/image' \(Image, best_effort\) -> /segmentation/", node.log())
    finally:
        client.close()
        code, _ = node.stop()
        node.kill()
    assert code == 0


@pytest.mark.skipif(
    importlib.util.find_spec("launch_ros") is None, reason="launch_ros is not installed (no ROS 2 install)"
)
def test_launch_file_starts_the_node(tmp_path: Path) -> None:
    import threading

    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    from tdnet_ros.ros.testing import GraphClient, make_tiny_checkpoint, pick_domain_id

    try:
        get_package_share_directory("tdnet_ros")
    except PackageNotFoundError:
        pytest.skip("tdnet_ros is not built into the ament index (colcon build)")
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny.pt")
    domain = pick_domain_id()
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    service = LaunchService()
    service.include_launch_description(LaunchDescription([
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(LAUNCH_FILE)),
            launch_arguments={"camera": "/launch_cam/image", "checkpoint": str(checkpoint),
                              "device": "cpu", "namespace": "launch_test"}.items(),
        )
    ]))
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    client = GraphClient("launch_test_client", domain)
    try:
        deadline = time.monotonic() + 60
        while ("segmenter_node", "/launch_test") not in client.node.get_node_names_and_namespaces():
            assert time.monotonic() < deadline, "the launch file did not start segmenter_node"
            time.sleep(0.2)
        topics = dict(client.node.get_topic_names_and_types())
        assert "/launch_cam/image" in topics
        assert "/launch_cam/segmentation/labels" in topics
    finally:
        client.close()
        service.shutdown()  # thread-safe: schedules the shutdown on the launch loop
        runner.join(10)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_ament_cmake_build_installs_what_ros2_run_and_launch_need(tmp_path: Path) -> None:
    """The colcon (ament_cmake) build, run here with plain CMake against the venv's ROS
    prefix: executable, launch, config, and the Python package merged with its messages."""
    prefix = Path(sys.prefix)  # the venv: also where the ROS wheels' CMake packages are
    env = dict(os.environ, AMENT_PREFIX_PATH=str(prefix), CMAKE_PREFIX_PATH=str(prefix),
               PATH=f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}")
    build, stage = tmp_path / "build", tmp_path / "stage"
    for command in (
        ["cmake", "-S", str(REPO), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={prefix}",
         f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF", "-Wno-dev"],
        ["cmake", "--build", str(build), "-j", "2"],
        ["cmake", "--install", str(build)],
    ):
        # DESTDIR stages the install in tmp_path: the venv itself is not touched.
        result = subprocess.run(command, env={**env, "DESTDIR": str(stage)},
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    root = stage / prefix.relative_to(prefix.anchor)
    constants = launch_constants()
    executable = root / "lib" / constants["PACKAGE"] / constants["EXECUTABLE"]
    assert executable.is_file() and os.access(executable, os.X_OK)
    share = root / "share" / constants["PACKAGE"]
    assert (share / "launch" / LAUNCH_FILE.name).is_file()
    assert (share / "config" / constants["PARAMS_FILE"]).is_file()
    assert (share / "config" / constants["RVIZ_FILE"]).is_file()
    assert (root / "share" / "ament_index" / "resource_index" / "packages" / constants["PACKAGE"]).is_file()
    site = root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    package = site / constants["PACKAGE"]
    assert (package / "ros" / "node.py").is_file() and (package / "msg" / "_class_masks.py").is_file()
    # The package's own __init__ wins over the generated (empty) one.
    assert (package / "__init__.py").read_text() == (REPO / "tdnet_ros" / "__init__.py").read_text()
    probe = subprocess.run(
        [sys.executable, "-c", "import tdnet_ros.msg, tdnet_ros.ros.node; print(tdnet_ros.msg.__file__)"],
        env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(package))
