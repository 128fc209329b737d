"""launch/ovseg.launch.py as ros2 launch would run it (launch/launch_ros are not installable here).

The launch file is loaded with small stand-ins for the launch classes that only record what it declares; the
node command line launch_ros would build from those declarations is then started for real, and the running ROS
graph is checked through rclpy. The rviz config is checked to name topics the node publishes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import yaml

from ovseg_ros.core.cameras import CameraNameError
from ovseg_ros.runtime import Process, wait_until

ROOT = Path(__file__).resolve().parents[2]


class Recorded:
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    pass


def stand_in_modules() -> dict[str, types.ModuleType]:
    modules = {}
    for name in ("launch", "launch.actions", "launch.conditions", "launch.substitutions", "launch_ros",
                 "launch_ros.actions", "ament_index_python", "ament_index_python.packages"):
        modules[name] = types.ModuleType(name)
    modules["launch"].LaunchDescription = type("LaunchDescription", (Recorded,), {})
    for action in ("DeclareLaunchArgument", "SetEnvironmentVariable", "OpaqueFunction"):
        setattr(modules["launch.actions"], action, type(action, (Recorded,), {}))
    modules["launch.conditions"].IfCondition = type("IfCondition", (Recorded,), {})
    modules["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    modules["launch_ros.actions"].Node = type("Node", (Recorded,), {})
    modules["ament_index_python.packages"].get_package_share_directory = lambda package: str(ROOT)
    return modules


def load_launch_description():
    saved = {name: sys.modules.get(name) for name in stand_in_modules()}
    sys.modules.update(stand_in_modules())
    try:
        spec = importlib.util.spec_from_file_location("ovseg_launch", ROOT / "launch" / "ovseg.launch.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.generate_launch_description()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def resolve(value, arguments: dict[str, str]):
    if isinstance(value, LaunchConfiguration):
        return arguments[value.args[0]]
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v, arguments) for v in value)
    return value


def command_line(node, arguments: dict[str, str]) -> list[str]:
    """What launch_ros builds for a Node action: the executable, then --ros-args with name, namespace, params
    file, remaps and the extra arguments."""
    kw = node.kwargs
    executable = Path(sys.executable).parent / kw["executable"]  # lib/ovseg_ros/<exe> on a robot
    cmd = [str(executable)]
    extra = [resolve(a, arguments) for a in kw.get("arguments", [])]
    cmd += ["--ros-args", "-r", f"__node:={kw['name']}"]
    namespace = resolve(kw.get("namespace", ""), arguments)
    if namespace:
        cmd += ["-r", f"__ns:={namespace if namespace.startswith('/') else '/' + namespace}"]
    for entry in kw.get("parameters", []):
        if isinstance(entry, dict):  # launch_ros passes dict entries as parameter overrides
            for key, value in entry.items():
                cmd += ["-p", f"{key}:={resolve(value, arguments)}"]
        else:
            cmd += ["--params-file", resolve(entry, arguments)]
    for old, new in kw.get("remappings", []):
        cmd += ["-r", f"{old}:={resolve(new, arguments)}"]
    return cmd + [a for a in extra if a != "--ros-args"]


def declared_node(entities, arguments: dict[str, str]):
    """Run the launch file's OpaqueFunction as launch does once the arguments are known: the Node it returns."""
    function = next(e for e in entities if type(e).__name__ == "OpaqueFunction").kwargs["function"]
    (node,) = function(types.SimpleNamespace(launch_configurations=arguments))
    return node


def test_launch_file_declares_what_the_readme_says():
    description = load_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    assert set(declared) == {"camera", "cameras", "depth", "namespace", "preset", "params_file", "log_level",
                             "autostart", "use_fastdds_profile"}
    assert declared["preset"] == ""  # the params file's preset unless the argument names one
    assert declared["camera"] == "/camera/image_raw" and declared["cameras"] == ""
    assert Path(declared["params_file"]).is_file()
    env = {e.args[0]: e.args[1] for e in entities if type(e).__name__ == "SetEnvironmentVariable"}
    assert Path(env["FASTDDS_DEFAULT_PROFILES_FILE"]).is_file() and env["HF_HUB_OFFLINE"] == "1"
    node = declared_node(entities, declared)
    assert node.kwargs["package"] == "ovseg_ros" and node.kwargs["executable"] == "ovseg_node"
    assert node.kwargs["remappings"] == [("image", "/camera/image_raw"),
                                         ("image/compressed", "/camera/image_raw/compressed")]
    assert "use_depth" not in node.kwargs["parameters"][1]
    # With depth (an RGB-D camera): its image and the camera_info beside it, and use_depth on.
    rgbd = declared_node(entities, {**declared, "cameras": "front,rear",
                                    "camera": "/f/color/image_raw,/r/color/image_raw",
                                    "depth": "/f/aligned_depth_to_color/image_raw,/r/depth/image_rect_raw"})
    assert rgbd.kwargs["parameters"][1]["use_depth"] is True
    assert rgbd.kwargs["remappings"] == [
        ("front/image", "/f/color/image_raw"), ("front/image/compressed", "/f/color/image_raw/compressed"),
        ("front/depth/image", "/f/aligned_depth_to_color/image_raw"),
        ("front/depth/camera_info", "/f/aligned_depth_to_color/camera_info"),
        ("rear/image", "/r/color/image_raw"), ("rear/image/compressed", "/r/color/image_raw/compressed"),
        ("rear/depth/image", "/r/depth/image_rect_raw"), ("rear/depth/camera_info", "/r/depth/camera_info")]
    for bad in ({"camera": "/a,/b"}, {"cameras": "front,rear", "camera": "/only/one"},
                {"depth": "/d1,/d2"}):
        try:  # a camera without a topic (or the reverse) is refused before anything starts
            declared_node(entities, {**declared, **bad})
            raise AssertionError(f"accepted {bad}")
        except RuntimeError as exc:
            assert "camera" in str(exc)
    try:  # camera names follow the node's own rules (ovseg_ros.cameras), checked before anything starts
        declared_node(entities, {**declared, "cameras": "front,front", "camera": "/a,/b"})
        raise AssertionError("accepted a repeated camera name")
    except CameraNameError as exc:
        assert "unique" in str(exc)
    assert "preset" not in node.kwargs["parameters"][1]
    with_preset = declared_node(entities, {**declared, "preset": "clearclip-vit-b16"})
    assert with_preset.kwargs["parameters"][1]["preset"] == "clearclip-vit-b16"
    params = yaml.safe_load(Path(declared["params_file"]).read_text())["/**"]["ros__parameters"]
    # A robot gets the best official preset and an everyday vocabulary, not the synthetic world's demo.
    assert params["image_qos"] == "sensor_data" and params["preset"] == "naclip-vit-b16"
    assert "clip_model" not in params and "dense_variant" not in params  # the preset decides; overrides optional
    assert "person" in params["vocabulary"] and "red circle" not in params["vocabulary"]


def launched_graph(tmp_path: Path, overrides: dict[str, str], namespace: str) -> tuple[dict, dict, dict]:
    """Start the node exactly as the launch file declares it for these arguments (with a quick-to-load variant of
    the shipped params file: same keys, the random-init model, no SAM); its subscriptions, publications and
    services once it is ready, then stop it with SIGINT as launch does."""
    import rclpy

    entities = load_launch_description().args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    params = yaml.safe_load(Path(declared["params_file"]).read_text())
    params["/**"]["ros__parameters"].update(clip_model="ovseg-demo-vit", sam_model="", device="cpu", precision="fp32",
                                            backend="torch")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    arguments = {**declared, "params_file": str(params_file), "namespace": namespace, **overrides}
    node = declared_node(entities, arguments)
    env = dict(os.environ)
    env.update({e.args[0]: e.args[1] for e in entities if type(e).__name__ == "SetEnvironmentVariable"})
    proc = Process(command_line(node, arguments), env, tmp_path / "launched.log")
    probe = rclpy.create_node(f"launch_probe_{namespace}")
    ns = f"/{namespace}"
    try:
        def graph_ready() -> bool:  # node and services first; topics once configure has loaded the models
            if ("ovseg", ns) not in probe.get_node_names_and_namespaces():
                return False
            return f"{ns}/label_info" in dict(probe.get_publisher_names_and_types_by_node("ovseg", ns))

        assert wait_until(graph_ready, 60, interval=0.2), proc.output()
        time.sleep(0.5)
        return (dict(probe.get_subscriber_names_and_types_by_node("ovseg", ns)),
                dict(probe.get_publisher_names_and_types_by_node("ovseg", ns)),
                dict(probe.get_service_names_and_types_by_node("ovseg", ns)))
    finally:
        probe.destroy_node()
        assert proc.stop() == 0, proc.output()


def test_the_declared_command_line_runs_and_builds_the_expected_graph(tmp_path, ros):
    subs, pubs, services = launched_graph(tmp_path, {"camera": "/front_camera/color/image_raw",
                                                     "depth": "/front_camera/aligned_depth/image_raw"}, "front")
    assert subs["/front_camera/color/image_raw"] == ["sensor_msgs/msg/Image"]
    assert subs["/front_camera/aligned_depth/image_raw"] == ["sensor_msgs/msg/Image"]
    assert subs["/front_camera/aligned_depth/camera_info"] == ["sensor_msgs/msg/CameraInfo"]
    assert pubs["/front/labels_cloud"] == ["sensor_msgs/msg/PointCloud2"]
    for topic, kind in (("/front/labels", "sensor_msgs/msg/Image"), ("/front/overlay", "sensor_msgs/msg/Image"),
                        ("/front/segmentation", "ovseg_interfaces/msg/Segmentation"),
                        ("/front/label_info", "ovseg_interfaces/msg/LabelInfo"),
                        ("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray")):
        assert pubs.get(topic) == [kind], (topic, pubs)
    assert services["/front/set_vocabulary"] == ["ovseg_interfaces/srv/SetVocabulary"]
    assert services["/front/get_vocabulary"] == ["ovseg_interfaces/srv/GetVocabulary"]


def test_the_multi_camera_launch_serves_every_camera_from_one_node(tmp_path, ros):
    """`cameras:=front,rear camera:=A,B`: the one node declared subscribes to every camera's topic and publishes
    per-camera outputs."""
    subs, pubs, _ = launched_graph(tmp_path, {"cameras": "front, rear",
                                              "camera": "/front_cam/image_raw,/rear_cam/image_raw"}, "robot")
    for camera in ("front", "rear"):
        assert subs[f"/{camera}_cam/image_raw"] == ["sensor_msgs/msg/Image"]
        assert pubs[f"/robot/{camera}/labels"] == ["sensor_msgs/msg/Image"]
        assert pubs[f"/robot/{camera}/segmentation"] == ["ovseg_interfaces/msg/Segmentation"]
    assert pubs["/robot/label_info"] == ["ovseg_interfaces/msg/LabelInfo"]
    assert "/robot/labels" not in pubs  # no unnamed camera beside the named ones


def test_the_robot_config_without_official_weights_refuses_with_the_fetch_command(tmp_path):
    """The shipped config as a robot user starts it before fetching: one FATAL line naming the model, where it
    looked and the command that fetches it; exit code 1, nothing left running."""
    entities = load_launch_description().args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    arguments = {**declared, "namespace": "robot_fresh"}
    env = dict(os.environ, OVSEG_MODELS_DIR=str(tmp_path / "empty_models"))
    env.update({e.args[0]: e.args[1] for e in entities if type(e).__name__ == "SetEnvironmentVariable"})
    proc = Process(command_line(declared_node(entities, arguments), arguments), env, tmp_path / "fresh.log")
    assert wait_until(lambda: not proc.alive(), 60), proc.output()
    assert proc.stop() == 1
    fatal = [line for line in proc.output().splitlines() if "FATAL" in line]
    assert len(fatal) == 1, proc.output()
    for words in ("clip-vit-b16-openai", str(tmp_path / "empty_models"),
                  "ros2 run ovseg_ros ovseg-models fetch clip-vit-b16-openai"):
        assert words in fatal[0], fatal[0]
    assert "Traceback" not in proc.output()


def test_rviz_config_shows_topics_the_node_publishes():
    config = yaml.safe_load((ROOT / "config" / "ovseg.rviz").read_text())
    displays = config["Visualization Manager"]["Displays"]
    topics = {d["Topic"]["Value"] for d in displays if "Topic" in d}
    assert topics == {"/overlay", "/labels", "/labels_cloud", "/labels_markers", "/objects_markers"}
    classes = {d["Topic"]["Value"]: d["Class"] for d in displays}
    assert classes["/labels_cloud"].endswith("PointCloud2") and classes["/labels_markers"].endswith("MarkerArray")
    assert classes["/objects_markers"].endswith("MarkerArray")
    assert all(d["Class"].startswith("rviz_default_plugins/") for d in displays)
