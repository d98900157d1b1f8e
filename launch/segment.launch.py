"""Starts tdnet_ros's segmentation node (and optionally rviz2) on a ROS 2 install.

    ros2 launch tdnet_ros segment.launch.py camera:=/camera/image_raw
    ros2 launch tdnet_ros segment.launch.py cameras:="['/front/image_raw', '/rear/image_raw']" \
        checkpoint:=/path/to/td4-psp18.pkl model:=td4-psp18 device:=cuda namespace:=perception

Everything here is also possible without launch (this repository's tests do that):
    segmenter_node --ros-args --params-file config/segmenter.yaml -r image:=/camera/image_raw

Fast DDS drops camera-sized images over best-effort QoS with its default transports; the
node sets FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA for itself when unset, and this file does
the same for everything it starts. The camera driver's process needs it too (export it in
the shell that starts the driver, or run the driver from a launch file that sets it).
"""

import os
from typing import List

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

PACKAGE = "tdnet_ros"
EXECUTABLE = "segmenter_node"
PARAMS_FILE = "segmenter.yaml"
RVIZ_FILE = "segmentation.rviz"


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    arguments = [
        DeclareLaunchArgument("camera", default_value="image",
                              description="Camera image topic (the node's `image` input)."),
        DeclareLaunchArgument("cameras", default_value="['image']",
                              description="Camera topics, e.g. \"['/a/image', '/b/image']\" (an entry `image` follows `camera`)."),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", PARAMS_FILE),
                              description="Node parameter file."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node."),
        DeclareLaunchArgument("checkpoint", default_value="", description="Checkpoint file; empty = bundled default model."),
        DeclareLaunchArgument("model", default_value="", description="Model name, for published .pkl checkpoints."),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda or cuda:N."),
        DeclareLaunchArgument("rviz", default_value="false", description="Also start rviz2 with the package's config."),
    ]
    segmenter = Node(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=EXECUTABLE,
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                # Launch arguments win over the parameter file.
                "checkpoint": ParameterValue(LaunchConfiguration("checkpoint"), value_type=str),
                "model": ParameterValue(LaunchConfiguration("model"), value_type=str),
                "device": ParameterValue(LaunchConfiguration("device"), value_type=str),
                "cameras": ParameterValue(LaunchConfiguration("cameras"), value_type=List[str]),
            },
        ],
        remappings=[("image", LaunchConfiguration("camera"))],
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", os.path.join(share, "config", RVIZ_FILE)],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    transports = SetEnvironmentVariable(
        "FASTDDS_BUILTIN_TRANSPORTS", os.environ.get("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
    )
    return LaunchDescription([transports, *arguments, segmenter, rviz])
