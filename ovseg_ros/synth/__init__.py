"""Procedural colour-by-shape world with exact labels, used to train and test the demo models."""

from ovseg_ros.synth.world import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    STUFF,
    Scene,
    generate_scene,
    generate_scenes,
    object_class_names,
    world_vocabulary,
)

__all__ = [
    "COLOURS",
    "HELD_OUT",
    "SHAPES",
    "STUFF",
    "Scene",
    "generate_scene",
    "generate_scenes",
    "object_class_names",
    "world_vocabulary",
]
