"""Presets over DDS: a preset sets the node's defaults, explicit parameters win, the log and /diagnostics say what
is in force, 80-template vocabularies work end to end, and a bad preset or template is refused with its reason."""

from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray
from node_processes import start_node
from rcl_interfaces.srv import GetParameters
from std_msgs.msg import Header

from ovseg_ros.ros.image_conversions import rgb_to_image
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene


def frame(sec: int):
    header = Header(frame_id="cam")
    header.stamp.sec = sec
    return rgb_to_image(generate_scene(sec, size=(120, 160), split="eval").image, header)


def segmentation_of(client, sec: int):
    return client.segment(frame(sec))


def test_a_preset_sets_defaults_explicit_parameters_win_and_80_templates_work(tmp_path, make_client):
    # NACLIP's settings on the small random-init CLIP (its official weights cannot be had here); PAMR overridden.
    proc = start_node(tmp_path, name="ovseg_preset", namespace="preset",
                      params={"preset": "naclip-vit-b16", "clip_model": "ovseg-demo-vit", "pamr_steps": 0,
                              "vocabulary": ["grass", "sky;heaven", "red circle"]})
    client = make_client("/preset")
    client.subscribe("/diagnostics", DiagnosticArray)
    get = client.node.create_client(GetParameters, "/preset/ovseg_preset/get_parameters")
    try:
        assert client.wait_ready(120), proc.output()
        request = GetParameters.Request()
        request.names = ["preset", "dense_variant", "input_size", "window_size", "window_stride", "logit_scale",
                         "pamr_steps", "prompt_templates", "synonym_merge"]
        values = [v for v in client.call(get, request).values]
        assert values[0].string_value == "naclip-vit-b16"
        assert values[1].string_value == "naclip"
        assert [values[i].integer_value for i in (2, 3, 4)] == [336, 224, 112]
        assert values[5].double_value == 40.0
        assert values[6].integer_value == 0  # set explicitly: wins over the preset's 10
        assert list(values[7].string_array_value) == ["imagenet80"]
        assert values[8].string_value == "max"
        vocabulary = client.get_vocabulary()
        assert len(vocabulary.prompt_templates) == 80 and "a bad photo of a {}." in vocabulary.prompt_templates
        msg = segmentation_of(client, 7)
        assert msg is not None, proc.output()
        assert msg.labels.height == 120 and msg.labels.width == 160
        log = proc.output()
        assert "preset naclip-vit-b16:" in log and "dense_variant=naclip " in log and "pamr_steps=0*" in log
        status = client.wait_for("/diagnostics", lambda m: any(
            kv.key == "preset" and kv.value == "naclip-vit-b16" for s in m.status for kv in s.values), 5.0)
        assert status is not None
        settings = next(kv.value for s in status.status for kv in s.values if kv.key == "settings")
        assert "window_stride=112" in settings and "pamr_steps=0*" in settings

        # A new 80-template vocabulary (with synonyms) by service, used by the next frame.
        response = client.set_vocabulary(["water", "sand;beach", "blue square", "yellow triangle"], ["imagenet80"])
        assert response.success, response.message
        msg = segmentation_of(client, 8)
        assert msg is not None and msg.vocabulary_version == response.vocabulary_version
        assert set(msg.class_names) <= {"water", "sand", "blue square", "yellow triangle"}
        for bad in (["a photo of {0}."], ["a {} and a {}."], ["{{}} braces only"], ["imagenet81"]):
            response = client.set_vocabulary(["cup"], bad)
            assert not response.success and "template" in response.message, (bad, response.message)
        assert proc.alive()
    finally:
        assert proc.stop() == 0, proc.output()


def test_an_unknown_preset_fails_loudly_at_start(tmp_path):
    proc = start_node(tmp_path, name="ovseg_badpreset", namespace="badpreset", params={"preset": "naclip-vit-b99"})
    assert wait_until(lambda: not proc.alive(), 60), proc.output()
    assert proc.stop() == 1
    fatal = [line for line in proc.output().splitlines() if "FATAL" in line]
    assert len(fatal) == 1 and "naclip-vit-b99" in fatal[0] and "naclip-vit-b16" in fatal[0], proc.output()
