"""Lifecycle transitions, parameter validation and refused models, on real node processes."""

from __future__ import annotations

import hashlib

import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from node_processes import start_node
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from std_msgs.msg import Header

from ovseg_ros.ros.image_conversions import rgb_to_image
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene


def frame(sec: int):
    header = Header(frame_id="cam")
    header.stamp.sec = sec
    return rgb_to_image(generate_scene(sec, size=(120, 160), split="eval").image, header)


def outputs_for(client, sec: int, tries: int = 6):
    return client.segment(frame(sec), tries=tries, timeout=1.0) is not None


def test_lifecycle_transitions(tmp_path, make_client):
    proc = start_node(tmp_path, name="ovseg_lc", namespace="lc", params={"autostart": False})
    client = make_client("/lc")
    change = client.node.create_client(ChangeState, "/lc/ovseg_lc/change_state")
    get = client.node.create_client(GetState, "/lc/ovseg_lc/get_state")
    try:
        assert change.wait_for_service(timeout_sec=60), proc.output()

        def transition(transition_id: int) -> bool:
            request = ChangeState.Request()
            request.transition.id = transition_id
            return client.call(change, request, 120).success

        def state() -> str:
            return client.call(get, GetState.Request()).current_state.label

        assert state() == "unconfigured"
        # Services answer in every state: unconfigured, a write is refused with the reason.
        assert client.wait_ready(30, configured=False)
        refused = client.set_vocabulary(["grass"])
        assert not refused.success and "unconfigured" in refused.message, refused.message
        assert transition(Transition.TRANSITION_CONFIGURE) and state() == "inactive"
        assert client.wait_ready(30)
        assert not outputs_for(client, 1, tries=2)  # inactive: not subscribed to the camera
        assert transition(Transition.TRANSITION_ACTIVATE) and state() == "active"
        assert outputs_for(client, 2)
        assert transition(Transition.TRANSITION_DEACTIVATE) and state() == "inactive"
        client.clear()
        assert not outputs_for(client, 3, tries=2)
        assert transition(Transition.TRANSITION_CLEANUP) and state() == "unconfigured"
        assert "models released" in proc.output()
        assert transition(Transition.TRANSITION_CONFIGURE) and transition(Transition.TRANSITION_ACTIVATE)
        assert outputs_for(client, 4)
    finally:
        assert proc.stop() == 0, proc.output()


def set_parameter(client, service, name: str, value) -> tuple[bool, str]:
    kinds = {bool: (ParameterType.PARAMETER_BOOL, "bool_value"), int: (ParameterType.PARAMETER_INTEGER,
             "integer_value"), float: (ParameterType.PARAMETER_DOUBLE, "double_value"),
             str: (ParameterType.PARAMETER_STRING, "string_value")}
    kind, field = kinds[type(value)]
    param_value = ParameterValue(type=kind)
    setattr(param_value, field, value)
    request = SetParameters.Request(parameters=[Parameter(name=name, value=param_value)])
    result = client.call(service, request).results[0]
    return result.successful, result.reason


@pytest.fixture(scope="module")
def param_node(tmp_path_factory, ros):
    from ovseg_ros.client import OvsegClient

    # `-p track_background:=[]` (none): an empty array given at start-up arrives unset (it has no type)
    proc = start_node(tmp_path_factory.mktemp("params"), name="ovseg_p", namespace="params",
                      params={"track_background": []})
    client = OvsegClient("/params", name="params_client")
    service = client.node.create_client(SetParameters, "/params/ovseg_p/set_parameters")
    assert client.wait_ready(60) and service.wait_for_service(timeout_sec=10), proc.output()
    yield proc, client, service
    client.close()
    proc.stop()


@pytest.mark.parametrize("name, value, reason", [
    ("dense_variant", "magic", "one of"),
    ("score_threshold", 1.5, ""),
    ("overlay_alpha", -0.1, ""),
    ("refinement", "crf", "one of"),
    ("max_rate_hz", -3.0, ""),
    ("clip_model", "ViT-L-14", "read-only"),
    ("input_size", 99999, ""),
    ("track_background", 5, "string array or one comma-separated string"),
    ("track_background", 2.5, "string array or one comma-separated string"),
])
def test_bad_parameter_values_are_refused_with_a_reason(param_node, name, value, reason):
    proc, client, service = param_node
    ok, why = set_parameter(client, service, name, value)
    assert not ok and why, why
    assert reason.lower() in why.lower()
    assert outputs_for(client, 50 + len(name))
    assert proc.alive()


def test_good_parameter_values_apply_at_run_time(param_node):
    proc, client, service = param_node
    assert "configure failed" not in proc.output()  # started with track_background: [] (none)
    assert set_parameter(client, service, "track_background", "wall, floor")[0]
    assert set_parameter(client, service, "selection_threshold", 0.5)[0]
    assert set_parameter(client, service, "dense_variant", "clearclip")[0]
    assert set_parameter(client, service, "score_threshold", 0.99)[0]
    client.clear()
    assert outputs_for(client, 77)
    seg = client.wait_for("segmentation", lambda m: m.header.stamp.sec == 77, 1.0)
    assert sum(seg.class_areas) < 0.5  # with a 0.99 threshold most pixels of a random-init model are unlabelled


def test_corrupt_mismatched_and_wrong_checksum_models_are_refused(tmp_path, monkeypatch):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a checkpoint" * 100)
    proc = start_node(tmp_path, name="ovseg_bad1", namespace="bad1",
                      params={"clip_model": f"ovseg-demo-vit:{corrupt}"})
    assert wait_until(lambda: not proc.alive(), 60)
    assert proc.stop() == 1
    assert "cannot load CLIP" in proc.output()

    from ovseg_ros.core.registry import ModelError, load_clip, models_dirs

    demo = next(d / "demo" / "ovseg-demo-clip.safetensors" for d in models_dirs()
                if (d / "demo" / "ovseg-demo-clip.safetensors").is_file())
    with pytest.raises(ModelError, match="cannot load CLIP"):
        load_clip(f"ViT-B-32:{demo}")  # a checkpoint of another architecture

    models = tmp_path / "models"
    models.mkdir()
    (models / "weights.safetensors").write_bytes(demo.read_bytes()[:1000])
    good_sum = hashlib.sha256(demo.read_bytes()).hexdigest()
    (models / "manifest.yaml").write_text(
        "models:\n  tampered:\n    kind: clip\n    arch: ovseg-demo-vit\n    file: weights.safetensors\n"
        f"    sha256: {good_sum}\n    license: test\n")
    monkeypatch.setenv("OVSEG_MODELS_DIR", str(models))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_clip("tampered")
    with pytest.raises(ModelError, match="is a clip model"):
        from ovseg_ros.core.registry import load_sam

        load_sam("tampered")
