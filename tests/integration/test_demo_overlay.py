"""The demo's picture names every object as the frame's own labels do: no track carried across the camera's
scene changes names an object after another one (the demo camera shows a new scene in every frame)."""

from __future__ import annotations

import numpy as np

from ovseg_ros.bench.accuracy import world_pipeline
from ovseg_ros.core.pipeline import FrameInput
from ovseg_ros.core.settings import make_settings
from ovseg_ros.synth.world import generate_scene

DEMO_FIRST_SEED = 900_000  # the demo's camera: frame k is scene seed + k (ovseg_ros/demo.py)


def test_overlay_names_agree_with_the_frames_labels_on_every_demo_frame():
    pipeline = world_pipeline(make_settings({"preset": "demo", "sam_model": "", "publish_overlay": True}))
    names = pipeline.vocabulary.display_names
    named_total = 0
    for k in range(8):
        image = generate_scene(DEMO_FIRST_SEED + k, size=(480, 640), split="eval").image
        output = pipeline.process_batch([FrameInput("", image, (k + 1, 0), "camera")])[0]
        assert not output.error and not output.tracking_error, (output.error, output.tracking_error)
        visible = [t for t in pipeline.trackers[""].tracks if t.visible]
        assert [(label, tuple(box)) for _, label, box in output.named_objects] == \
            [(names[t.label_id], tuple(t.box)) for t in visible]
        assert all(t.hits == 1 for t in visible), f"frame {k}: a track continued from another scene"
        for track in visible:
            ids, counts = np.unique(output.result.labels[track.mask], return_counts=True)
            frame_label = names[int(ids[counts.argmax()])]
            assert names[track.label_id] == frame_label, f"frame {k}: track #{track.id} named " \
                f"{names[track.label_id]!r} on pixels the frame labels {frame_label!r}"
        named_total += len(visible)
    assert named_total >= 8  # the demo's objects are named at all
