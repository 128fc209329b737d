"""A hostile-input battery over DDS: every class of fault fails loudly at start or is answered at run time, and
the node stays up. Start-up faults: one FATAL line naming the cause, exit code 1, no traceback. A bad state file
is set aside, never a reason to stay down. Run-time: every caller answered, failed saves reported, a client's
image never crosses a camera frame, decompression bombs refused from the header with bounded memory."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from node_processes import TEST_SAM, start_node
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import Header

from ovseg_ros.ros.image_conversions import image_to_array, rgb_to_image
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene


def header(sec: int) -> Header:
    h = Header(frame_id="cam")
    h.stamp.sec = sec
    return h


def fails_at_start(tmp_path: Path, name: str, params: dict, *needles: str) -> str:
    proc = start_node(tmp_path, name=name, namespace=name, params=params)
    assert wait_until(lambda: not proc.alive(), 90), proc.output()
    code = proc.stop()
    output = proc.output()
    fatal = [line for line in output.splitlines() if "FATAL" in line]
    assert code == 1 and len(fatal) == 1, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in fatal[0], (needle, fatal[0])
    return fatal[0]


# ---------------------------------------------------------------- 1, 2: start-up
@pytest.mark.parametrize("case, params, needles", [
    ("named_field", {"prompt_templates": ["a photo of a {name}."]}, ["prompt template 0", "{name}"]),
    ("indexed_field", {"prompt_templates": ["a {}.", "a {0}."]}, ["prompt template 1"]),
    ("braces_only", {"prompt_templates": ["a {{}} thing"]}, ["prompt template 0"]),
    ("ro_out_of_range", {"max_classes": 0}, ["max_classes"]),
    ("wrong_type", {"input_size": "large"}, ["input_size"]),
    ("bad_choice", {"image_qos": "fastest"}, ["image_qos", "sensor_data"]),
    ("bad_preset", {"preset": "naclip-vit-l14"}, ["naclip-vit-l14", "naclip-vit-b16"]),
])
def test_configuration_errors_fail_loudly_at_start(tmp_path, ros, case, params, needles):
    fails_at_start(tmp_path, f"hostile_{case}", params, "configure failed", *needles)


def test_an_onnx_cache_folder_that_cannot_be_made_fails_loudly(tmp_path, ros):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    fails_at_start(tmp_path, "hostile_onnx", {"backend": "onnxruntime", "engine_cache_dir": str(blocker / "engines")},
                   "configure failed", "a_file")


@pytest.mark.parametrize("case, content", [
    ("version_too_large", {"labels": ["grass", "sky"], "prompt_templates": ["a {}."], "vocabulary_version": 2**40}),
    ("version_zero", {"labels": ["grass"], "prompt_templates": ["a {}."], "vocabulary_version": 0}),
    ("template_field", {"labels": ["grass"], "prompt_templates": ["a {0}."], "vocabulary_version": 3}),
    ("not_json", None),
])
def test_a_bad_persisted_vocabulary_is_set_aside_and_the_node_starts(tmp_path, make_client, case, content):
    path = tmp_path / "vocabulary.json"
    path.write_text("{ not json" if content is None else json.dumps(content))
    proc = start_node(tmp_path, name=f"hostile_{case}", namespace=f"hostile_{case}",
                      params={"vocabulary_file": str(path), "vocabulary": ["water", "sand"]})
    client = make_client(f"/hostile_{case}")
    try:
        assert client.wait_ready(60), proc.output()
        vocabulary = client.get_vocabulary()
        assert list(vocabulary.labels) == ["water", "sand"] and vocabulary.vocabulary_version == 1
        aside = list(tmp_path.glob("vocabulary.json.bad-*"))
        assert len(aside) == 1 and not path.exists(), proc.output()
        assert "moved it to" in proc.output()
        response = client.set_vocabulary(["grass", "sky"])  # and it persists again, cleanly
        assert response.success and json.loads(path.read_text())["labels"] == ["grass", "sky"]
    finally:
        assert proc.stop() == 0, proc.output()


def test_the_version_wraps_to_one_and_is_persisted_so(tmp_path, make_client):
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps({"labels": ["grass"], "prompt_templates": ["a {}."],
                                "vocabulary_version": 2**32 - 1}))
    proc = start_node(tmp_path, name="hostile_wrap", namespace="hostile_wrap", params={"vocabulary_file": str(path)})
    client = make_client("/hostile_wrap")
    try:
        assert client.wait_ready(60), proc.output()
        assert client.get_vocabulary().vocabulary_version == 2**32 - 1
        response = client.set_vocabulary(["grass", "sky"])
        assert response.success and response.vocabulary_version == 1  # never 0: that means per-request
        assert json.loads(path.read_text())["vocabulary_version"] == 1
    finally:
        assert proc.stop() == 0, proc.output()


# ---------------------------------------------------------------- 3, 4: callers and persistence
def test_every_simultaneous_caller_is_answered_and_a_failed_save_is_reported(tmp_path, make_client):
    from ovseg_interfaces.srv import GetVocabulary, SetVocabulary

    folder = tmp_path / "state"
    folder.mkdir()
    proc = start_node(tmp_path, name="hostile_callers", namespace="hostile_callers",
                      params={"vocabulary_file": str(folder / "vocabulary.json")})
    client = make_client("/hostile_callers")
    try:
        assert client.wait_ready(60), proc.output()
        callers = [client] + [make_client("/hostile_callers") for _ in range(11)]
        assert all(c.wait_ready(30) for c in callers)
        futures = []
        for i in range(60):  # 12 callers, 5 requests each, all at once
            caller = callers[i % len(callers)]
            if i % 3 == 0:
                request = SetVocabulary.Request(labels=["grass", "sky", f"thing {i}"])
                futures.append(caller.set_client.call_async(request))
            else:
                futures.append(caller.get_client.call_async(GetVocabulary.Request()))
        assert wait_until(lambda: all(f.done() for f in futures), 120), \
            f"{sum(f.done() for f in futures)} of {len(futures)} answered"
        assert all(f.result() is not None for f in futures)
        assert all(f.result().success for f in futures[::3])
        # The file cannot be written any more (its path is now a folder): the caller hears it, nothing changes.
        before = client.get_vocabulary()
        (folder / "vocabulary.json").unlink()
        (folder / "vocabulary.json").mkdir()
        response = client.set_vocabulary(["water"])
        assert not response.success and "cannot save" in response.message, response.message
        after = client.get_vocabulary()
        assert after.vocabulary_version == before.vocabulary_version and list(after.labels) == list(before.labels)
        assert proc.alive()
    finally:
        assert proc.stop() == 0, proc.output()


def test_vocabulary_services_answer_after_shutdown(tmp_path, make_client):
    proc = start_node(tmp_path, name="hostile_down", namespace="hostile_down")
    client = make_client("/hostile_down")
    change = client.node.create_client(ChangeState, "/hostile_down/hostile_down/change_state")
    try:
        assert client.wait_ready(60) and change.wait_for_service(timeout_sec=10), proc.output()
        request = ChangeState.Request()
        request.transition.id = Transition.TRANSITION_ACTIVE_SHUTDOWN
        assert client.call(change, request, 30).success
        assert client.get_vocabulary().vocabulary_version == 0
        response = client.set_vocabulary(["grass"])
        assert not response.success and "shutting down" in response.message, response.message
        assert proc.alive()
    finally:
        proc.stop()
    assert "Traceback" not in proc.output(), proc.output()


# ---------------------------------------------------------------- 5: frames never cross
def test_a_clients_image_never_replaces_a_camera_frame_with_the_same_stamp(tmp_path, make_client):
    from ovseg_interfaces.srv import SegmentPrompt
    from ovseg_ros.core.metrics import mask_iou

    proc = start_node(tmp_path, name="hostile_cross", namespace="hostile_cross",
                      params={"sam_model": TEST_SAM, "clip_model": "ovseg-demo-clip"})
    client = make_client("/hostile_cross")
    prompt = client.node.create_client(SegmentPrompt, "/hostile_cross/segment_prompt")
    camera_scene = generate_scene(810_001, size=(240, 320), split="eval")
    client_scene = generate_scene(810_002, size=(240, 320), split="eval")
    try:
        assert client.wait_ready(60) and prompt.wait_for_service(timeout_sec=30), proc.output()
        for _ in range(10):
            client.publish_image(rgb_to_image(camera_scene.image, header(4242)))
            if client.wait_for("segmentation", lambda m: m.header.stamp.sec == 4242, 2.0) is not None:
                break
        own = SegmentPrompt.Request()
        own.image = rgb_to_image(client_scene.image, header(4242))  # the same stamp as the camera's frame
        own.boxes = [float(v) for v in client_scene.boxes[0]]
        answer = client.call(prompt, own)
        assert answer.success, answer.message
        assert mask_iou(image_to_array(answer.masks[0]) > 127, client_scene.instance_masks[0]) > 0.5
        by_stamp = SegmentPrompt.Request()
        by_stamp.stamp.sec = 4242
        by_stamp.boxes = [float(v) for v in camera_scene.boxes[0]]
        answer = client.call(prompt, by_stamp)
        assert answer.success, answer.message
        assert mask_iou(image_to_array(answer.masks[0]) > 127, camera_scene.instance_masks[0]) > 0.5
        newest = SegmentPrompt.Request()  # stamp zero: the camera's newest frame, not the client's last image
        newest.boxes = by_stamp.boxes
        answer = client.call(prompt, newest)
        assert answer.success and answer.header.stamp.sec == 4242 and answer.header.frame_id == "cam"
        assert mask_iou(image_to_array(answer.masks[0]) > 127, camera_scene.instance_masks[0]) > 0.5
        other = SegmentPrompt.Request()  # a client's image under a stamp no camera frame has: queryable later
        other.image = rgb_to_image(client_scene.image, header(777))
        other.boxes = own.boxes
        assert client.call(prompt, other).success
        again = SegmentPrompt.Request()
        again.stamp.sec = 777
        again.boxes = own.boxes
        answer = client.call(prompt, again)
        assert answer.success and answer.header.stamp.sec == 777 and len(answer.has_3d) == 0
        assert mask_iou(image_to_array(answer.masks[0]) > 127, client_scene.instance_masks[0]) > 0.5
    finally:
        assert proc.stop() == 0, proc.output()


# ---------------------------------------------------------------- 6: decompression bombs
def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (its data is a few rows of zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is rewritten to declare width x height."""
    data = bytearray(cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_decompression_bombs_are_refused_from_their_header(tmp_path, make_client):
    proc = start_node(tmp_path, name="hostile_bomb", namespace="hostile_bomb", params={"input_type": "compressed"})
    client = make_client("/hostile_bomb")
    publisher = client.node.create_publisher(CompressedImage, "/hostile_bomb/image/compressed", 10)
    good = cv2.imencode(".jpg", generate_scene(3, size=(120, 160), split="eval").image)[1].tobytes()

    def send(data: bytes, fmt: str, sec: int) -> CompressedImage:
        return CompressedImage(header=header(sec), format=fmt, data=data)

    def served(sec: int) -> bool:
        for _ in range(10):
            publisher.publish(send(good, "jpeg", sec))
            if client.wait_for("segmentation", lambda m: m.header.stamp.sec == sec, 2.0) is not None:
                return True
        return False

    try:
        assert client.wait_ready(60) and served(1), proc.output()
        baseline = rss_mb(proc.popen.pid)
        bombs = [(png_declaring(30000, 30000), "png", "30000x30000"), (jpeg_declaring(60000, 60000), "jpeg",
                                                                       "60000x60000")]
        for index, (data, fmt, size) in enumerate(bombs):
            assert len(data) < 200_000
            for _ in range(20):
                publisher.publish(send(data, fmt, 100 + index))
                if wait_until(lambda size=size: size in proc.output(), 1.0):
                    break
            assert f"declares {size}" in proc.output(), proc.output()[-2000:]
        assert served(2)
        assert rss_mb(proc.popen.pid) - baseline < 200, (baseline, rss_mb(proc.popen.pid))
    finally:
        assert proc.stop() == 0, proc.output()


def test_a_burst_of_bad_requests_leaves_the_node_serving(tmp_path, make_client):
    """Many threads at once: bad templates, empty labels, a string for a list; every reply says why."""
    proc = start_node(tmp_path, name="hostile_burst", namespace="hostile_burst")
    client = make_client("/hostile_burst")
    try:
        assert client.wait_ready(60), proc.output()
        replies: list = []
        bad = [(["cup"], ["a {0}"]), ([], None), (list("cup,mug"), None), (["x" * 500], None), (["a", "A"], None)]

        def caller(labels, templates):
            replies.append(client.set_vocabulary(labels, templates))

        threads = [threading.Thread(target=caller, args=args) for args in bad * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(replies) == len(threads) and not any(r.success for r in replies)
        assert all(r.message for r in replies)
        time.sleep(0.2)
        assert client.set_vocabulary(["grass", "sky"]).success and proc.alive()
    finally:
        assert proc.stop() == 0, proc.output()
