"""Every input encoding, compressed input, and every bad input class: a clear error, the node keeps serving."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from node_processes import start_node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ovseg_ros.ros.image_conversions import ImageError, image_to_rgb, rgb_to_image, to_byte_array
from ovseg_ros.runtime import wait_until


def header(sec: int) -> Header:
    h = Header(frame_id="cam")
    h.stamp.sec = sec
    return h


def raw(array: np.ndarray, encoding: str, sec: int, step: int | None = None) -> Image:
    msg = Image(header=header(sec), height=array.shape[0], width=array.shape[1], encoding=encoding)
    msg.step = step if step is not None else int(array.strides[0])
    msg.data = to_byte_array(array)
    return msg


def rgb_image(h: int = 120, w: int = 160) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def raw_node(tmp_path_factory, ros):
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path_factory.mktemp("inputs"), name="ovseg_in", namespace="inputs",
                      params={"max_image_pixels": 1920 * 1080})
    client = OvsegClient("/inputs", name="inputs_client")
    client.subscribe("/diagnostics", DiagnosticArray)
    assert client.wait_ready(60), proc.output()
    yield proc, client
    client.close()
    proc.stop()


def roundtrip(client, msg, sec: int, timeout: float = 20.0):
    for _ in range(int(timeout / 2)):
        client.publish_image(msg)
        got = client.wait_for("segmentation", lambda m: m.header.stamp.sec == sec, timeout=2.0)
        if got is not None:
            return got
    return None


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "yuv422", "yuyv"])
def test_every_encoding_is_segmented(raw_node, encoding):
    proc, client = raw_node
    rgb = rgb_image()
    if encoding in ("rgb8", "bgr8"):
        array = rgb if encoding == "rgb8" else rgb[..., ::-1].copy()
    elif encoding in ("rgba8", "bgra8"):
        array = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    elif encoding == "mono8":
        array = rgb[..., 0].copy()
    elif encoding == "mono16":
        array = rgb[..., 0].astype(np.uint16) * 200
    else:
        array = rgb[..., :2].copy()  # 2 bytes per pixel, any content is a valid YUV 4:2:2 image
    sec = 2000 + ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "yuv422", "yuyv"].index(encoding)
    seg = roundtrip(client, raw(array, encoding, sec), sec)
    assert seg is not None, proc.output()[-2000:]
    assert (seg.labels.width, seg.labels.height) == (160, 120)


def bad_inputs() -> dict[str, tuple[Image, str]]:
    rgb = rgb_image()
    short = raw(rgb, "rgb8", 0)
    short.data = to_byte_array(rgb.tobytes()[:-7])
    padded_step = raw(rgb, "rgb8", 0, step=160 * 3 - 2)
    empty = Image(header=header(0), height=0, width=0, encoding="rgb8", step=0)
    big = Image(header=header(0), height=2160, width=3840, encoding="mono8", step=3840)
    big.data = to_byte_array(np.zeros((2160, 3840), np.uint8))
    return {
        "wrong encoding": (raw(rgb, "32FC3", 0), "unsupported encoding"),
        "step too small": (padded_step, "step"),
        "data length": (short, "data length"),
        "zero size": (empty, "empty image"),
        "4K above the limit": (big, "exceeds the limit"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_is_refused_with_a_clear_log_and_serving_continues(raw_node, case):
    proc, client = raw_node
    msg, reason = bad_inputs()[case]
    sec = 3000 + list(bad_inputs()).index(case)
    msg.header.stamp.sec = sec
    for _ in range(20):  # best effort: repeat until the node has seen (and refused) it
        client.publish_image(msg)
        if wait_until(lambda: reason in proc.output(), 1.0):
            break
    assert reason in proc.output(), proc.output()[-2000:]
    good_sec = sec + 100
    assert roundtrip(client, rgb_to_image(rgb_image(), header(good_sec)), good_sec) is not None
    assert client.wait_for("segmentation", lambda m: m.header.stamp.sec == sec, timeout=0.5) is None
    assert proc.alive()


def test_diagnostics_report_counts_rates_and_latency(raw_node):
    proc, client = raw_node
    for sec in range(4000, 4005):
        assert roundtrip(client, rgb_to_image(rgb_image(), header(sec)), sec) is not None
    status = client.wait_for("/diagnostics", lambda m: any(
        kv.key == "frames_processed" and int(kv.value) >= 5 for kv in m.status[0].values), timeout=5)
    assert status is not None
    values = {kv.key: kv.value for kv in status.status[0].values}
    for key in ("frames_received", "frames_dropped", "frames_rejected", "input_rate_hz", "output_rate_hz",
                "latency_p50_ms", "latency_p95_ms", "vocabulary_version", "device", "backend"):
        assert key in values, key
    assert int(values["frames_received"]) >= int(values["frames_processed"]) + int(values["frames_rejected"])
    assert float(values["latency_p95_ms"]) >= float(values["latency_p50_ms"]) > 0


def test_8k_frame_is_refused_by_the_converter():
    eight_k = raw(np.zeros((4320, 7680), np.uint8), "mono8", 0)
    with pytest.raises(ImageError, match="exceeds the limit"):
        image_to_rgb(eight_k, max_pixels=4096 * 4096)


@pytest.fixture(scope="module")
def compressed_node(tmp_path_factory, ros):
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path_factory.mktemp("compressed"), name="ovseg_jpeg", namespace="jpeg",
                      params={"input_type": "compressed"})
    client = OvsegClient("/jpeg", name="jpeg_client")
    publisher = client.node.create_publisher(CompressedImage, "/jpeg/image/compressed", 10)
    assert client.wait_ready(60), proc.output()
    yield proc, client, publisher
    client.close()
    proc.stop()


def compressed(data: bytes, fmt: str, sec: int) -> CompressedImage:
    msg = CompressedImage(header=header(sec), format=fmt)
    msg.data = to_byte_array(np.frombuffer(data, np.uint8))
    return msg


def test_compressed_jpeg_png_and_corrupt_or_8k(compressed_node):
    proc, client, publisher = compressed_node
    bgr = cv2.cvtColor(rgb_image(240, 320), cv2.COLOR_RGB2BGR)
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    png = cv2.imencode(".png", bgr)[1].tobytes()
    eight_k = cv2.imencode(".jpg", np.zeros((4320, 7680, 3), np.uint8))[1].tobytes()

    def send_until(msg, sec):
        for _ in range(10):
            publisher.publish(msg)
            got = client.wait_for("segmentation", lambda m: m.header.stamp.sec == sec, timeout=2.0)
            if got is not None:
                return got
        return None

    assert send_until(compressed(jpeg, "jpeg", 5001), 5001) is not None, proc.output()[-2000:]
    assert send_until(compressed(png, "png", 5002), 5002) is not None
    for data, fmt, sec, reason in ((jpeg[: len(jpeg) // 3] + b"garbage", "jpeg", 5003, "could not decode"),
                                   (eight_k, "jpeg", 5004, "exceeds"), (png, "tiff", 5005, "unsupported")):
        for _ in range(20):
            publisher.publish(compressed(data, fmt, sec))
            if wait_until(lambda reason=reason: reason in proc.output(), 1.0):
                break
        assert reason in proc.output(), proc.output()[-2000:]
        assert send_until(compressed(jpeg, "jpeg", sec + 100), sec + 100) is not None
    assert proc.alive()


def test_compressed_input_per_camera(tmp_path, make_client):
    """input_type compressed with cameras: each camera reads NAME/image/compressed and answers on NAME/..."""
    proc = start_node(tmp_path, name="ovseg_jpeg2", namespace="jpeg2",
                      params={"input_type": "compressed", "cameras": "left,right"})
    clients = {name: make_client("/jpeg2", camera=name) for name in ("left", "right")}
    assert clients["left"].wait_ready(60), proc.output()
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb_image(120, 160), cv2.COLOR_RGB2BGR))[1].tobytes()
    try:
        for sec, name in ((6001, "left"), (6002, "right")):
            publisher = clients[name].node.create_publisher(CompressedImage, f"/jpeg2/{name}/image/compressed", 10)
            got = None
            for _ in range(10):
                publisher.publish(compressed(jpeg, "jpeg", sec))
                got = clients[name].wait_for("segmentation", lambda m, s=sec: m.header.stamp.sec == s, timeout=2.0)
                if got is not None:
                    break
            assert got is not None and (got.labels.width, got.labels.height) == (160, 120), proc.output()[-2000:]
        assert clients["left"].wait_for("segmentation", lambda m: m.header.stamp.sec == 6002, 0.5) is None
    finally:
        assert proc.stop() == 0
