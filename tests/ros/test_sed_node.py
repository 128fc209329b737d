"""SED in a real node over DDS with `preset:=sed-convnext-b`: the released architecture (ConvNeXt-B CLIP, cost
volume, gradual-fusion decoder) loaded strictly from a checkpoint file in the released layout (seeded weights:
the official ones cannot be fetched here), frames segmented, a vocabulary swapped by service, box and point prompts
labelled by SED's own CLIP, tracked objects; without the checkpoint the node refuses to start and names the
fetch command."""

from __future__ import annotations

import pytest
import torch
from geometry_msgs.msg import Point
from node_processes import start_node
from std_msgs.msg import Header

from ovseg_interfaces.msg import TrackedObjects
from ovseg_interfaces.srv import SegmentPrompt
from ovseg_ros.ros.image_conversions import rgb_to_image
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene

pytestmark = pytest.mark.slow  # the full ConvNeXt-B SED: about 3 s a frame on two cores


def frame(sec: int):
    header = Header(frame_id="cam")
    header.stamp.sec = sec
    return rgb_to_image(generate_scene(sec, size=(120, 160), split="eval").image, header)


def test_the_sed_preset_segments_swaps_vocabulary_and_answers_prompts_over_dds(tmp_path, make_client):
    from ovseg_ros.bench.seeded_sed import seeded_state_dict
    from ovseg_ros.core.clip_builders import build_clip
    from ovseg_ros.core.modeling.sed import build_sed, get_sed_config

    network = build_sed(get_sed_config("sed-convnext-b"), build_clip)
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": seeded_state_dict(network.state_dict())}, checkpoint)  # detectron2's layout
    del network
    proc = start_node(tmp_path, name="ovseg_sed", namespace="sed", params={
        "preset": "sed-convnext-b", "dense_model": f"sed-convnext-b:{checkpoint}",
        "vocabulary": ["grass", "sky;heaven", "red circle", "wall"], "track_min_hits": 1,
        "sam_model": "ovseg-demo-sam"})
    client = make_client("/sed", extra_topics={"objects": TrackedObjects})
    prompts = client.node.create_client(SegmentPrompt, "/sed/segment_prompt")
    try:
        assert client.wait_ready(180), proc.output()
        msg = client.segment(frame(3), tries=5, timeout=20.0)
        assert msg is not None, proc.output()[-3000:]
        assert msg.labels.height == 120 and msg.labels.width == 160
        assert set(msg.class_names) <= {"grass", "sky", "red circle", "wall"}
        log = proc.output()
        assert "preset sed-convnext-b:" in log and "dense model sed-convnext-b" in log
        vocabulary = client.get_vocabulary()
        assert len(vocabulary.prompt_templates) == 80  # SED's imagenet ensemble: one cost-volume channel each

        response = client.set_vocabulary(["water", "sand;beach", "blue square"], ["imagenet80"])
        assert response.success, response.message
        msg = client.segment(frame(4), tries=5, timeout=20.0)
        assert msg is not None and msg.vocabulary_version == response.vocabulary_version
        assert set(msg.class_names) <= {"water", "sand", "blue square"}
        objects = client.wait_for("objects", lambda m: m.header.stamp.sec == 4, 20.0)
        assert objects is not None and all(o.label in ("water", "sand", "blue square") for o in objects.objects)

        assert prompts.wait_for_service(timeout_sec=10)
        request = SegmentPrompt.Request()
        request.stamp.sec = 4
        request.boxes = [20.0, 20.0, 100.0, 90.0]
        request.points, request.point_labels, request.point_groups = [Point(x=60.0, y=50.0)], [1], [1]
        answer = client.call(prompts, request, timeout=60.0)
        assert answer.success, answer.message
        assert len(answer.masks) == 2 and set(answer.labels) <= {"water", "sand", "blue square"}
        assert proc.alive()
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


def test_without_the_checkpoint_the_sed_preset_refuses_to_start_and_names_the_fetch(tmp_path):
    proc = start_node(tmp_path, name="ovseg_sed_missing", namespace="sed_missing",
                      params={"preset": "sed-convnext-b"})
    assert wait_until(lambda: not proc.alive(), 120), proc.output()
    assert proc.stop() == 1
    fatal = [line for line in proc.output().splitlines() if "FATAL" in line]
    assert fatal and "sed-convnext-b" in fatal[0] and "ovseg-models fetch sed-convnext-b" in fatal[0], proc.output()
