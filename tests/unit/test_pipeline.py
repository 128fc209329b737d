"""The ROS-free frame pipeline with the demo models: one call per batch returns everything the node publishes,
each frame computed with exactly one settings snapshot; prompts, 3D and the vocabulary through the same object."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from ovseg_ros.core.geometry import Intrinsics, PairedDepth
from ovseg_ros.core.pipeline import FrameInput, PromptRequest, build_pipeline
from ovseg_ros.core.prompt import Prompt, PromptError
from ovseg_ros.core.settings import dense_config, make_settings
from ovseg_ros.synth.world import generate_scene


@pytest.fixture(scope="module")
def pipeline():
    settings = make_settings({"vocabulary": ["grass", "water", "sky", "red circle", "blue square"],
                              "frame_cache_size": 3})
    return build_pipeline(settings, cameras=["front", "rear"])


def scene(seed: int) -> np.ndarray:
    return generate_scene(seed, size=(96, 128), split="eval").image


def depth_for(image: np.ndarray, metres: float = 1.5) -> PairedDepth:
    height, width = image.shape[:2]
    depth = np.full((height, width), metres, np.float32)
    depth[:, : width // 4] = 30.0  # beyond max_range_m: must not reach the cloud
    return PairedDepth(depth, Intrinsics(100.0, 100.0, width / 2, height / 2, width, height), "depth", 0.0)


def test_one_call_per_batch_returns_every_output_of_every_camera(pipeline):
    front, rear = scene(1), scene(2)
    outputs = pipeline.process_batch([FrameInput("front", front, (1, 0), "front-header", depth_for(front)),
                                      FrameInput("rear", rear, (1, 0), "rear-header")])
    assert [o.error for o in outputs] == ["", ""] and pipeline.last_batch == 2
    first, second = outputs
    assert first.result.labels.shape == front.shape[:2] and first.overlay.shape == front.shape
    assert first.vocabulary is pipeline.vocabulary and first.settings is pipeline.settings
    assert first.cloud is not None and len(first.cloud) == (96 * 128) - 96 * 32  # far quarter dropped
    assert np.nanmax(first.depth.depth_m) <= pipeline.settings.max_range_m
    assert first.regions and all(abs(r.centroid[2] - 1.5) < 1e-3 for r in first.regions)
    assert second.cloud is None and second.regions is None  # no depth paired with that frame
    # Each camera has its own prompt cache, with the header and depth stored with the frame.
    assert pipeline.prompters["front"].frame((1, 0)).header == "front-header"
    assert pipeline.prompters["rear"].frame((1, 0)).header == "rear-header"
    assert pipeline.prompters["front"].frame((1, 0)).depth is not None
    # One tracker per camera: each camera's tracks come from its own frames only.
    assert pipeline.trackers["front"] is not pipeline.trackers["rear"]
    front_boxes = {tuple(t.box) for t in pipeline.trackers["front"].tracks}
    rear_boxes = {tuple(t.box) for t in pipeline.trackers["rear"].tracks}
    assert front_boxes and rear_boxes and not front_boxes & rear_boxes


def test_prompts_on_a_camera_frame_get_3d_and_a_client_image_never_crosses_it(pipeline):
    image = scene(3)
    pipeline.process_batch([FrameInput("front", image, (7, 0), "camera", depth_for(image))])
    box = Prompt(box=np.array([40, 20, 90, 70], np.float32))
    on_camera = pipeline.answer_prompts(PromptRequest([box], camera="front", key=(7, 0)))
    assert on_camera.frame.header == "camera" and on_camera.places is not None
    client = pipeline.answer_prompts(PromptRequest([box], camera="front", image=scene(4), image_key=(7, 0),
                                                   image_header="client"))
    assert client.frame.header == "client" and client.places is None  # no depth for a client's image
    again = pipeline.answer_prompts(PromptRequest([box], camera="front", key=(7, 0)))
    assert again.frame.header == "camera" and np.array_equal(again.frame.image, image)
    with pytest.raises(PromptError, match="unknown camera"):
        pipeline.answer_prompts(PromptRequest([box], camera="left"))
    with pytest.raises(PromptError, match="no cached frame"):
        pipeline.answer_prompts(PromptRequest([box], camera="rear", key=(99, 0)))


def test_each_frame_is_computed_with_one_snapshot_while_settings_change_concurrently(pipeline):
    stop = threading.Event()

    def flip():
        values = [{"selection_threshold": 0.0, "score_threshold": 0.0, "publish_overlay": True},
                  {"selection_threshold": 0.5, "score_threshold": 0.2, "publish_overlay": False}]
        index = 0
        while not stop.is_set():
            pipeline.update_settings(values[index % 2])
            index += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for seed in range(12):
            output = pipeline.process_batch([FrameInput("front", scene(seed), (100 + seed, 0))])[0]
            snapshot = output.settings
            assert output.result.config == dense_config(dataclasses.asdict(snapshot))
            assert (output.overlay is not None) == snapshot.publish_overlay
    finally:
        stop.set()
        flipper.join()
        pipeline.update_settings({"selection_threshold": 0.3, "score_threshold": 0.0, "publish_overlay": True})


def test_bad_settings_are_refused_and_nothing_changes(pipeline):
    before = pipeline.settings
    with pytest.raises(ValueError, match="dense_variant"):
        pipeline.update_settings({"dense_variant": "nonsense"})
    with pytest.raises(ValueError, match="score_threshold"):
        pipeline.update_settings({"score_threshold": 2.0})
    assert pipeline.settings is before
    no_sam = build_pipeline(make_settings({"sam_model": ""}), warm_up=False)
    with pytest.raises(ValueError, match="needs"):
        no_sam.update_settings({"refinement": "sam"})
    with pytest.raises(PromptError, match="disabled"):
        no_sam.answer_prompts(PromptRequest([Prompt(box=np.array([0, 0, 4, 4], np.float32))]))


def test_a_failing_batch_is_reported_per_frame_and_the_next_batch_works(pipeline):
    bad = np.zeros((10, 10), np.uint8)  # not RGB
    outputs = pipeline.process_batch([FrameInput("front", bad, (200, 0))])
    assert outputs[0].error and outputs[0].result is None
    assert not pipeline.process_batch([FrameInput("front", scene(5), (201, 0))])[0].error


def test_a_vocabulary_change_is_persisted_before_the_swap_and_a_failed_save_changes_nothing(tmp_path):
    path = tmp_path / "vocabulary.json"
    settings = make_settings({"vocabulary_file": str(path), "sam_model": ""})
    pipeline = build_pipeline(settings, warm_up=False)
    change = pipeline.set_vocabulary(["sky", "grass"], [])
    assert change.success and change.version == 2 and path.is_file()
    assert pipeline.vocabulary.labels == ("sky", "grass")
    restarted = build_pipeline(settings, warm_up=False)  # a restart restores what the operator set
    assert restarted.vocabulary.labels == ("sky", "grass") and restarted.vocabulary.version == 2
    path.unlink()
    path.mkdir()  # a folder where the file should go: the save fails (root ignores permission bits)
    refused = pipeline.set_vocabulary(["water"], [])
    assert not refused.success and "cannot save" in refused.message and refused.version == 2
    assert pipeline.vocabulary.labels == ("sky", "grass")
    assert not pipeline.set_vocabulary([], []).success


def test_tracked_objects_keep_ids_and_follow_a_vocabulary_change():
    from ovseg_ros.core.vocabulary import Vocabulary
    from ovseg_ros.synth.sequences import render_sequence
    from ovseg_ros.synth.world import world_vocabulary

    settings = make_settings({"sam_model": "", "track_min_hits": 2})
    pipeline = build_pipeline(settings, cameras=[""], vocabulary=Vocabulary(tuple(world_vocabulary())),
                              warm_up=False)
    sequence = render_sequence(5001, frames=8, size=(160, 160), count=2, split="train", occluder=False)
    seen: dict[int, int] = {}
    for t, frame in enumerate(sequence):
        output = pipeline.process_batch([FrameInput("", frame.image, (t, 0), f"h{t}")])[0]
        assert output.object_ids.shape == frame.image.shape[:2] and output.object_ids.dtype == np.uint16
        for view in output.objects:
            assert (output.object_ids[view.mask] == view.id).mean() > 0.5  # the id image carries the tracks
            assert view.state == "confirmed" and view.label == world_vocabulary()[view.class_id]
            seen[view.id] = seen.get(view.id, 0) + 1
    assert seen and max(seen.values()) >= 5  # an object tracked through most of the sequence under one id
    found = pipeline.find_objects(pipeline.vocabulary.labels[output.objects[0].class_id], max_results=1)
    assert found.header == "h7" and len(found.objects) == 1 and -1.0 <= found.scores[0] <= 1.0
    with pytest.raises(ValueError, match="empty"):
        pipeline.find_objects("   ")
    with pytest.raises(PromptError, match="unknown camera"):
        pipeline.find_objects("red circle", camera="left")
    assert pipeline.set_vocabulary(["sky", "grass", "red circle", "blue circle"], []).success
    output = pipeline.process_batch([FrameInput("", sequence[-1].image, (99, 0))])[0]
    assert output.vocabulary.version == pipeline.vocabulary.version == 2
    assert pipeline.trackers[""].vocabulary_version == 2
    assert all(t.evidence.shape == (4,) for t in pipeline.trackers[""].tracks)  # relabelled for the new names
    assert all(v.label in ("sky", "grass", "red circle", "blue circle") for v in output.objects)
    # The camera's resolution changes: the old tracks (boxes in the old pixels) end; new ids, none reused.
    old_ids = {t.id for t in pipeline.trackers[""].tracks}
    larger = render_sequence(5001, frames=3, size=(200, 240), count=2, split="train", occluder=False)
    for t, frame in enumerate(larger):
        output = pipeline.process_batch([FrameInput("", frame.image, (200 + t, 0))])[0]
        assert not output.error and output.object_ids.shape == (200, 240)
    tracks = pipeline.trackers[""].tracks
    assert tracks and not {t.id for t in tracks} & old_ids
    assert all(t.packed_mask.shape == (200, 240) for t in tracks)


def test_every_output_of_a_frame_becomes_a_message_with_the_source_header(pipeline):
    from std_msgs.msg import Header

    from ovseg_ros.ros.image_conversions import image_to_array
    from ovseg_ros.ros.messages import frame_messages

    header = Header(frame_id="cam")
    header.stamp.sec = 42
    image = scene(8)
    pipeline.update_settings({"publish_confidence": True, "segment_everything": True})
    try:
        output = pipeline.process_batch([FrameInput("front", image, (42, 0), header, depth_for(image))])[0]
    finally:
        pipeline.update_settings({"publish_confidence": False, "segment_everything": False})
    msgs = frame_messages(output)
    from ovseg_ros.ros import vision_messages

    standard = {"detections", "detections_3d"} if vision_messages.AVAILABLE else set()  # the tests build it
    assert set(msgs) == {"labels", "segmentation", "overlay", "confidence", "labels_cloud", "labels_markers",
                         "objects", "object_ids", "objects_markers", "instances"} | standard
    for name, msg in msgs.items():
        if name.endswith("markers"):  # DELETEALL first, then one marker per class / tracked object
            assert msg.markers[0].action == msg.markers[0].DELETEALL and msg.markers[0].header.frame_id == "depth"
            assert all(m.header.stamp.sec == 42 for m in msg.markers[1:]), name
        else:
            assert msg.header.stamp.sec == 42, name
    assert len(msgs["labels_markers"].markers) > 1
    assert msgs["confidence"].encoding == "32FC1"
    assert np.array_equal(image_to_array(msgs["confidence"]), output.result.confidence)
    assert np.array_equal(image_to_array(msgs["object_ids"]), output.object_ids)
    assert [o.id for o in msgs["objects"].objects] == [v.id for v in output.objects]


def exemplar_scenes():
    """A training scene with one object of a class outside the vocabulary, and a later scene with the same
    class among others."""
    names = ("red circle", "blue square")
    first = next(s for s in (generate_scene(seed, size=224, split="train", min_objects=1, max_objects=1)
                             for seed in range(100)) if s.instance_classes[0] not in names)
    second = next(s for s in (generate_scene(seed, size=224, split="train", min_objects=1, max_objects=2)
                              for seed in range(100, 600)) if first.instance_classes[0] in s.instance_classes)
    return first, second


def test_an_example_box_becomes_a_class_recognised_on_a_new_frame_and_is_persisted(tmp_path):
    from ovseg_ros.core.pipeline import ExemplarRequest

    path = tmp_path / "vocabulary.json"
    settings = make_settings({"sam_model": "", "selection_threshold": 0.0, "vocabulary_file": str(path),
                              "vocabulary": ["grass", "water", "sky", "wall", "sand", "red circle", "blue square"]})
    pipeline = build_pipeline(settings, warm_up=False)
    first, second = exemplar_scenes()
    pipeline.process_batch([FrameInput("", first.image, (1, 0))])
    change = pipeline.set_vocabulary(list(pipeline.vocabulary.labels), [],
                                     [ExemplarRequest("my thing", box=first.boxes[0])])
    assert change.success, change.message
    assert pipeline.vocabulary.labels[-1] == "my thing" and len(pipeline.vocabulary.exemplars) == 1
    output = pipeline.process_batch([FrameInput("", second.image, (2, 0))])[0]
    mask = second.instance_masks[second.instance_classes.index(first.instance_classes[0])]
    mine = output.result.labels == pipeline.vocabulary.labels.index("my thing")
    objects = np.any(second.instance_masks, axis=0)
    inside, outside = mine[mask].mean(), mine[~objects].mean()
    print(f"object pixels labelled with the example's class {inside:.3f}, background pixels {outside:.4f}")
    assert inside > 0.6 and outside < 0.05  # the object found, the background not flooded (the scene's other
    # object has no class of its own in this vocabulary, so it may take the example's in part)
    restarted = build_pipeline(settings, warm_up=False)  # the example survives a restart
    assert restarted.vocabulary.exemplars == pipeline.vocabulary.exemplars
    assert restarted.prepared.text_embeddings.shape[0] == len(restarted.vocabulary) + 1
    kept = pipeline.set_vocabulary(["sky", "my thing"], [])
    assert kept.success and len(pipeline.vocabulary.exemplars) == 1  # kept for the labels that remain
    renamed = pipeline.set_vocabulary(["sky", "My Thing;gadget"], [])  # a synonym added, case changed
    assert renamed.success and [e.label for e in pipeline.vocabulary.exemplars] == ["My Thing;gadget"]
    assert pipeline.set_vocabulary(["sky", "my thing"], [], clear_exemplars=True).success
    assert pipeline.vocabulary.exemplars == ()


@pytest.mark.parametrize("box, reason", [
    ([-5, 0, 10, 10], "leaves"), ([10, 10, 5, 20], "empty"), ([0, 0, float("nan"), 4], "finite"),
    ([10, 10, 13, 40], "at least 8x8"),
])
def test_bad_example_boxes_are_refused_with_the_reason(pipeline, box, reason):
    from ovseg_ros.core.pipeline import ExemplarRequest

    pipeline.process_batch([FrameInput("front", scene(9), (300, 0))])
    before = pipeline.vocabulary
    change = pipeline.set_vocabulary(list(before.labels), [], [ExemplarRequest("x", box=np.array(box), camera="front")])
    assert not change.success and reason in change.message and pipeline.vocabulary is before
    unknown = pipeline.set_vocabulary(list(before.labels), [], [ExemplarRequest("x", box=np.array([0, 0, 4, 4]),
                                                                                camera="front", key=(1234, 0))])
    assert not unknown.success and "stamp" in unknown.message


def test_an_example_is_scaled_against_the_vocabulary_it_joins_not_the_one_before():
    """The same request on the same frame gives the same example, whatever vocabulary was in force before;
    an example too small to stand for an object is refused."""
    from ovseg_ros.core.pipeline import ExemplarRequest

    first, _ = exemplar_scenes()
    labels = ["grass", "water", "sky", "wall", "sand"]
    made = []
    for before in (["sky", "grass"], labels + ["red circle", "blue square"]):
        pipeline = build_pipeline(make_settings({"sam_model": "", "selection_threshold": 0.0, "vocabulary": before}),
                                  warm_up=False)
        pipeline.process_batch([FrameInput("", first.image, (1, 0))])
        change = pipeline.set_vocabulary(labels, [], [ExemplarRequest("my thing", box=first.boxes[0])])
        assert change.success, change.message
        made.append(np.array(pipeline.vocabulary.exemplars[0].embedding))
    np.testing.assert_allclose(made[0], made[1], atol=1e-6)
    tiny = pipeline.set_vocabulary(labels, [], [ExemplarRequest("dot", image=np.zeros((4, 30, 3), np.uint8))])
    assert not tiny.success and "exemplar_images[0]" in tiny.message and "at least 8x8" in tiny.message


def test_background_classes_are_never_tracked_objects():
    from ovseg_ros.core.vocabulary import Vocabulary
    from ovseg_ros.synth.world import STUFF, stuff_patches_image, world_vocabulary

    image = stuff_patches_image()
    labels = {}
    for background in ("", ",".join(STUFF)):
        settings = make_settings({"clip_model": "ovseg-demo-clip", "track_background": background,
                                  "track_min_hits": 1, "publish_overlay": False})
        pipe = build_pipeline(settings, vocabulary=Vocabulary(tuple(world_vocabulary())), warm_up=False)
        output = pipe.process_batch([FrameInput("", image, (1, 0))])[0]
        assert not output.tracking_error
        labels[background] = [view.label for view in output.objects]
    assert labels[""] and set(labels[""]) <= set(STUFF)  # by size alone, patches of sand and wall are objects
    assert labels[",".join(STUFF)] == []


def test_prompts_beyond_one_decoder_chunk_answer_what_they_answer_alone(pipeline):
    from ovseg_ros.core.prompt import PROMPT_CHUNK

    image = scene(6)
    pipeline.process_batch([FrameInput("front", image, (8, 0), "camera")])
    prompter = pipeline.prompters["front"]
    many = [Prompt(box=np.array([x, 10, x + 40, 80], np.float32)) for x in range(0, 80, 2)]  # 40: two chunks
    assert len(many) > PROMPT_CHUNK
    _, together = prompter.query((8, 0), many, pipeline.prepared)
    for index in (0, PROMPT_CHUNK - 1, PROMPT_CHUNK, len(many) - 1):
        _, (alone,) = prompter.query((8, 0), [many[index]], pipeline.prepared)
        assert np.array_equal(alone.mask, together[index].mask) and alone.labels == together[index].labels
        assert alone.mask_score == pytest.approx(together[index].mask_score, abs=1e-5)
