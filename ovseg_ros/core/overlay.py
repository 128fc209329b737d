"""Colour overlays of label maps for rviz and the CLI: a fixed palette, so a class keeps its colour."""

from __future__ import annotations

import cv2
import numpy as np

from .vocabulary import UNLABELLED


def palette(count: int) -> np.ndarray:
    """(count, 3) uint8 RGB colours, well spread in hue, the same for the same index every time."""
    index = np.arange(count)
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours apart
    sat = 0.65 + 0.35 * ((index // 7) % 2)
    val = 0.95 - 0.25 * ((index // 3) % 2)
    hsv = np.stack([hue * 179, sat * 255, val * 255], axis=1).astype(np.uint8).reshape(-1, 1, 3)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).reshape(-1, 3)


def colourise(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) RGB; UNLABELLED pixels are black."""
    lut = np.zeros((65536, 3), dtype=np.uint8)
    lut[:num_classes] = palette(num_classes)
    lut[UNLABELLED] = 0
    return lut[labels]


def blend(image_rgb: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5,
          names: list[str] | None = None, class_ids: list[int] | None = None,
          class_areas: list[float] | None = None) -> np.ndarray:
    """Colour blend of the labels over the image, region outlines, and a legend of the classes present (largest
    area first when the areas are given)."""
    colours = colourise(labels, num_classes)
    out = cv2.addWeighted(image_rgb, 1.0 - alpha, colours, alpha, 0.0)
    unlabelled = labels == UNLABELLED
    out[unlabelled] = image_rgb[unlabelled]
    edges = cv2.morphologyEx(labels.astype(np.uint16), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = (255, 255, 255)
    if names and class_ids:
        ids = list(class_ids)
        if class_areas is not None:
            ids = [i for _, i in sorted(zip(class_areas, class_ids, strict=True), key=lambda pair: -pair[0])]
        draw_legend(out, [names[i] for i in ids], palette(num_classes)[ids])
    return out


def draw_legend(image: np.ndarray, names: list[str], colours: np.ndarray, max_rows: int = 12) -> None:
    """One row per class down the left edge; as many rows as fit (at most max_rows), then "+N more"."""
    scale = max(0.35, min(image.shape[:2]) / 900)
    row_h = int(22 * scale / 0.5)
    fit = max(1, min(max_rows, (image.shape[0] - 6) // row_h))
    shown = fit if len(names) <= fit else fit - 1  # keep the last row for the count of the rest
    rows = list(zip(names[:shown], colours[:shown], strict=True))
    if len(names) > shown:
        rows.append((f"+{len(names) - shown} more", None))
    for row, (name, colour) in enumerate(rows):
        y = 6 + row * row_h
        if colour is not None:
            cv2.rectangle(image, (6, y), (6 + row_h - 4, y + row_h - 4), tuple(int(c) for c in colour), -1)
        cv2.putText(image, name, (10 + row_h, y + row_h - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3,
                    cv2.LINE_AA)
        cv2.putText(image, name, (10 + row_h, y + row_h - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)


def draw_object_names(image: np.ndarray, objects: list[tuple[int, str, np.ndarray]]) -> None:
    """Each tracked object's "#id label" just above its box (id, label, (4,) x1 y1 x2 y2), in place, so a viewer
    sees the predicted name next to the object, not only in the legend; id 0 (not published yet): the label."""
    scale = max(0.4, min(image.shape[:2]) / 800)
    for track_id, label, box in objects:
        x1, y1 = int(box[0]), int(box[1])
        anchor = (max(2, x1), max(int(14 * scale / 0.4), y1 - 4))
        text = f"#{track_id} {label}" if track_id else label
        cv2.putText(image, text, anchor, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(image, text, anchor, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def draw_prompt_answers(image_rgb: np.ndarray, answers, prompts) -> np.ndarray:
    """Prompt results for rviz: each mask tinted and outlined, its prompt drawn, its label written."""
    out = image_rgb.copy()
    colours = palette(max(1, len(answers)))
    for index, (answer, prompt) in enumerate(zip(answers, prompts, strict=True)):
        colour = tuple(int(c) for c in colours[index])
        mask = answer.mask.astype(np.uint8)
        tint = out.copy()
        tint[mask > 0] = colours[index]
        out = cv2.addWeighted(out, 0.55, tint, 0.45, 0.0)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 2)
        if prompt.box is not None:
            x1, y1, x2, y2 = (int(v) for v in prompt.box)
            cv2.rectangle(out, (x1, y1), (x2, y2), colour, 1)
        for (x, y), label in zip(prompt.points, prompt.point_labels, strict=True):
            cv2.circle(out, (int(x), int(y)), 5, (0, 255, 0) if label == 1 else (255, 0, 0), -1)
        ys, xs = np.nonzero(mask)
        anchor = (int(xs.min()), max(12, int(ys.min()) - 4)) if len(xs) else (6, 18 + 18 * index)
        text = f"{answer.labels[0]} {answer.label_scores[0]:.2f}"
        cv2.putText(out, text, anchor, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, anchor, cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    return out
