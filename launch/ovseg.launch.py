"""Launch ovseg_node for one camera.

    ros2 launch ovseg_ros ovseg.launch.py camera:=/camera/image_raw [namespace:=front] \
        [params_file:=/path/to/ovseg.yaml] [log_level:=info] [autostart:=true] [use_fastdds_profile:=true]

One node per camera: give each camera its own namespace (outputs then live under /<namespace>/...).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("ovseg_ros")
    return LaunchDescription([
        DeclareLaunchArgument("camera", default_value="/camera/image_raw",
                              description="sensor_msgs/Image topic to segment"),
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
        Node(
            package="ovseg_ros",
            executable="ovseg_node",
            name="ovseg",
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), {"autostart": LaunchConfiguration("autostart")}],
            remappings=[("image", LaunchConfiguration("camera"))],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
            output="screen",
            emulate_tty=True,
        ),
    ])
