"""Labelled 3D output from a synthetic depth map with known geometry: cloud, markers, warnings, 3D prompts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from geometry_msgs.msg import Point
from node_processes import TEST_SAM, start_node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from ovseg_ros.core.geometry import CLOUD_DTYPE
from ovseg_ros.ros.image_conversions import as_uint8_buffer, image_to_array, rgb_to_image, to_byte_array
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene

H, W = 240, 320
FX = FY = 300.0
CX, CY = 160.0, 120.0


def scene_with_depth(seed: int):
    """Background plane at 3 m, object i at 1.0 + 0.25 i m, a stripe of invalid depth, a patch beyond range."""
    scene = generate_scene(seed, size=(H, W), split="eval", min_objects=2, max_objects=3)
    depth_mm = np.full((H, W), 3000, np.uint16)
    for index, mask in enumerate(scene.instance_masks):
        depth_mm[mask] = 1000 + 250 * index
    depth_mm[:, 10:14] = 0  # invalid
    depth_mm[:8, 200:260] = 9000  # beyond max_range_m = 5
    return scene, depth_mm


def header(sec: int, frame: str = "camera_color_optical_frame") -> Header:
    h = Header(frame_id=frame)
    h.stamp.sec = sec
    return h


def depth_msg(depth_mm: np.ndarray, sec: int) -> Image:
    msg = Image(header=header(sec), height=depth_mm.shape[0], width=depth_mm.shape[1], encoding="16UC1",
                step=depth_mm.shape[1] * 2, is_bigendian=0)
    msg.data = to_byte_array(depth_mm)
    return msg


def info_msg(fx: float = FX, width: int = W, height: int = H) -> CameraInfo:
    info = CameraInfo(header=header(0), width=width, height=height)
    info.k = [fx, 0.0, CX, 0.0, FY if fx else 0.0, CY, 0.0, 0.0, 1.0]
    return info


def read_cloud(msg: PointCloud2) -> np.ndarray:
    assert [f.name for f in msg.fields] == list(CLOUD_DTYPE.names)
    assert msg.point_step == CLOUD_DTYPE.itemsize
    return np.frombuffer(as_uint8_buffer(msg.data).tobytes(), dtype=CLOUD_DTYPE)


@pytest.fixture(scope="module")
def depth_node(tmp_path_factory, ros):
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path_factory.mktemp("depth"), name="ovseg_d", namespace="depth_test",
                      params={"use_depth": True, "max_range_m": 5.0, "sam_model": TEST_SAM,
                              "clip_model": "ovseg-demo-clip", "depth_tolerance_s": 0.01})
    client = OvsegClient("/depth_test", name="depth_client")
    client.subscribe("labels_cloud", PointCloud2)
    client.subscribe("labels_markers", MarkerArray)
    depth_pub = client.node.create_publisher(Image, "/depth_test/depth/image", qos_profile_sensor_data)
    info_pub = client.node.create_publisher(CameraInfo, "/depth_test/depth/camera_info", 10)
    assert client.wait_ready(90), proc.output()
    assert client.set_vocabulary(["grass", "water", "sky", "wall", "sand", "red circle", "blue star"]).success
    yield proc, client, depth_pub, info_pub
    client.close()
    proc.stop()


def send(client, depth_pub, rgb, depth, sec, depth_sec=None, tries: int = 10):
    """Publish depth then colour until the frame's 2D output arrives (best effort)."""
    for _ in range(tries):
        depth_pub.publish(depth_msg(depth, sec if depth_sec is None else depth_sec))
        client.publish_image(rgb_to_image(rgb, header(sec)))
        if client.wait_for("segmentation", lambda m: m.header.stamp.sec == sec, 1.5) is not None:
            return True
    return False


def test_problems_warn_and_2d_output_continues(depth_node):
    proc, client, depth_pub, info_pub = depth_node
    scene, depth = scene_with_depth(1)
    assert send(client, depth_pub, scene.image, depth, 100)
    assert wait_until(lambda: "no camera_info" in proc.output(), 5), proc.output()[-2000:]
    info_pub.publish(info_msg(fx=0.0))
    assert wait_until(lambda: client.wait_for("segmentation", lambda m: True, 0.1) is not None, 2)
    assert send(client, depth_pub, scene.image, depth, 101)
    assert wait_until(lambda: "unusable focal length" in proc.output(), 5), proc.output()[-2000:]
    info_pub.publish(info_msg())
    assert send(client, depth_pub, scene.image, depth[::2, ::2].copy(), 102)
    assert wait_until(lambda: "not aligned" in proc.output(), 5), proc.output()[-2000:]
    assert send(client, depth_pub, scene.image, depth, 103, depth_sec=104)
    assert wait_until(lambda: "no depth frame within" in proc.output(), 5), proc.output()[-2000:]
    assert client.wait_for("labels_cloud", lambda m: m.header.stamp.sec in (100, 101, 102, 103), 0.5) is None
    assert proc.alive()


def test_cloud_matches_back_projection_and_labels(depth_node):
    proc, client, depth_pub, info_pub = depth_node
    info_pub.publish(info_msg())
    scene, depth = scene_with_depth(2)
    sec = 200
    for _ in range(10):
        assert send(client, depth_pub, scene.image, depth, sec)
        if client.wait_for("labels_cloud", lambda m: m.header.stamp.sec == sec, 2.0) is not None:
            break
    cloud_msg = client.wait_for("labels_cloud", lambda m: m.header.stamp.sec == sec, 1.0)
    assert cloud_msg is not None, proc.output()[-2000:]
    labels = image_to_array(client.wait_for("labels", lambda m: m.header.stamp.sec == sec, 5.0))
    cloud = read_cloud(cloud_msg)
    z = depth.astype(np.float64) / 1000.0
    valid = (depth > 0) & (z <= 5.0)
    rows, cols = np.nonzero(valid)  # the node emits valid pixels in row-major order (cloud_stride 1)
    assert len(cloud) == len(rows)
    expected = np.stack([(cols - CX) * z[rows, cols] / FX, (rows - CY) * z[rows, cols] / FY, z[rows, cols]], 1)
    got = np.stack([cloud["x"], cloud["y"], cloud["z"]], 1)
    assert np.abs(got - expected).max() < 1e-3  # within 1 mm
    assert np.array_equal(cloud["label"], labels[rows, cols])
    assert cloud["z"].max() <= 5.0 and not np.isnan(got).any()
    rgb = cloud["rgb"].view(np.uint32)
    assert np.array_equal((rgb >> 16) & 255, scene.image[rows, cols, 0])

    markers = client.wait_for("labels_markers", lambda m: m.markers and m.markers[1:] and
                              m.markers[1].header.stamp.sec == sec, 5.0)
    assert markers is not None and markers.markers[0].action == Marker.DELETEALL
    texts = [m for m in markers.markers if m.type == Marker.TEXT_VIEW_FACING]
    assert texts
    from ovseg_ros.core.geometry import Intrinsics, region_centroid

    intrinsics = Intrinsics(FX, FY, CX, CY, W, H)
    for text in texts:
        class_id = text.id // 2
        centroid, _ = region_centroid(labels == class_id, np.where(valid, z, np.nan), intrinsics)
        position = np.array([text.pose.position.x, text.pose.position.y, text.pose.position.z])
        assert np.linalg.norm(position - centroid) < 0.02


def test_prompts_return_3d_centroids_of_known_objects(depth_node):
    from ovseg_interfaces.srv import SegmentPrompt

    proc, client, depth_pub, info_pub = depth_node
    info_pub.publish(info_msg())
    scene, depth = scene_with_depth(3)
    sec = 300
    prompt_client = client.node.create_client(SegmentPrompt, "/depth_test/segment_prompt")
    assert prompt_client.wait_for_service(timeout_sec=10)
    for _ in range(10):
        assert send(client, depth_pub, scene.image, depth, sec)
        if client.wait_for("labels_cloud", lambda m: m.header.stamp.sec == sec, 2.0) is not None:
            break
    request = SegmentPrompt.Request()
    request.stamp.sec = sec
    request.boxes = [float(v) for box in scene.boxes for v in box]
    response = client.call(prompt_client, request)
    assert response.success, response.message
    assert len(response.centroids) == len(scene.instance_masks) == len(response.has_3d)
    errors = []
    for index, (mask, centroid) in enumerate(zip(scene.instance_masks, response.centroids, strict=True)):
        rows, cols = np.nonzero(mask & (depth > 0))
        z = 1.0 + 0.25 * index
        truth = np.array([np.median((cols - CX) * z / FX), np.median((rows - CY) * z / FY), z])
        got = np.array([centroid.x, centroid.y, centroid.z])
        assert response.has_3d[index]
        errors.append(float(np.linalg.norm(got - truth)))
    print("3D centroid errors (m):", errors)
    assert np.median(errors) < 0.02 and max(errors) < 0.05, errors
    assert response.depth_frame_id == "camera_color_optical_frame"
    # a frame without paired depth answers in 2D only
    request = SegmentPrompt.Request()
    request.image = rgb_to_image(scene.image, header(301))
    request.points, request.point_labels = [Point(x=5.0, y=5.0)], [1]
    response = client.call(prompt_client, request)
    assert response.success and not response.has_3d
    # A client's image with the camera frame's stamp: answered on the client's image, without the camera's depth
    # (issue 14: frames never cross); the camera frame keeps its depth for the next by-stamp prompt.
    other = generate_scene(9, size=(H, W), split="eval", min_objects=1, max_objects=1)
    request = SegmentPrompt.Request()
    request.image = rgb_to_image(other.image, header(sec))
    request.boxes = [float(v) for v in other.boxes[0]]
    response = client.call(prompt_client, request)
    assert response.success and not response.has_3d and not response.depth_frame_id
    request = SegmentPrompt.Request()
    request.stamp.sec = sec
    request.boxes = [float(v) for v in scene.boxes[0]]
    response = client.call(prompt_client, request)
    assert response.success and response.has_3d == [True]
    assert abs(response.centroids[0].z - 1.0) < 0.02  # object 0 of the camera frame stands at 1.0 m


def test_region_centroid_of_known_objects_is_exact():
    from ovseg_ros.core.geometry import Intrinsics, back_project, depth_to_metres, region_centroid

    intrinsics = Intrinsics(FX, FY, CX, CY, W, H)
    scene, depth = scene_with_depth(4)
    depth_m = depth_to_metres(depth, "16UC1")
    for index, mask in enumerate(scene.instance_masks):
        z = 1.0 + 0.25 * index
        rows, cols = np.nonzero(mask & (depth > 0))
        truth = np.array([np.median((cols - CX) * z / FX), np.median((rows - CY) * z / FY), z])
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # a mask bleeding over the edge
        for candidate in (mask, grown):
            centroid, extent = region_centroid(candidate, depth_m, intrinsics)
            assert np.linalg.norm(centroid - truth) < 0.02
            assert extent[2] < 0.01  # a flat object at one depth
    points, rows, cols = back_project(depth_m, intrinsics, max_range=5.0, stride=2)
    assert rows.max() % 2 == 0 and cols.max() % 2 == 0 and (points[:, 2] <= 5.0).all()


def test_depth_per_camera_in_a_multi_camera_node(tmp_path, ros):
    """cameras [front, rear]: each camera pairs its own depth; the one without depth warns under its name and
    still gets its 2D output."""
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path, name="ovseg_md", namespace="multi_depth",
                      params={"use_depth": True, "cameras": ["front", "rear"], "max_range_m": 5.0})
    clients = {name: OvsegClient("/multi_depth", name=f"multi_depth_{name}", camera=name) for name in ("front", "rear")}
    front = clients["front"]
    try:
        front.subscribe("labels_cloud", PointCloud2)
        clients["rear"].subscribe("labels_cloud", PointCloud2)
        depth_pub = front.node.create_publisher(Image, "/multi_depth/front/depth/image", qos_profile_sensor_data)
        info_pub = front.node.create_publisher(CameraInfo, "/multi_depth/front/depth/camera_info", 10)
        assert front.wait_ready(90), proc.output()
        assert front.set_vocabulary(["grass", "water", "sky", "wall", "sand", "red circle", "blue star"]).success
        scene, depth = scene_with_depth(4)
        info_pub.publish(info_msg())
        assert wait_until(lambda: info_pub.get_subscription_count() > 0, 5)
        cloud = None
        for _ in range(10):
            info_pub.publish(info_msg())
            assert send(front, depth_pub, scene.image, depth, 300)
            cloud = front.wait_for("labels_cloud", lambda m: m.header.stamp.sec == 300, 1.5)
            if cloud is not None:
                break
        assert cloud is not None, proc.output()[-2000:]
        points = read_cloud(cloud)
        valid = (depth > 0) & (depth <= 5000)
        assert len(points) == int(valid.sum())
        rear = clients["rear"]  # no depth on this camera: 2D output as usual, a warning naming the camera
        seg = None
        for _ in range(10):
            rear.publish_image(rgb_to_image(scene.image, header(301, "rear_optical")))
            seg = rear.wait_for("segmentation", lambda m: m.header.stamp.sec == 301, 1.5)
            if seg is not None:
                break
        assert seg is not None and seg.header.frame_id == "rear_optical"
        assert wait_until(lambda: "[rear] no 3D output for this frame" in proc.output(), 5), proc.output()[-2000:]
        assert rear.wait_for("labels_cloud", lambda m: True, 0.5) is None
    finally:
        for client in clients.values():
            client.close()
        assert proc.stop() == 0


def test_find_objects_answers_with_the_3d_place_of_a_tracked_object(depth_node):
    from ovseg_interfaces.srv import FindObjects
    from ovseg_ros.ros.image_conversions import image_to_array

    proc, client, depth_pub, info_pub = depth_node
    info_pub.publish(info_msg())
    scene, depth = scene_with_depth(5)
    stuff = ["grass", "water", "sky", "wall", "sand"]
    assert client.set_vocabulary(stuff + scene.instance_classes).success  # objects need their names
    finder = client.node.create_client(FindObjects, "/depth_test/find_objects")
    assert finder.wait_for_service(timeout_sec=10)
    for sec in range(400, 404):  # the same view a few times: tracks are confirmed after two sightings
        assert send(client, depth_pub, scene.image, depth, sec)
    answer = client.call(finder, FindObjects.Request(query=scene.instance_classes[0]))
    assert answer.success and answer.objects, (answer.message, proc.output()[-2000:])
    checked = 0
    for obj, mask_msg in zip(answer.objects, answer.masks, strict=True):
        mask = image_to_array(mask_msg) > 0
        overlaps = [(mask & m).sum() / max(mask.sum(), 1) for m in scene.instance_masks]
        index = int(np.argmax(overlaps))
        if overlaps[index] < 0.8:
            continue  # not mostly one true object (the demo model's masks are blocky)
        assert obj.has_3d and obj.depth_frame_id == "camera_color_optical_frame"
        assert abs(obj.centroid.z - (1.0 + 0.25 * index)) < 0.05, (index, obj.centroid)
        checked += 1
    assert checked, [o.label for o in answer.objects]


def test_every_output_of_a_frame_whose_depth_holds_nan_inf_and_negative_values_is_published(depth_node):
    proc, client, depth_pub, info_pub = depth_node
    info_pub.publish(info_msg())
    scene, depth_mm = scene_with_depth(5)
    metres = depth_mm.astype(np.float32) / 1000.0
    metres[20:24] = np.nan
    metres[30:34] = np.inf
    metres[40:44] = -np.inf
    metres[50:54] = -1.0
    sec = 500

    def depth32(stamp: int) -> Image:
        msg = Image(header=header(stamp), height=H, width=W, encoding="32FC1", step=W * 4, is_bigendian=0)
        msg.data = to_byte_array(metres)
        return msg

    got = {}
    for _ in range(10):
        depth_pub.publish(depth32(sec))
        client.publish_image(rgb_to_image(scene.image, header(sec)))
        for topic in ("labels", "segmentation", "overlay", "labels_cloud"):
            got[topic] = got.get(topic) or client.wait_for(topic, lambda m: m.header.stamp.sec == sec, 1.0)
        if all(got.values()):
            break
    assert all(got.values()), ({topic: msg is not None for topic, msg in got.items()}, proc.output()[-3000:])
    cloud = read_cloud(got["labels_cloud"])
    assert np.isfinite(cloud["z"]).all() and (cloud["z"] > 0).all()
    assert len(cloud) == int((np.isfinite(metres) & (metres > 0) & (metres <= 5.0)).sum())
