"""Synthetic sequences with true identities: objects that move, enter, leave and pass behind each other.

A static camera over one background; each object has a class (colour + shape), a size, a start frame, a
position and a velocity, and a depth order. Every frame comes with the true object id of every pixel (0 =
none), so id switches, IDF1, MOTA and label flicker can be measured exactly. `occluder=True` adds one large
object that crosses in front of another and hides it completely for a number of frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .world import _VOCAB_INDEX, COLOURS, _background, _noise, _pick_pair, _shape_mask


@dataclass
class SequenceObject:
    id: int
    name: str  # "red circle"
    radius: float
    start: np.ndarray  # (2,) centre at frame `first`
    velocity: np.ndarray  # (2,) pixels per frame
    first: int  # first frame it exists in
    last: int  # last frame it exists in
    angle: float
    layer: int  # higher = in front
    colour: np.ndarray  # (3,) RGB


@dataclass
class SequenceFrame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint16 world ids
    ids: np.ndarray  # (H, W) uint16 true object id (0 = background)
    names: dict[int, str]  # object id -> class name, for the objects visible in this frame


def make_objects(seed: int, frames: int, size: tuple[int, int], count: int, split: str = "train",
                 occluder: bool = True, hidden_frames: int = 8) -> list[SequenceObject]:
    """The objects of one sequence; with `occluder`, object 1 is hidden by a larger object crossing in front
    of it for about `hidden_frames` frames in the middle of the sequence."""
    rng = np.random.default_rng(seed)
    height, width = size
    short = min(height, width)
    objects = []
    for index in range(count):
        colour, shape = _pick_pair(rng, split)
        radius = float(rng.uniform(0.10, 0.16) * short)  # the world's typical sizes
        start = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
        velocity = rng.uniform(-1.0, 1.0, 2) * short * 0.012
        late = index == count - 1 and frames >= 4  # the last object enters during the sequence
        first = int(rng.integers(frames // 4, frames // 2)) if late else 0
        objects.append(SequenceObject(index + 1, f"{colour} {shape}", radius, start, velocity, first, frames - 1,
                                      float(rng.uniform(0, 2 * np.pi)), index, _jittered(rng, colour)))
    if occluder and objects:
        target = objects[0]
        target.velocity = np.zeros(2)
        target.start = np.array([width / 2, height / 2])
        colour, shape = _pick_pair(rng, split)
        radius = target.radius * 1.8
        middle = frames // 2
        speed = 2 * (radius - target.radius) / max(hidden_frames, 1)  # fully covered for ~hidden_frames frames
        start = np.array([width / 2 - speed * middle, height / 2])
        objects.append(SequenceObject(len(objects) + 1, f"{colour} {shape}", radius, start, np.array([speed, 0.0]),
                                      0, frames - 1, 0.0, 100, _jittered(rng, colour)))
        objects[-1].name = f"{colour} circle"  # a disc covers the target wholly while it passes
    return objects


def _jittered(rng: np.random.Generator, colour: str) -> np.ndarray:
    return np.clip(np.array(COLOURS[colour]) + rng.integers(-18, 19, 3), 0, 255).astype(np.float32)


def render_sequence(seed: int, frames: int = 40, size: tuple[int, int] = (224, 224), count: int = 4,
                    split: str = "train", occluder: bool = True, hidden_frames: int = 8) -> list[SequenceFrame]:
    """Render a whole sequence (deterministic for its arguments)."""
    rng = np.random.default_rng(seed + 7_000_001)
    height, width = size
    background, stuff_labels, _ = _background(rng, height, width)
    objects = make_objects(seed, frames, size, count, split, occluder, hidden_frames)
    out = []
    for t in range(frames):
        image = background.copy()
        labels = stuff_labels.copy()
        ids = np.zeros((height, width), np.uint16)
        for obj in sorted(objects, key=lambda o: o.layer):
            if not obj.first <= t <= obj.last:
                continue
            cx, cy = obj.start + obj.velocity * (t - obj.first)
            shape = obj.name.split()[1]
            mask = _shape_mask(shape, height, width, float(cx), float(cy), obj.radius, obj.angle)
            image[:, mask] = obj.colour[:, None]
            labels[mask] = _VOCAB_INDEX[obj.name]
            ids[mask] = obj.id
        image = image + _noise(np.random.default_rng(seed * 1000 + t), (3, height, width)) * np.float32(3.0)
        rgb = cv2.merge(list(np.clip(image, 0, 255).astype(np.uint8)))
        present = {int(i) for i in np.unique(ids) if i}
        out.append(SequenceFrame(rgb, labels, ids, {o.id: o.name for o in objects if o.id in present}))
    return out
