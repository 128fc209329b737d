"""The node as a real process over real DDS: outputs, headers, vocabulary changes, bad requests, SIGINT."""

from __future__ import annotations

import numpy as np
import pytest
from node_processes import start_node
from std_msgs.msg import Header

from ovseg_ros.ros.image_conversions import image_to_array, rgb_to_image


@pytest.fixture(scope="module")
def node(tmp_path_factory, ros):
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path_factory.mktemp("node"))
    client = OvsegClient("", name="test_node_client")
    try:
        assert client.wait_ready(timeout=90), "node services never appeared:\n" + proc.output()
        yield proc, client
    finally:
        client.close()
        if proc.alive():
            proc.stop()


def camera_frame(stamp_sec: int, width: int = 640, height: int = 480, frame_id: str = "camera_optical"):
    rng = np.random.default_rng(stamp_sec)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    header = Header(frame_id=frame_id)
    header.stamp.sec = stamp_sec
    header.stamp.nanosec = 123
    return image, rgb_to_image(image, header)


def publish_until(client, msg, topic: str, predicate, timeout: float = 30.0):
    """Best-effort images may be missed during discovery: republish until an answer arrives."""
    for _ in range(int(timeout / 2)):
        client.publish_image(msg)
        answer = client.wait_for(topic, predicate, timeout=2.0)
        if answer is not None:
            return answer
    return None


def same_stamp(msg, sec):
    return msg.header.stamp.sec == sec and msg.header.stamp.nanosec == 123


def test_outputs_keep_header_and_size(node):
    proc, client = node
    _, msg = camera_frame(1001)
    seg = publish_until(client, msg, "segmentation", lambda m: same_stamp(m, 1001))
    assert seg is not None, proc.output()
    labels = client.wait_for("labels", lambda m: same_stamp(m, 1001), timeout=10)
    overlay = client.wait_for("overlay", lambda m: same_stamp(m, 1001), timeout=10)
    for out in (seg, labels, overlay):
        assert out.header.frame_id == "camera_optical"
    assert (labels.width, labels.height, labels.encoding) == (640, 480, "mono16")
    assert (overlay.width, overlay.height, overlay.encoding) == (640, 480, "rgb8")
    assert (seg.labels.width, seg.labels.height) == (640, 480)
    ids = image_to_array(labels)
    vocab = client.get_vocabulary()
    assert set(np.unique(ids)) <= set(range(len(vocab.labels))) | {65535}
    assert set(seg.class_ids) == set(int(i) for i in np.unique(ids) if i != 65535)
    assert abs(sum(seg.class_areas) - float((ids != 65535).mean())) < 1e-3
    assert seg.vocabulary_version == vocab.vocabulary_version
    assert seg.inference_ms > 0


def test_set_vocabulary_changes_label_info_and_outputs(node):
    proc, client = node
    before = client.get_vocabulary().vocabulary_version
    response = client.set_vocabulary(["cat", "dog;puppy", "robot"], ["a photo of a {}."])
    assert response.success, response.message
    assert response.vocabulary_version == before + 1
    info = client.wait_for("label_info", lambda m: m.vocabulary_version == response.vocabulary_version, 10)
    assert info is not None
    assert list(info.class_names) == ["cat", "dog", "robot"] and list(info.class_ids) == [0, 1, 2]
    current = client.get_vocabulary()
    assert list(current.labels) == ["cat", "dog;puppy", "robot"]
    assert list(current.prompt_templates) == ["a photo of a {}."]
    client.clear()
    _, msg = camera_frame(1002)
    seg = publish_until(client, msg, "segmentation", lambda m: same_stamp(m, 1002))
    assert seg is not None, proc.output()
    assert seg.vocabulary_version == response.vocabulary_version
    assert set(seg.class_ids) <= {0, 1, 2}
    assert set(seg.class_names) <= {"cat", "dog", "robot"}


@pytest.mark.parametrize(
    "labels, templates, reason",
    [
        ([], [], "empty"),
        (["ok", ""], [], "empty"),
        (["ok", "x" * 500], [], "limit"),
        (["same", "same"], [], "repeats"),
        (["ok"], ["no placeholder"], "{}"),
    ],
)
def test_bad_vocabulary_is_refused_and_node_keeps_serving(node, labels, templates, reason):
    proc, client = node
    before = client.get_vocabulary()
    response = client.set_vocabulary(labels, templates)
    assert not response.success
    assert reason in response.message
    assert response.vocabulary_version == before.vocabulary_version
    after = client.get_vocabulary()
    assert list(after.labels) == list(before.labels)
    assert proc.alive()


def test_non_list_request_is_refused(node):
    """`{labels: 'cat,dog'}` (a string where a list belongs) reaches the node as single characters."""
    proc, client = node
    from ovseg_interfaces.srv import SetVocabulary

    before = client.get_vocabulary().vocabulary_version
    request = SetVocabulary.Request()
    request.labels = "cat,dog"  # rclpy accepts any sequence of str, so this serialises as 7 characters
    response = client.call(client.set_client, request)
    assert not response.success
    assert "list" in response.message
    assert response.vocabulary_version == before
    assert proc.alive()


def test_sigint_exits_cleanly(node):
    proc, client = node
    _, msg = camera_frame(1003)
    assert publish_until(client, msg, "segmentation", lambda m: same_stamp(m, 1003)) is not None
    code = proc.stop()
    assert code == 0, proc.output()
    assert "Traceback" not in proc.output()
