"""The node stays up and answers every caller: lifecycle cycles under load, simultaneous writers and readers
while frames stream, and a clean stop on SIGINT in the middle of a stream (real processes over DDS)."""

from __future__ import annotations

import threading
import time

import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from node_processes import TEST_SAM, start_node
from std_msgs.msg import Header

from ovseg_ros.client import stream_frames
from ovseg_ros.ros.image_conversions import rgb_to_image
from ovseg_ros.ros.messages import SERVICE_QOS
from ovseg_ros.runtime import wait_until
from ovseg_ros.synth.world import generate_scene

FAILURES = ("Traceback", "InvalidHandle", "Failed to publish", "context is invalid", "KeyError")


def transition_client(client, node_path: str):
    change = client.node.create_client(ChangeState, f"{node_path}/change_state")
    get = client.node.create_client(GetState, f"{node_path}/get_state")
    assert change.wait_for_service(timeout_sec=60)

    def transition(transition_id: int) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        return client.call(change, request, 120).success

    def state() -> str:
        return client.call(get, GetState.Request(), 10).current_state.label

    return transition, state


@pytest.mark.slow
def test_lifecycle_cycles_under_frames_and_prompts_never_take_the_node_down(tmp_path, make_client):
    from ovseg_interfaces.srv import SegmentPrompt

    proc = start_node(tmp_path, name="cycles", namespace="cycles", params={"sam_model": TEST_SAM})
    client = make_client("/cycles")
    prompts = client.node.create_client(SegmentPrompt, "/cycles/segment_prompt")
    try:
        assert client.wait_ready(90), proc.output()
        transition, state = transition_client(client, "/cycles/cycles")
        scene = generate_scene(7, size=(120, 160), split="eval")
        request = SegmentPrompt.Request()
        request.image = rgb_to_image(scene.image, Header(frame_id="cam"))
        request.boxes = [10.0, 10.0, 80.0, 90.0]
        answered, stop = [], threading.Event()

        def prompt_loop() -> None:  # a prompt every 0.3 s, whatever the state; every one must be answered
            while not stop.is_set():
                future = prompts.call_async(request)
                answered.append(future)
                stop.wait(0.3)

        prompter = threading.Thread(target=prompt_loop, daemon=True)
        with stream_frames(client, 10.0, size=(120, 160)):
            prompter.start()
            for repetition in range(5):
                for _ in range(5):
                    assert transition(Transition.TRANSITION_DEACTIVATE) and state() == "inactive"
                    assert transition(Transition.TRANSITION_ACTIVATE) and state() == "active"
                    assert proc.alive(), proc.output()[-3000:]
                for _ in range(3):
                    assert transition(Transition.TRANSITION_DEACTIVATE)
                    assert transition(Transition.TRANSITION_CLEANUP) and state() == "unconfigured"
                    assert transition(Transition.TRANSITION_CONFIGURE) and state() == "inactive"
                    assert transition(Transition.TRANSITION_ACTIVATE) and state() == "active"
                    assert proc.alive(), proc.output()[-3000:]
                client.clear("segmentation")
                assert client.wait_for("segmentation", timeout=30) is not None, f"no output after repetition " \
                    f"{repetition}: " + proc.output()[-3000:]
            stop.set()
            prompter.join(5)
        assert wait_until(lambda: all(f.done() for f in answered), 60), \
            f"{sum(not f.done() for f in answered)} of {len(answered)} prompts unanswered"
        results = [f.result() for f in answered]
        assert sum(r.success for r in results) >= 5
        # While unconfigured (the cycles spend most of their time configuring) a prompt is refused with why.
        reasons = {r.message for r in results if not r.success}
        assert reasons <= {"no model is configured (the node is unconfigured)"}, reasons
        assert client.get_vocabulary().vocabulary_version >= 1
    finally:
        code = proc.stop()
    output = proc.output()
    assert code == 0, output[-3000:]
    assert not [line for line in output.splitlines() if any(f in line for f in FAILURES)], output[-5000:]


def test_simultaneous_writers_are_answered_in_order_and_readers_at_once_while_frames_stream(tmp_path,
                                                                                            make_client):
    from ovseg_interfaces.srv import GetVocabulary, SetVocabulary

    proc = start_node(tmp_path, name="callers", namespace="callers", params={"preset": "demo"})
    client = make_client("/callers")
    try:
        assert client.wait_ready(90), proc.output()
        transition, state = transition_client(client, "/callers/callers")
        first = client.get_vocabulary().vocabulary_version
        # Callers keep up to 100 answers (SERVICE_QOS), as OvsegClient's do. With rclpy's default depth of 10,
        # 50 readers answered in one burst got only 11-47 answers: every client's reader sees every answer of the
        # service, and keeps the last 10.
        writers = [client.node.create_client(SetVocabulary, "/callers/set_vocabulary", qos_profile=SERVICE_QOS)
                   for _ in range(50)]
        readers = [client.node.create_client(GetVocabulary, "/callers/get_vocabulary", qos_profile=SERVICE_QOS)
                   for _ in range(50)]
        assert all(c.wait_for_service(timeout_sec=30) for c in writers + readers)
        with stream_frames(client, 20.0, size=(240, 320)):
            time.sleep(1.0)
            writes = [w.call_async(SetVocabulary.Request(labels=["grass", "sky", f"thing {i}"]))
                      for i, w in enumerate(writers)]
            assert wait_until(lambda: all(f.done() for f in writes), 120), \
                f"{sum(f.done() for f in writes)} of 50 writes answered"
            reads = [r.call_async(GetVocabulary.Request()) for r in readers]
            assert wait_until(lambda: all(f.done() for f in reads), 30), \
                f"{sum(f.done() for f in reads)} of {len(reads)} reads answered"
            assert state() == "active"
        answers = [f.result() for f in writes]
        assert all(a.success for a in answers), [a.message for a in answers if not a.success]
        # Each write produced its own version, one after the other.
        assert sorted(a.vocabulary_version for a in answers) == list(range(first + 1, first + 51))
        last = max(answers, key=lambda a: a.vocabulary_version)
        assert all(f.result().vocabulary_version == last.vocabulary_version for f in reads)
        assert client.wait_for("segmentation", lambda m: m.vocabulary_version == last.vocabulary_version, 30)
    finally:
        code = proc.stop()
    assert code == 0, proc.output()[-3000:]


def test_sigint_in_the_middle_of_a_stream_stops_the_worker_before_the_context(tmp_path, make_client):
    proc = start_node(tmp_path, name="sigint", namespace="sigint")
    client = make_client("/sigint")
    assert client.wait_ready(90), proc.output()
    with stream_frames(client, 30.0, size=(240, 320)):
        assert client.wait_for("segmentation", timeout=30) is not None, proc.output()
        time.sleep(1.0)
        code = proc.stop(timeout=60)
    output = proc.output()
    assert code == 0, output[-3000:]
    assert not [line for line in output.splitlines() if any(f in line for f in FAILURES)], output[-5000:]
