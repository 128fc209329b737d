"""Open-Vocabulary SAM behind segment_prompt in a real node over DDS (`prompt_model:=ovsam-test-tiny`: the
released network's reduced layout with seeded random weights; the released files cannot be fetched here).

The dense path keeps segmenting with its own CLIP; a prompt on a cached frame runs OV-SAM's image pass once for
that frame, then box and point prompts are answered with OV-SAM's masks and labels in the service's contract
(masks at the frame's size, labels from the vocabulary, top-k, per-request vocabularies such as "@coco"). Bad
requests are refused with the node still serving. Without the released files `prompt_model:=ovsam-coco` refuses
to start, naming the fetch command and the licence."""

from __future__ import annotations

import numpy as np
import pytest
from geometry_msgs.msg import Point
from node_processes import start_node
from std_msgs.msg import Header

from ovseg_interfaces.srv import SegmentPrompt
from ovseg_ros.ros.image_conversions import image_to_array, rgb_to_image
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene

pytestmark = pytest.mark.slow  # OV-SAM's image pass at 1024 x 1024: about 15 s a prompted frame on two cores

VOCABULARY = ["grass", "sky;heaven", "red circle", "wall"]


def frame(sec: int):
    header = Header(frame_id="cam")
    header.stamp.sec = sec
    return rgb_to_image(generate_scene(sec, size=(120, 160), split="eval").image, header)


def test_ovsam_answers_box_and_point_prompts_over_dds(tmp_path, make_client):
    proc = start_node(tmp_path, name="ovseg_ovsam", namespace="ovsam", params={
        "prompt_model": "ovsam-test-tiny", "vocabulary": VOCABULARY, "prompt_top_k": 3})
    client = make_client("/ovsam")
    prompts = client.node.create_client(SegmentPrompt, "/ovsam/segment_prompt")
    try:
        assert client.wait_ready(180), proc.output()
        log = proc.output()
        assert "Open-Vocabulary SAM ovsam-test-tiny" in log and "seeded random weights" in log, log[-3000:]
        msg = client.segment(frame(3), tries=5, timeout=20.0)
        assert msg is not None, proc.output()[-3000:]
        assert prompts.wait_for_service(timeout_sec=10)

        request = SegmentPrompt.Request()
        request.stamp.sec = 3
        request.boxes = [20.0, 20.0, 100.0, 90.0]
        request.points = [Point(x=60.0, y=50.0), Point(x=130.0, y=30.0)]
        request.point_labels, request.point_groups = [1, 1], [1, 2]  # box+point prompt, then a lone point
        answer = client.call(prompts, request, timeout=120.0)
        assert answer.success, answer.message
        assert answer.header.stamp.sec == 3 and len(answer.masks) == 3
        names = {"grass", "sky", "red circle", "wall"}
        for mask in answer.masks:
            assert (mask.height, mask.width, mask.encoding) == (120, 160, "mono8")
            assert set(np.unique(image_to_array(mask)).tolist()) <= {0, 255}
        assert set(answer.labels) <= names and len(answer.labels) == 3
        assert answer.top_k == 3 and len(answer.top_labels) == 9 and set(answer.top_labels) <= names
        for i in range(3):
            scores = answer.top_scores[3 * i:3 * i + 3]
            assert list(scores) == sorted(scores, reverse=True) and scores[0] == pytest.approx(answer.label_scores[i])
            assert 0.0 <= sum(scores) <= 1.0 + 1e-5  # OV-SAM's softmax includes the background
        for score, mask in zip(answer.mask_scores, answer.masks, strict=True):
            assert (0.5 < score <= 1.0) if image_to_array(mask).any() else score == 0.0

        # the cached frame's image pass is reused; a request's own image and vocabulary work too
        again = client.call(prompts, request, timeout=60.0)
        assert again.success and list(again.labels) == list(answer.labels)
        own = SegmentPrompt.Request()
        own.image = frame(9)
        own.vocabulary = ["@coco"]
        own.boxes = [0.0, 0.0, 80.0, 60.0]
        coco = client.call(prompts, own, timeout=120.0)
        assert coco.success, coco.message
        assert coco.vocabulary_version == 0 and len(coco.labels) == 1 and ";" not in coco.labels[0]

        bad = SegmentPrompt.Request()
        bad.stamp.sec = 3
        bad.boxes = [50.0, 50.0, 10.0, 10.0]
        refused = client.call(prompts, bad, timeout=30.0)
        assert not refused.success and "x2<=x1" in refused.message
        assert client.segment(frame(4), tries=5, timeout=20.0) is not None and proc.alive()
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


def test_without_the_released_files_ovsam_coco_refuses_to_start_and_names_the_fetch(tmp_path):
    proc = start_node(tmp_path, name="ovseg_ovsam_missing", namespace="ovsam_missing",
                      params={"prompt_model": "ovsam-coco"})
    assert wait_until(lambda: not proc.alive(), 120), proc.output()
    assert proc.stop() == 1
    fatal = [line for line in proc.output().splitlines() if "FATAL" in line]
    assert fatal and "ovseg-models fetch ovsam-coco" in fatal[0] and "S-Lab" in fatal[0], proc.output()
