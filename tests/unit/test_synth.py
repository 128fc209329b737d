"""Tests for the synthetic world: the demo models' training and evaluation rest on these guarantees."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg_ros.synth import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    STUFF,
    generate_scene,
    generate_scenes,
    object_class_names,
    world_vocabulary,
)


def test_vocabulary_layout() -> None:
    vocab = world_vocabulary()
    assert len(COLOURS) == 8 and len(SHAPES) == 8
    assert vocab[: len(STUFF)] == list(STUFF)
    assert len(vocab) == len(STUFF) + 64 == len(set(vocab))
    assert object_class_names("all") == object_class_names()
    seen, novel = object_class_names("seen"), object_class_names("novel")
    assert len(seen) + len(novel) == 64 and not set(seen) & set(novel)
    assert set(novel) == {f"{c} {s}" for c, s in HELD_OUT}
    with pytest.raises(ValueError):
        object_class_names("bogus")


def test_held_out_coverage() -> None:
    assert len(HELD_OUT) / 64 >= 0.15
    assert {c for c, _ in HELD_OUT} == set(COLOURS)
    assert {s for _, s in HELD_OUT} == set(SHAPES)
    assert all(c in COLOURS and s in SHAPES for c, s in HELD_OUT)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_determinism(split: str) -> None:
    for seed in (0, 7, 12345):
        a = generate_scene(seed, split=split)
        b = generate_scene(seed, split=split)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()
        assert a.instance_classes == b.instance_classes and a.caption == b.caption
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert generate_scene(1).image.tobytes() != generate_scene(2).image.tobytes()


def test_train_split_never_contains_held_out() -> None:
    novel = set(object_class_names("novel"))
    for scene in generate_scenes(range(300), split="train"):
        assert not novel & set(scene.instance_classes)


def test_eval_split_has_many_novel_objects() -> None:
    novel = set(object_class_names("novel"))
    classes = [c for s in generate_scenes(range(200), split="eval") for c in s.instance_classes]
    fraction = sum(c in novel for c in classes) / len(classes)
    assert 0.35 < fraction < 0.65
    assert novel <= set(classes)  # every held-out class shows up in a modest eval set


@pytest.mark.parametrize("size", [224, (480, 640), (96, 160), (200, 120)])
def test_ground_truth_consistency(size: int | tuple[int, int]) -> None:
    h, w = (size, size) if isinstance(size, int) else size
    vocab = world_vocabulary()
    for scene in generate_scenes(range(40), size=size, split="eval"):
        assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
        assert scene.labels.shape == (h, w) and scene.labels.dtype == np.uint16
        assert scene.labels.max() < len(vocab)
        n = len(scene.instance_classes)
        assert 1 <= n <= 5 and len(scene.instance_masks) == n and scene.boxes.shape == (n, 4)
        assert scene.boxes.dtype == np.float32
        union = np.zeros((h, w), bool)
        for mask, name, box in zip(scene.instance_masks, scene.instance_classes, scene.boxes, strict=True):
            assert mask.shape == (h, w) and mask.dtype == bool and mask.any()
            assert not (union & mask).any()  # visible parts are disjoint
            union |= mask
            assert np.all(scene.labels[mask] == vocab.index(name))
            ys, xs = np.nonzero(mask)
            assert tuple(box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert name in scene.caption
        # Every pixel is labelled: objects where masks are, stuff everywhere else.
        assert np.all(scene.labels[~union] < len(STUFF))
        present = {vocab[i] for i in np.unique(scene.labels[~union])}
        assert present == set(scene.stuff_classes) and 1 <= len(present) <= 2


def test_object_count_arguments() -> None:
    for scene in generate_scenes(range(20), min_objects=3, max_objects=3):
        assert len(scene.instance_classes) == 3
    empty = generate_scene(0, min_objects=0, max_objects=0)
    assert empty.instance_masks == [] and empty.boxes.shape == (0, 4)
    assert np.all(empty.labels < len(STUFF))
    with pytest.raises(ValueError):
        generate_scene(0, split="test")


def test_every_stuff_and_shape_appears() -> None:
    scenes = list(generate_scenes(range(200), split="eval"))
    assert {s for scene in scenes for s in scene.stuff_classes} == set(STUFF)
    assert {c.split()[1] for scene in scenes for c in scene.instance_classes} == set(SHAPES)
