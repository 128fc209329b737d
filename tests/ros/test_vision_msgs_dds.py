"""Standard outputs over real DDS: a consumer that knows only vision_msgs types gets the class map, the tracked
objects' ids, labels, scores and boxes, and their 3D places, and they agree with the node's own `objects`.
The type hashes the node announces on the graph are upstream vision_msgs' (tests/unit/test_vision_msgs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from node_processes import start_node
from test_depth import info_msg, scene_with_depth, send
from vision_msgs.msg import Detection2DArray, Detection3DArray, LabelInfo

from ovseg_interfaces.msg import TrackedObjects
from ovseg_ros.runtime import wait_until

UPSTREAM_HASHES = json.loads((Path(__file__).parents[1] / "interfaces/vision_msgs/upstream_hashes.json")
                             .read_text())["hashes"]


@pytest.fixture(scope="module")
def vision_node(tmp_path_factory, ros):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    from ovseg_ros.client import OvsegClient
    from ovseg_ros.ros.messages import LATCHED_QOS

    proc = start_node(tmp_path_factory.mktemp("vision"), name="ovseg_v", namespace="vision_test",
                      params={"use_depth": True, "max_range_m": 5.0, "clip_model": "ovseg-demo-clip",
                              "depth_tolerance_s": 0.01, "track_min_hits": 2})
    client = OvsegClient("/vision_test", name="vision_client", extra_topics={"objects": TrackedObjects})
    client.subscribe("detections", Detection2DArray)
    client.subscribe("detections_3d", Detection3DArray)
    client.subscribe("vision_label_info", LabelInfo, qos=LATCHED_QOS)
    depth_pub = client.node.create_publisher(Image, "/vision_test/depth/image", qos_profile_sensor_data)
    info_pub = client.node.create_publisher(CameraInfo, "/vision_test/depth/camera_info", 10)
    try:
        assert client.wait_ready(120), proc.output()
        yield proc, client, depth_pub, info_pub
    finally:
        client.close()
        proc.stop()


def test_a_vision_msgs_consumer_gets_what_objects_says(vision_node):
    proc, client, depth_pub, info_pub = vision_node
    scene, depth = scene_with_depth(5)
    labels = ["grass", "water", "sky", "wall", "sand", *scene.instance_classes]
    answer = client.set_vocabulary(labels)
    assert answer.success, answer.message
    info = client.wait_for("vision_label_info", lambda m: [c.class_name for c in m.class_map] == labels, 30)
    assert info is not None, [list(m.class_map) for m in client.received["vision_label_info"]]
    assert [c.class_id for c in info.class_map] == list(range(len(labels)))
    info_pub.publish(info_msg())
    for sec in range(600, 604):  # the same view a few times: tracks are published from their second sighting
        assert send(client, depth_pub, scene.image, depth, sec), proc.output()[-2000:]
    sec = 603
    ours = client.wait_for("objects", lambda m: m.header.stamp.sec == sec and m.objects, 10)
    flat = client.wait_for("detections", lambda m: m.header.stamp.sec == sec, 10)
    spatial = client.wait_for("detections_3d", lambda m: m.header.stamp.sec == sec, 10)
    assert ours is not None and flat is not None and spatial is not None, proc.output()[-3000:]
    assert flat.header == ours.header
    assert [d.id for d in flat.detections] == [str(o.id) for o in ours.objects]
    for detection, obj in zip(flat.detections, ours.objects, strict=True):
        assert [r.hypothesis.class_id for r in detection.results] == list(obj.top_labels)
        assert [r.hypothesis.score for r in detection.results] == pytest.approx(list(obj.top_scores), abs=1e-6)
        x1, y1, x2, y2 = obj.box
        box = detection.bbox
        assert (box.center.position.x, box.center.position.y, box.size_x, box.size_y) == pytest.approx(
            ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), abs=1e-4)
    placed = [o for o in ours.objects if o.has_3d]
    assert placed and spatial.header.frame_id == placed[0].depth_frame_id
    assert [d.id for d in spatial.detections] == [str(o.id) for o in placed]
    for detection, obj in zip(spatial.detections, placed, strict=True):
        centre, size = detection.bbox.center.position, detection.bbox.size
        assert (centre.x, centre.y, centre.z) == pytest.approx((obj.centroid.x, obj.centroid.y, obj.centroid.z))
        assert (size.x, size.y, size.z) == pytest.approx((obj.extent.x, obj.extent.y, obj.extent.z))
        assert detection.results[0].hypothesis.class_id == obj.label
        assert 0.9 < centre.z < 3.1  # the scene's objects stand at 1.0-1.5 m, its background at 3 m
    # The graph announces upstream's type hashes: a node built against ros-<distro>-vision-msgs matches.
    for topic, kind in (("detections", "Detection2DArray"), ("detections_3d", "Detection3DArray"),
                        ("vision_label_info", "LabelInfo")):
        assert wait_until(lambda t=topic: client.node.get_publishers_info_by_topic(f"/vision_test/{t}"), 10)
        announced = client.node.get_publishers_info_by_topic(f"/vision_test/{topic}")[0]
        assert announced.topic_type == f"vision_msgs/msg/{kind}"
        assert str(announced.topic_type_hash) == UPSTREAM_HASHES[kind], announced.topic_type_hash
