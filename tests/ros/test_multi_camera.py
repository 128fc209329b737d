"""Several cameras served by one node and one model: batched segmentation, per-camera topics, prompts and
diagnostics, over real DDS with the demo models."""

from __future__ import annotations

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from node_processes import TEST_SAM, start_node
from std_msgs.msg import Header

from ovseg_ros.core.cameras import CameraNameError, parse_camera_names
from ovseg_ros.core.dense import DenseSegmenter
from ovseg_ros.core.metrics import mask_iou
from ovseg_ros.core.registry import load_clip
from ovseg_ros.core.settings import check_consistent, make_settings
from ovseg_ros.core.text_cache import TextEmbeddingCache
from ovseg_ros.core.vocabulary import Vocabulary
from ovseg_ros.ros.image_conversions import image_to_array, rgb_to_image
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene, world_vocabulary

VOCABULARY = world_vocabulary()
SCENES = {"front": (generate_scene(11, size=(240, 320), split="eval"), 41),
          "rear": (generate_scene(12, size=(240, 320), split="eval"), 42),
          "left/wide": (generate_scene(13, size=(200, 360), split="eval"), 43)}


@pytest.mark.parametrize("value, names", [
    ("", [""]), ([], [""]), ("front,rear", ["front", "rear"]), (["front", " /rear/ "], ["front", "rear"]),
    (["left/wide"], ["left/wide"]),
])
def test_camera_names_are_parsed(value, names):
    assert parse_camera_names(value) == names


@pytest.mark.parametrize("value, reason", [
    (["front", "front"], "unique"), (["1st"], "not a valid"), (["front cam"], "not a valid"), (["a//b"], "not a valid"),
])
def test_bad_camera_names_are_refused_with_a_reason(value, reason):
    with pytest.raises(CameraNameError, match=reason):
        parse_camera_names(value)


@pytest.fixture(scope="module")
def node(tmp_path_factory, ros):
    from ovseg_interfaces.srv import SegmentPrompt
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path_factory.mktemp("cameras"), name="ovseg_multi", namespace="robot",
                      params={"cameras": list(SCENES), "clip_model": "ovseg-demo-clip", "sam_model": TEST_SAM,
                              "frame_cache_size": 2, "selection_threshold": 0.0})
    clients = {name: OvsegClient("/robot", name=f"camera_client_{i}", camera=name)
               for i, name in enumerate(SCENES)}
    first = clients["front"]
    first.subscribe("/diagnostics", DiagnosticArray)
    prompt_client = first.node.create_client(SegmentPrompt, "/robot/segment_prompt")
    try:
        assert first.wait_ready(90) and prompt_client.wait_for_service(timeout_sec=30), proc.output()
        assert first.set_vocabulary(VOCABULARY).success
        yield proc, clients, prompt_client
    finally:
        for client in clients.values():
            client.close()
        if proc.alive():
            proc.stop()


def publish_all_until_answered(clients, timeout_rounds: int = 15) -> dict:
    """Publish each camera's scene until every camera's segmentation of it arrived."""
    answers = {}
    for _ in range(timeout_rounds):
        for name, (scene, sec) in SCENES.items():
            if name not in answers:
                header = Header(frame_id=f"{name}_optical")
                header.stamp.sec = sec
                clients[name].publish_image(rgb_to_image(scene.image, header))
        for name, (_, sec) in SCENES.items():
            if name not in answers:
                got = clients[name].wait_for("segmentation", lambda m, s=sec: m.header.stamp.sec == s, 1.0)
                if got is not None:
                    answers[name] = got
        if len(answers) == len(SCENES):
            break
    return answers


def test_each_camera_gets_its_own_segmentation_from_one_batched_model(node):
    proc, clients, _ = node
    answers = publish_all_until_answered(clients)
    assert set(answers) == set(SCENES), proc.output()[-3000:]
    encoder = load_clip("ovseg-demo-clip")
    settings = make_settings({"clip_model": "ovseg-demo-clip", "selection_threshold": 0.0})  # the node's
    reference = DenseSegmenter(encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id),
                               check_consistent(settings))
    prepared = reference.prepare(Vocabulary(tuple(VOCABULARY)))
    for name, (scene, _) in SCENES.items():
        seg = answers[name]
        assert seg.header.frame_id == f"{name}_optical"
        assert (seg.labels.height, seg.labels.width) == scene.image.shape[:2]
        labels = image_to_array(seg.labels)
        alone = reference.segment(scene.image, prepared).labels  # what a one-camera node would publish
        assert np.mean(labels == alone) > 0.999, name
        # every message on a camera's topic is that camera's
        assert all(m.header.frame_id == f"{name}_optical" for m in clients[name].received["segmentation"])
        overlay = clients[name].wait_for("overlay", lambda m, s=seg.header.stamp: m.header.stamp == s, 5.0)
        assert overlay is not None and (overlay.height, overlay.width) == scene.image.shape[:2]


def test_diagnostics_report_every_camera(node):
    proc, clients, _ = node
    publish_all_until_answered(clients)
    first = clients["front"]
    first.clear("/diagnostics")

    def per_camera(msg):
        return {s.name.split("(")[-1].rstrip(")"): {kv.key: kv.value for kv in s.values} for s in msg.status}

    msg = first.wait_for("/diagnostics", lambda m: "ovseg_multi" in m.status[0].name, 10.0)
    assert msg is not None
    statuses = per_camera(msg)
    assert set(statuses) == set(SCENES)
    for name, values in statuses.items():
        assert values["camera"] == name and values["batched_cameras"] == "3"
        assert int(values["frames_processed"]) >= 1


def test_prompts_name_their_camera(node):
    from ovseg_interfaces.srv import SegmentPrompt

    proc, clients, prompt_client = node
    publish_all_until_answered(clients)
    scene, sec = SCENES["rear"]
    target = int(np.argmax([m.sum() for m in scene.instance_masks]))
    request = SegmentPrompt.Request(camera="rear")
    request.stamp.sec = sec
    request.boxes = [float(v) for v in scene.boxes[target]]
    response = clients["front"].call(prompt_client, request)
    assert response.success, response.message
    assert response.camera == "rear" and response.header.frame_id == "rear_optical"
    assert mask_iou(image_to_array(response.masks[0]) > 0, scene.instance_masks[target]) > 0.6

    # the same stamp on another camera is not that frame: refused with the cached stamps, nothing lost
    request.camera = "front"
    response = clients["front"].call(prompt_client, request)
    assert not response.success and "no cached frame with stamp 42" in response.message

    request.camera = "back"
    response = clients["front"].call(prompt_client, request)
    assert not response.success and "unknown camera 'back'" in response.message
    assert "front, rear, left/wide" in response.message

    request.camera = ""  # empty = the first camera, newest frame
    request.stamp.sec = 0
    response = clients["front"].call(prompt_client, request)
    assert response.success and response.camera == "front" and response.header.frame_id == "front_optical"
    assert proc.alive()


def test_a_bad_frame_on_one_camera_does_not_stop_the_others(node):
    proc, clients, _ = node
    bad = rgb_to_image(SCENES["rear"][0].image, Header(frame_id="rear_optical"))
    bad.step = 7  # inconsistent row size: refused with a reason
    bad.header.stamp.sec = 77
    scene, _ = SCENES["front"]
    header = Header(frame_id="front_optical")
    header.stamp.sec = 78
    good = rgb_to_image(scene.image, header)
    got = None
    for _ in range(15):
        clients["rear"].publish_image(bad)
        clients["front"].publish_image(good)
        got = clients["front"].wait_for("segmentation", lambda m: m.header.stamp.sec == 78, 1.0)
        if got is not None:
            break
    assert got is not None, proc.output()[-2000:]
    assert clients["rear"].wait_for("segmentation", lambda m: m.header.stamp.sec == 77, 2.0) is None
    log = proc.output()
    assert "[rear] frame refused" in log
    assert proc.alive()


def test_a_node_with_bad_camera_names_refuses_to_configure_and_says_why(tmp_path):
    proc = start_node(tmp_path, name="ovseg_badcams", namespace="badcams", params={"cameras": ["front", "front"]})
    assert wait_until(lambda: not proc.alive(), 60)
    assert proc.stop() == 1
    assert "configure failed: camera names must be unique; repeated: front" in proc.output()
