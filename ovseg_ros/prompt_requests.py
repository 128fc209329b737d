"""SegmentPrompt request fields -> core Prompt objects, refusing inconsistent arrays with a reason."""

from __future__ import annotations

import numpy as np

from .core.prompt import MAX_PROMPTS, Prompt, PromptError


def prompts_from_request(request, height: int, width: int) -> list[Prompt]:
    """Points join prompts by `point_groups` (empty: one prompt per point); box i joins prompt i."""
    n_points = len(request.points)
    labels = np.asarray(request.point_labels, dtype=np.int64)
    if len(labels) != n_points:
        raise PromptError(f"{n_points} points but {len(labels)} point_labels: give one label per point")
    groups = np.asarray(request.point_groups, dtype=np.int64)
    if len(groups) and len(groups) != n_points:
        raise PromptError(f"{n_points} points but {len(groups)} point_groups: give one group per point or none")
    boxes = np.asarray(request.boxes, dtype=np.float32)
    if len(boxes) % 4:
        raise PromptError(f"boxes has {len(boxes)} numbers; it needs 4 per box (x1, y1, x2, y2)")
    boxes = boxes.reshape(-1, 4)
    if not len(groups):
        groups = np.arange(n_points)
    if len(groups) and groups.min() < 0:
        raise PromptError("point_groups must be >= 0")
    count = max(int(groups.max()) + 1 if len(groups) else 0, len(boxes))
    if count == 0:
        raise PromptError("no prompts: give at least one point or box")
    if count > MAX_PROMPTS:
        raise PromptError(f"{count} prompts exceed the limit of {MAX_PROMPTS} per request")
    points = np.array([[p.x, p.y] for p in request.points], dtype=np.float32).reshape(-1, 2)
    prompts = []
    for index in range(count):
        member = groups == index
        prompts.append(Prompt(points=points[member], point_labels=labels[member],
                              box=boxes[index] if index < len(boxes) else None))
    return prompts
