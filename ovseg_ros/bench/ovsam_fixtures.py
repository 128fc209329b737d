"""Inputs and array layout of the OV-SAM exactness fixtures (tests/fixtures/ovsam/, made by dev/ovsam_side_by_side.py).

Two real photographs (a 480x640 landscape and a 331x197 portrait: two different resized inputs inside the padded
1024 x 1024), a ten-class vocabulary with synonyms (COCO classes seen and unseen in training, and two that are
not COCO's), three point prompts and three box prompts per image. Point prompts carry the box the CLIP branch
pools, as the released evaluation's annotations do.
"""

from __future__ import annotations

import numpy as np

from .sed_fixtures import exactness_inputs

VOCABULARY = ("person;child;girl;boy;woman;man", "bicycle;bike", "cup;mug", "dining table;table", "robot arm",
              "cardboard box;carton", "bottle", "laptop;notebook computer", "potted plant", "floor")
# Prompts as fractions of the frame's width and height: points, each with its CLIP-branch box, and boxes.
POINTS = ((0.5, 0.5), (0.16, 0.83), (0.78, 0.25))
POINT_BOXES = ((0.3, 0.3, 0.7, 0.7), (0.02, 0.6, 0.35, 0.98), (0.6, 0.05, 0.95, 0.45))
BOXES = ((0.08, 0.12, 0.47, 0.83), (0.55, 0.42, 0.94, 0.96), (0.02, 0.02, 0.98, 0.98))
LOW_RES_STRIDE = 4  # the 256 x 256 mask logits are kept on a stride-4 grid
EMBEDDING_STRIDE = 8  # the 64 x 64 image embedding on a stride-8 grid


def fixture_images() -> dict[str, np.ndarray]:
    return exactness_inputs()


def frame_prompts(height: int, width: int) -> dict[str, np.ndarray]:
    """The prompts in frame pixels: points (3, 1, 2), their CLIP boxes (3, 4) and boxes (3, 4), float32."""
    scale_xy = np.float32([width, height])
    scale_box = np.float32([width, height, width, height])
    return {"points": (np.float32(POINTS) * scale_xy)[:, None, :],
            "point_boxes": np.float32(POINT_BOXES) * scale_box,
            "boxes": np.float32(BOXES) * scale_box}


def input_prompts(height: int, width: int, scale: tuple[float, float]) -> dict[str, np.ndarray]:
    """The same prompts in the model input's pixels (frame pixels times mmdet's scale factor)."""
    sx, sy = np.float32(scale[0]), np.float32(scale[1])
    frame = frame_prompts(height, width)
    return {"points": frame["points"] * np.float32([sx, sy]),
            "point_boxes": frame["point_boxes"] * np.float32([sx, sy, sx, sy]),
            "boxes": frame["boxes"] * np.float32([sx, sy, sx, sy])}
