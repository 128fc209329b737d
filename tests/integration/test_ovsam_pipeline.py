"""OV-SAM behind the frame pipeline (`prompt_model: ovsam-test-tiny`, seeded random weights): the factory builds
it from settings, the dense path keeps its own CLIP, and everything that asks the prompt model for masks gets
OV-SAM's -- prompts with 3D places from the paired depth, `refinement: sam`, segment everything -- in one image
pass per frame. Prompts beyond one decoder chunk answer what they answer one by one."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg_ros.core import ovsam
from ovseg_ros.core.geometry import Intrinsics, PairedDepth
from ovseg_ros.core.ovsam import OvSamPromptSegmenter
from ovseg_ros.core.pipeline import FrameInput, PromptRequest, build_pipeline
from ovseg_ros.core.prompt import PROMPT_CHUNK, Prompt
from ovseg_ros.core.settings import make_settings
from ovseg_ros.synth.world import generate_scene

pytestmark = pytest.mark.slow  # OV-SAM's image pass at 1024 x 1024: about 13 s a frame on two cores

VOCABULARY = ["grass", "sky;heaven", "red circle", "blue square", "wall"]


def test_ovsam_answers_prompts_refines_and_segments_everything_in_one_image_pass():
    settings = make_settings({"vocabulary": VOCABULARY, "prompt_model": "ovsam-test-tiny", "sam_model": "",
                              "refinement": "sam", "segment_everything": True, "everything_points_per_side": 3,
                              "track_objects": False})
    pipeline = build_pipeline(settings, cameras=[""], warm_up=False)
    prompter = pipeline.prompters[""]
    assert isinstance(prompter, OvSamPromptSegmenter)
    image = generate_scene(5, size=(96, 128), split="eval").image
    depth = PairedDepth(np.full((96, 128), 1.5, np.float32), Intrinsics(100.0, 100.0, 64.0, 48.0, 128, 96),
                        "depth", 0.0)
    (output,) = pipeline.process_batch([FrameInput("", image, (1, 0), "header", depth)])
    assert output.error == "", output.error
    assert output.result.labels.shape == (96, 128) and "sam_refinement" in output.result.timings_ms
    assert output.instances is not None and output.instances.shape == (96, 128)
    cached = prompter.frame((1, 0))
    assert isinstance(cached.sam_features, ovsam.OvSamFeatures)
    features = cached.sam_features

    prompts = [Prompt(box=np.array([10, 10, 60, 50], np.float32)),
               Prompt(points=np.array([[90.0, 30.0]], np.float32), point_labels=np.ones(1, np.int64))]
    outcome = pipeline.answer_prompts(PromptRequest(prompts, key=(1, 0)))
    assert cached.sam_features is features, "the frame's image pass is reused"
    assert len(outcome.answers) == 2 and outcome.places is not None and len(outcome.places) == 2
    names = {"grass", "sky", "red circle", "blue square", "wall"}
    for answer in outcome.answers:
        assert answer.mask.shape == (96, 128) and set(answer.labels) <= names and len(answer.labels) == 3

    many = [Prompt(box=np.array([x, 5, x + 30, 60], np.float32)) for x in range(0, 90, 2)]  # 45: two chunks
    _, together = prompter.query((1, 0), many, pipeline.prepared)
    for index in (0, PROMPT_CHUNK - 1, PROMPT_CHUNK, len(many) - 1):
        _, (alone,) = prompter.query((1, 0), [many[index]], pipeline.prepared)
        assert np.array_equal(alone.mask, together[index].mask) and alone.labels == together[index].labels
        assert alone.label_scores == pytest.approx(together[index].label_scores, abs=1e-5)


def test_class_embeddings_are_ready_when_a_vocabulary_takes_effect():
    settings = make_settings({"vocabulary": VOCABULARY, "prompt_model": "ovsam-test-tiny", "sam_model": "",
                              "track_objects": False})
    pipeline = build_pipeline(settings, cameras=["front", "rear"], warm_up=False)
    model = pipeline.prompters["front"].model
    assert pipeline.prompters["rear"].model is model  # one network for every camera
    assert tuple(pipeline.vocabulary.labels) in model._classes  # the initial vocabulary, at start
    change = pipeline.set_vocabulary(["mug;cup", "keyboard"], [])
    assert change.success, change.message
    computed = model.text_cache.computed
    assert ("mug;cup", "keyboard") in model._classes and computed >= 3
    image = generate_scene(7, size=(96, 128), split="eval").image
    pipeline.process_batch([FrameInput("front", image, (2, 0), "header")])
    outcome = pipeline.answer_prompts(PromptRequest([Prompt(box=np.array([5, 5, 70, 60], np.float32))],
                                                    camera="front", key=(2, 0)))
    assert outcome.answers[0].labels[0] in {"mug", "keyboard"} and model.text_cache.computed == computed
