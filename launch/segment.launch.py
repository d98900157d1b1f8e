"""Starts tdnet_ros's segmentation node (and optionally rviz2) on a ROS 2 install.

    ros2 launch tdnet_ros segment.launch.py camera:=/camera/image_raw
    ros2 launch tdnet_ros segment.launch.py cameras:="['/front/image_raw', '/rear/image_raw']" \
        checkpoint:=/path/to/td4-psp18.pkl model:=td4-psp18 device:=cuda namespace:=perception
    ros2 launch tdnet_ros segment.launch.py params_file:=my_robot.yaml   # the file's values stay
    ros2 launch tdnet_ros segment.launch.py autostart:=false   # a lifecycle manager drives it

Everything here is also possible without launch (this repository's tests do that):
    segmenter_node --ros-args --params-file config/segmenter.yaml -r image:=/camera/image_raw

The launch arguments checkpoint, model, device and cameras override the parameter file
only when they are given: a parameter file that names its own checkpoint and cameras keeps
them when they are not.

The node is a lifecycle node. With autostart true (the parameter file's default) it
configures and activates itself. autostart:=false starts it as a launch_ros LifecycleNode, which waits unconfigured
for a lifecycle manager (nav2_lifecycle_manager, `ros2 lifecycle set /segmenter_node
configure`, or launch's own ChangeState events).

Transports: nothing here changes the middleware's settings unless asked. large_data:=true
sets FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA for everything this launch starts; the camera
driver must then use it too (export it in its shell, or start it from this launch), or
the two do not discover each other.
"""

import os
from typing import List

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

PACKAGE = "tdnet_ros"
EXECUTABLE = "segmenter_node"
PARAMS_FILE = "segmenter.yaml"
RVIZ_FILE = "segmentation.rviz"
#: Launch arguments that override the parameter of the same name when given (not "").
OVERRIDES = ("checkpoint", "model", "device", "cameras")  # and autostart (a boolean)


def _segmenter(context, *_args, **_kwargs) -> List[Node]:
    given = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    overrides = {name: value for name, value in given.items() if value != ""}
    if "cameras" in overrides:
        import yaml

        overrides["cameras"] = [str(topic) for topic in yaml.safe_load(overrides["cameras"])]
    autostart = LaunchConfiguration("autostart").perform(context).lower()
    if autostart != "":
        overrides["autostart"] = autostart in ("true", "1", "yes")
    parameters = [LaunchConfiguration("params_file").perform(context)]
    if overrides:
        parameters.append(overrides)  # later entries win over the file
    # A node left to a lifecycle manager is announced to launch as one (its lifecycle
    # events can then be handled in launch files).
    action = LifecycleNode if overrides.get("autostart") is False else Node
    return [action(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=EXECUTABLE,
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=parameters,
        remappings=[("image", LaunchConfiguration("camera"))],
    )]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    arguments = [
        DeclareLaunchArgument("camera", default_value="image",
                              description="Camera image topic (the node's `image` input)."),
        DeclareLaunchArgument("cameras", default_value="",
                              description="Camera topics, e.g. \"['/a/image', '/b/image']\" (an entry `image` "
                                          "follows `camera`); empty = the parameter file's."),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", PARAMS_FILE),
                              description="Node parameter file."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node."),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="Checkpoint file; empty = the parameter file's (there: empty = the "
                                          "bundled default model)."),
        DeclareLaunchArgument("model", default_value="",
                              description="Model name, for published .pkl checkpoints; empty = the parameter file's."),
        DeclareLaunchArgument("device", default_value="",
                              description="auto, cpu, cuda or cuda:N; empty = the parameter file's."),
        DeclareLaunchArgument("rviz", default_value="false", description="Also start rviz2 with the package's config."),
        DeclareLaunchArgument("autostart", default_value="",
                              description="true: the node configures and activates itself; false: it waits "
                                          "unconfigured for a lifecycle manager; empty = the parameter file's "
                                          "(there: true)."),
        DeclareLaunchArgument("large_data", default_value="false",
                              description="Set FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA for everything this launch "
                                          "starts (the camera needs the same setting)."),
    ]
    large_data = SetEnvironmentVariable("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA",
                                        condition=IfCondition(LaunchConfiguration("large_data")))
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", os.path.join(share, "config", RVIZ_FILE)],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription([*arguments, large_data, OpaqueFunction(function=_segmenter), rviz])
