"""Object instances of one frame, from its dense label map: what the tracker associates frame to frame.

The classes named as background (`track_background`: floor, sky, walls, ...) are never objects, nor is a region
of any class larger than `max_area_fraction` of the frame (left to the label map), nor unlabelled pixels. Each
connected region of what remains (above a minimum area) is split into its connected runs of one class that hold
at least MIN_PART_SHARE of it, the other pixels (specks of other labels at a rim) joining the nearest run: touching
objects of different classes become separate instances, and an object with a few stray labels stays one. Touching
objects of the SAME class are kept apart when the tracker knows them from earlier frames (`separate_known`), and
otherwise stay merged (segment-everything separates them). Each instance gets its mask and box, the CLIP
embedding pooled under its mask from the frame's one dense pass (no second tower pass), its class probabilities
from that embedding, and with depth its 3D place.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from .dense import PreparedVocabulary, SegmentationResult
from .geometry import PairedDepth, region_centroid
from .vocabulary import UNLABELLED

MIN_PART_SHARE = 0.05  # a class's run inside a region is an object of its own from this share of the region


@dataclass
class Instance:
    mask: np.ndarray  # (H, W) bool
    box: np.ndarray  # (4,) float32 x1, y1, x2, y2 (pixels, exclusive right/bottom)
    class_id: int  # the dense map's class of the region
    score: float  # mean winning-class probability over the region
    embedding: torch.Tensor  # (D,) normalised CLIP feature pooled under the mask
    probabilities: torch.Tensor  # (C,) class probabilities of the pooled embedding
    centroid: np.ndarray | None = None  # (3,) metres in the depth frame, with depth
    extent: np.ndarray | None = None  # (3,) metres

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))


def pooled_weights(dense: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """(h, w) share of each feature cell covered by an (H, W) mask."""
    return F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], dense.shape[:2])[0, 0]


def pooled_embeddings(dense: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """(h, w, D) dense features, (P, H, W) masks -> (P, D) normalised mask-pooled features (area-weighted on the
    feature grid; an empty mask pools the whole frame rather than divide by zero)."""
    weights = F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], dense.shape[:2])[:, 0]  # (P, h, w)
    empty = weights.flatten(1).sum(1) <= 0
    if empty.any():
        weights[empty] = 1.0
    pooled = torch.einsum("phw,hwd->pd", weights.to(device=dense.device, dtype=dense.dtype), dense)
    return F.normalize(pooled.float(), dim=-1).cpu()  # small; trackers and messages work on the CPU


def extract_instances(result: SegmentationResult, prepared: PreparedVocabulary, logit_scale: float,
                      depth: PairedDepth | None = None, min_area_fraction: float = 0.002,
                      max_area_fraction: float = 0.25, max_instances: int = 64,
                      known: list[tuple[np.ndarray, np.ndarray, int]] = (),
                      background_classes: frozenset[int] = frozenset()) -> list[Instance]:
    """Object instances of one frame, largest first (at most `max_instances`); `class_id` is the dense map's
    majority class under the mask. `background_classes` are never objects (see `background_mask`); `known`:
    (box, crop, class) of where objects tracked until now should be (see `separate_known`)."""
    regions = region_masks(result.labels, background_mask(result, max_area_fraction, background_classes),
                           min_area_fraction * result.labels.size)
    if known:
        regions = separate_known(regions, result.labels, known, min_area_fraction * result.labels.size)
    regions.sort(key=lambda mask: -int(np.count_nonzero(mask)))
    masks = regions[:max_instances]
    if not masks or result.dense_features is None:
        return []
    class_ids = [majority_class(result.labels, mask) for mask in masks]
    return instances_from_masks(masks, result.dense_features, prepared, logit_scale, depth,
                                scores=[float(result.confidence[mask].mean()) for mask in masks],
                                class_ids=class_ids)


def region_masks(labels: np.ndarray, background: np.ndarray, min_area: float) -> list[np.ndarray]:
    """(H, W) labels and background -> (H, W) bool masks of the foreground's objects: each connected region of
    at least `min_area` pixels, split by class (`split_region`)."""
    count, components, stats, _ = cv2.connectedComponentsWithStats((~background).astype(np.uint8), 8)
    masks = []
    for index in range(1, count):
        x, y, w, h, area = stats[index]
        if area < min_area:
            continue
        window = (slice(y, y + h), slice(x, x + w))
        region = components[window] == index
        for part in split_region(region, labels[window], max(min_area, MIN_PART_SHARE * area)):
            mask = np.zeros(labels.shape, bool)
            mask[window] = part
            masks.append(mask)
    return masks


def majority_class(labels: np.ndarray, mask: np.ndarray) -> int:
    classes, counts = np.unique(labels[mask], return_counts=True)
    return int(classes[np.argmax(counts)])


def separate_known(regions: list[np.ndarray], labels: np.ndarray, known: list[tuple[np.ndarray, np.ndarray, int]],
                   min_area: float, min_share: float = 0.5) -> list[np.ndarray]:
    """Regions that hold two or more known objects -> one region per object. `known`: (box (4,) int, crop
    (y2 - y1, x2 - x1) bool, class) of where each tracked object should be now (its last mask moved by its
    velocity; the box may reach past the frame) and its label. Two objects of one class that touch, or that the
    dense map labels alike while they pass each other, form one region that `split_region` cannot separate. When
    at least `min_share` of each of two or more known objects lies in the region (and at least `min_area`
    pixels), its pixels go to the nearest of them, provided the labels agree: no part may be labelled as another
    of those objects and not as its own (that part is the other object covering where this one was: an occluder,
    not two objects). Objects first seen touching stay merged."""
    separated = []
    for region in regions:
        x1, y1, x2, y2 = mask_box(region).astype(int)
        inside = region[y1:y2, x1:x2]
        seeds, classes = [], []
        for box, crop, class_id in known:
            ix1, iy1, ix2, iy2 = max(box[0], x1), max(box[1], y1), min(box[2], x2), min(box[3], y2)
            if ix1 >= ix2 or iy1 >= iy2:
                continue
            seed = np.zeros(inside.shape, bool)
            seed[iy1 - y1:iy2 - y1, ix1 - x1:ix2 - x1] = crop[iy1 - box[1]:iy2 - box[1], ix1 - box[0]:ix2 - box[0]]
            seed &= inside
            area = int(np.count_nonzero(seed))
            if area >= min_area and area >= min_share * int(np.count_nonzero(crop)):
                seeds.append(seed)
                classes.append(class_id)
        parts = nearest_parts(inside, seeds) if len(seeds) >= 2 else []
        if any(np.count_nonzero(part) < min_area for part in parts):
            parts = []  # one object covers where another should be (an occluder over a still one)
        for part, class_id in zip(parts, classes if parts else [], strict=True):
            majority = majority_class(labels[y1:y2, x1:x2], part)
            if majority != class_id and majority in classes:
                parts = []
                break
        if not parts:
            separated.append(region)
            continue
        for part in parts:
            mask = np.zeros(region.shape, bool)
            mask[y1:y2, x1:x2] = part
            separated.append(mask)
    return separated


def nearest_parts(region: np.ndarray, seeds: list[np.ndarray]) -> list[np.ndarray]:
    """A region's pixels, each given to the nearest seed (a pixel in two seeds goes to the first)."""
    owner = np.zeros(region.shape, np.int32)
    for number, seed in enumerate(seeds, start=1):
        owner[seed & (owner == 0)] = number
    nearest = distance_transform_edt(owner == 0, return_distances=False, return_indices=True)
    owner = owner[nearest[0], nearest[1]]
    return [region & (owner == number) for number in range(1, len(seeds) + 1)]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool, not empty -> (4,) float32 x1, y1, x2, y2 (pixels, exclusive right/bottom)."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)


def split_region(region: np.ndarray, labels: np.ndarray, min_part: float) -> list[np.ndarray]:
    """One connected foreground region -> its objects. Touching objects of different classes form one region;
    each connected run of one class at least `min_part` pixels large is an object, and the region's other pixels
    (small patches of other labels, typical at an object's rim) join the nearest of them. A region with fewer
    than two such runs stays whole."""
    parts = []
    for class_id in np.unique(labels[region]):
        runs = (region & (labels == class_id)).astype(np.uint8)
        count, components, stats, _ = cv2.connectedComponentsWithStats(runs, 8)
        parts += [components == i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_part]
    if len(parts) < 2:
        return [region]
    return nearest_parts(region, parts)


def background_mask(result: SegmentationResult, max_area_fraction: float,
                    background_classes: frozenset[int] = frozenset()) -> np.ndarray:
    """(H, W) bool: unlabelled pixels, the pixels of `background_classes` (floor, sky, walls: what objects stand
    on or in front of, named by the user) and every region of another class larger than `max_area_fraction` of
    the frame (what was not named so)."""
    labels = result.labels
    limit = max_area_fraction * labels.size
    named = [int(c) for c in result.class_ids if int(c) in background_classes]
    background = np.isin(labels, [UNLABELLED, *named])
    areas = np.bincount(labels.ravel())
    for class_id in result.class_ids:
        if int(class_id) in background_classes or areas[class_id] <= limit:  # no region of it can be larger
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats((labels == class_id).astype(np.uint8), 8)
        for index in np.nonzero(stats[1:, cv2.CC_STAT_AREA] > limit)[0]:
            background |= components == index + 1
    return background


def object_masks(masks: list[np.ndarray], background: np.ndarray, min_area_fraction: float,
                 max_area_fraction: float, max_background: float = 0.5, max_inside: float = 0.8) -> list[np.ndarray]:
    """SAM's segment-everything masks that are objects: within the area bounds, mostly not background, and not a
    part of a larger kept mask (share inside it above `max_inside`); larger first."""
    total = background.size
    kept: list[np.ndarray] = []
    for mask in sorted(masks, key=lambda m: -int(m.sum())):
        area = int(mask.sum())
        if area == 0 or not min_area_fraction * total <= area <= max_area_fraction * total:
            continue
        if background[mask].mean() > max_background:
            continue
        if any((mask & other).sum() > max_inside * area for other in kept):
            continue
        kept.append(mask)
    return kept


def instances_from_masks(masks: list[np.ndarray], dense: torch.Tensor, prepared: PreparedVocabulary,
                         logit_scale: float, depth: PairedDepth | None = None, scores: list[float] | None = None,
                         class_ids: list[int] | None = None) -> list[Instance]:
    """Instances from object masks (the dense map's regions, or SAM's segment-everything masks): embeddings
    pooled from the frame's dense features, class probabilities, boxes and, with depth, 3D places."""
    present = [index for index, mask in enumerate(masks) if mask.any()]
    masks = [masks[i] for i in present]
    scores = [scores[i] for i in present] if scores else None
    class_ids = [class_ids[i] for i in present] if class_ids else None
    if not masks:
        return []
    stacked = np.stack(masks)
    embeddings = pooled_embeddings(dense, stacked)
    probabilities = prepared.class_probabilities(embeddings, logit_scale)
    instances = []
    for index, (mask, embedding, probs) in enumerate(zip(masks, embeddings, probabilities, strict=True)):
        box = mask_box(mask)
        place = region_centroid(mask, depth.depth_m, depth.intrinsics) if depth is not None else None
        instances.append(Instance(
            mask=mask, box=box, class_id=class_ids[index] if class_ids else int(probs.argmax()),
            score=scores[index] if scores else float(probs.max()), embedding=embedding, probabilities=probs,
            centroid=None if place is None else place[0], extent=None if place is None else place[1]))
    return instances
