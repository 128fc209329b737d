"""Launch one ovseg_node that serves several cameras with one model (frames batched through the image tower).

    ros2 launch ovseg_ros ovseg_cameras.launch.py cameras:=front,rear \
        camera_topics:=/front/color/image_raw,/rear/color/image_raw [namespace:=robot] \
        [params_file:=/path/to/ovseg.yaml] [log_level:=info] [autostart:=true] [use_fastdds_profile:=true]

Camera i's image topic is remapped to `<namespace>/<camera i>/image`; its outputs are
`<namespace>/<camera i>/labels`, `.../segmentation`, `.../overlay` (and the 3D topics with use_depth). The
vocabulary services, `label_info` and `segment_prompt` (with its `camera` field) are the node's.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def camera_node(context, *args, **kwargs) -> list:
    """Built when the arguments are known: one remapping per camera, checked to pair names with topics."""
    config = context.launch_configurations
    names = [n.strip().strip("/") for n in config["cameras"].split(",") if n.strip()]
    topics = [t.strip() for t in config["camera_topics"].split(",") if t.strip()]
    if not names or len(names) != len(topics):
        raise RuntimeError(f"cameras ({len(names)} names) and camera_topics ({len(topics)} topics) must pair up "
                           f"one to one, e.g. cameras:=front,rear camera_topics:=/front/image_raw,/rear/image_raw")
    return [Node(
        package="ovseg_ros",
        executable="ovseg_node",
        name="ovseg",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file"), {"autostart": LaunchConfiguration("autostart"),
                                                         "cameras": names}],
        remappings=[(f"{name}/image", topic) for name, topic in zip(names, topics, strict=True)],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("ovseg_ros")
    return LaunchDescription([
        DeclareLaunchArgument("cameras", default_value="front,rear",
                              description="comma-separated camera names (output namespaces under the node's)"),
        DeclareLaunchArgument("camera_topics", default_value="/front/image_raw,/rear/image_raw",
                              description="comma-separated sensor_msgs/Image topics, one per camera, same order"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its outputs"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "ovseg.yaml"),
                              description="ROS 2 parameters file for ovseg_node"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="true: configure+activate at start; false: wait for lifecycle transitions"),
        DeclareLaunchArgument("use_fastdds_profile", default_value="true",
                              description="load config/fastdds.xml (16 MiB shared-memory segments for images)"),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", os.path.join(share, "config", "fastdds.xml"),
                               condition=IfCondition(LaunchConfiguration("use_fastdds_profile"))),
        SetEnvironmentVariable("HF_HUB_OFFLINE", "1"),
        OpaqueFunction(function=camera_node),
    ])
