"""Launch ovseg_node for one camera, or for several cameras served by one node and one model.

    ros2 launch ovseg_ros ovseg.launch.py camera:=/camera/image_raw [namespace:=front] [preset:=naclip-vit-b16] \
        [depth:=/camera/aligned_depth_to_color/image_raw] [params_file:=/path/to/ovseg.yaml] [log_level:=info] \
        [autostart:=true] [use_fastdds_profile:=true]

    ros2 launch ovseg_ros ovseg.launch.py cameras:=front,rear \
        camera:=/front/color/image_raw,/rear/color/image_raw [namespace:=robot]

With `cameras`, camera i's topic is remapped to `<namespace>/<camera i>/image` and its outputs are
`<namespace>/<camera i>/labels`, `.../segmentation`, `.../overlay`; the vocabulary services, `label_info` and
`segment_prompt` (with its `camera` field) are the node's. Without, the outputs are `<namespace>/labels`, ...
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from ovseg_ros.core.cameras import parse_camera_names


def camera_remappings(cameras: str, topics: str, depths: str = "") -> tuple[list[str], list[tuple[str, str]]]:
    """Camera names and the topic remappings; names, image topics and (when given) depth topics pair up one to
    one. Each camera's `image` and `image/compressed` (image_transport's `<topic>/compressed`, for
    `input_type: compressed`) follow its image topic; `depth/image` and `depth/camera_info` follow its depth topic
    and the `camera_info` beside it (e.g. /camera/aligned_depth_to_color/image_raw and .../camera_info)."""
    names = [name for name in parse_camera_names(cameras) if name]  # the node's own rules, checked before start
    topic_list = [t.strip() for t in topics.split(",") if t.strip()]
    depth_list = [t.strip() for t in depths.split(",") if t.strip()]
    if not names:
        if len(topic_list) != 1:
            raise RuntimeError(f"camera must name one image topic without `cameras`, got {topics!r}")
    elif len(names) != len(topic_list):
        raise RuntimeError(f"cameras ({len(names)} names) and camera ({len(topic_list)} topics) must pair up one "
                           f"to one, e.g. cameras:=front,rear camera:=/front/image_raw,/rear/image_raw")
    if depth_list and len(depth_list) != len(topic_list):
        raise RuntimeError(f"depth must name one depth image topic per camera ({len(topic_list)}), got {depths!r}")
    remappings = []
    for index, topic in enumerate(topic_list):
        prefix = f"{names[index]}/" if names else ""
        remappings += [(f"{prefix}image", topic), (f"{prefix}image/compressed", f"{topic}/compressed")]
        if depth_list:
            info = depth_list[index].rsplit("/", 1)[0] + "/camera_info"
            remappings += [(f"{prefix}depth/image", depth_list[index]), (f"{prefix}depth/camera_info", info)]
    return names, remappings


def ovseg_node(context, *args, **kwargs) -> list:
    """Built once the arguments are known (the remappings depend on how many cameras there are)."""
    config = context.launch_configurations
    names, remappings = camera_remappings(config["cameras"], config["camera"], config["depth"])
    overrides = {"autostart": LaunchConfiguration("autostart")}
    if config["depth"]:
        overrides["use_depth"] = True
    if config["preset"]:  # over the params file's preset; parameters the file sets still win over the preset
        overrides["preset"] = config["preset"]
    if names:
        overrides["cameras"] = names
    return [Node(
        package="ovseg_ros",
        executable="ovseg_node",
        name="ovseg",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file"), overrides],
        remappings=remappings,
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("ovseg_ros")
    return LaunchDescription([
        DeclareLaunchArgument("camera", default_value="/camera/image_raw",
                              description="sensor_msgs/Image topic to segment; with `cameras`, one per camera, "
                                          "comma-separated, in the same order"),
        DeclareLaunchArgument("depth", default_value="",
                              description="aligned depth image topic (16UC1 mm or 32FC1 m, registered to the colour "
                                          "camera; its camera_info beside it), one per camera like `camera`; sets "
                                          "use_depth; empty = no depth"),
        DeclareLaunchArgument("cameras", default_value="",
                              description="comma-separated camera names served by one node (outputs under "
                                          "<namespace>/<name>/); empty = one camera"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its outputs"),
        DeclareLaunchArgument("preset", default_value="",
                              description="model + inference settings of a paper (naclip-vit-b16, sclip-vit-b16, "
                                          "clearclip-vit-b16, demo); empty = the params file's"),
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
        OpaqueFunction(function=ovseg_node),
    ])
