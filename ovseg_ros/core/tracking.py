"""Tracked open-vocabulary objects: stable ids, labels that do not flicker, memory bounded.

Each frame's instances are associated with the tracks by one optimal assignment (Hungarian, scipy) over a cost
that combines box overlap with the track's constant-velocity prediction, CLIP embedding similarity and label
agreement; pairs that are neither close nor alike are never matched. A track is *tentative* until seen
`min_hits` times, then *confirmed*; unmatched it becomes *lost* (kept, predicted, matchable by appearance for
`max_lost` frames: an id survives an occlusion) and is then removed. An object coming back shows a part first,
maybe not the part last seen: a lost track is looked for within the box of its last whole view, and a part that
started a new (unpublished) track is handed to the lost one. A track's label is the argmax of class evidence
accumulated over its observations (decayed), so one odd frame does not flip it; after a vocabulary change the
evidence is recomputed from the track's mean embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .dense import PreparedVocabulary
from .instances import Instance, mask_box

TENTATIVE, CONFIRMED, LOST = "tentative", "confirmed", "lost"
CUT_STRIDE = 8  # pixels between the label-map samples compared for a scene cut


@dataclass(frozen=True)
class TrackerConfig:
    min_hits: int = 2  # frames seen before a track is confirmed (published)
    max_lost: int = 30  # frames a lost track is kept (occlusions up to this long keep the id)
    max_tracks: int = 100  # memory bound; the oldest lost tracks go first
    min_similarity: float = 0.5  # embedding cosine below which two observations are never the same object
    iou_weight: float = 1.0
    embedding_weight: float = 1.0
    label_weight: float = 0.3
    max_cost: float = 1.6  # pairs costing more are left unmatched
    evidence_decay: float = 0.9  # per observation: older evidence counts less (not while hidden: an occlusion
    # does not erase what was learned about the object)
    label_margin: float = 2.0  # another label takes over only when its evidence beats the current one by this
    embedding_momentum: float = 0.8  # the track's mean embedding follows slowly
    whole_share: float = 0.9  # an observation this large (of the largest lately) shows the whole object
    full_area_decay: float = 0.99  # per observation: how fast the largest area seen lately (the decayed
    # maximum of observed areas) is forgotten
    parting_frames: int = 3  # frames a new track that came out of another's region may still be parting from it
    search_growth: float = 0.2  # per frame lost, a lost track is looked for this much (of its size) farther
    rim_share: float = 0.2  # a part of a lost object coming back lies this close to the rim of its whole box
    # (a share of the box's width from its left and right sides, of its height from its top and bottom)


@dataclass(frozen=True)
class PackedMask:
    """An (H, W) bool mask kept as the crop of its box at 1 bit per pixel: a full-frame bool mask per track
    (300 KB at 640x480) times `max_tracks` would be tens of MB held between frames, and the crop is what the
    next frame's instance extraction needs (`Tracker.expected_masks`)."""

    bits: np.ndarray  # np.packbits of the flattened crop
    shape: tuple[int, int]  # (H, W) of the frame
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 of the crop (pixels, exclusive right/bottom)
    area: int  # True pixels

    @classmethod
    def of(cls, mask: np.ndarray, box: np.ndarray | None = None) -> PackedMask:
        """`box` (x1, y1, x2, y2), when known, must hold every True pixel; without it the mask's own box."""
        height, width = mask.shape
        if box is None:
            box = mask_box(mask) if mask.any() else np.zeros(4)
        x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x2, y2 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
        x2, y2 = max(x2, x1), max(y2, y1)
        crop = mask[y1:y2, x1:x2]
        return cls(np.packbits(crop.reshape(-1)), (height, width), (x1, y1, x2, y2), int(np.count_nonzero(crop)))

    def crop(self) -> np.ndarray:
        """(y2 - y1, x2 - x1) bool: the mask within its box."""
        x1, y1, x2, y2 = self.box
        return np.unpackbits(self.bits, count=(y2 - y1) * (x2 - x1)).reshape(y2 - y1, x2 - x1).view(bool)

    def overlap(self, mask: np.ndarray) -> int:
        """Pixels of an (H, W) bool mask that are also in this one."""
        x1, y1, x2, y2 = self.box
        return int(np.count_nonzero(self.crop() & mask[y1:y2, x1:x2]))

    def unpack(self) -> np.ndarray:
        """(H, W) bool."""
        mask = np.zeros(self.shape, bool)
        x1, y1, x2, y2 = self.box
        mask[y1:y2, x1:x2] = self.crop()
        return mask


@dataclass
class Track:
    id: int
    box: np.ndarray  # (4,) last box (pixels)
    packed_mask: PackedMask  # the last mask, 1 bit per pixel (up to max_tracks of them are kept)
    embedding: torch.Tensor  # (D,) normalised running mean
    evidence: torch.Tensor  # (C,) decayed sum of class probabilities
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))  # box centre px / frame
    state: str = TENTATIVE
    hits: int = 1
    age: int = 1  # frames since the track started
    lost_frames: int = 0
    score: float = 0.0  # mean class probability of its last observation
    centroid: np.ndarray | None = None
    extent: np.ndarray | None = None
    visible: bool = True  # observed in the latest frame
    label_id: int = -1  # the published label: the evidence's argmax, with hysteresis (see TrackerConfig)
    full_box: np.ndarray | None = None  # (4,) box of the last observation that showed the whole object
    full_area: float = 0.0  # decayed maximum of observed areas (pixels): an object moving away can shrink
    full_age: int = 1  # the track's age at that observation (age counts every frame since the track started)
    parent: int = 0  # the track whose region this one came out of (0: none), while the two are still parting

    def __post_init__(self) -> None:
        if self.label_id < 0:
            self.label_id = int(self.evidence.argmax())
        if self.full_box is None:
            self.full_box = self.box
            self.full_area = float(self.packed_mask.area)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, the last mask."""
        return self.packed_mask.unpack()

    @mask.setter
    def mask(self, mask: np.ndarray) -> None:
        self.packed_mask = PackedMask.of(mask)

    def forget_whole_view(self) -> None:
        """The latest observation is the whole object: what was seen before included another one."""
        self.full_box, self.full_area, self.full_age = self.box, float(self.packed_mask.area), self.age
        self.velocity = np.zeros(2, np.float32)

    def update_label(self, margin: float) -> None:
        best = int(self.evidence.argmax())
        if best != self.label_id and self.evidence[best] > margin * self.evidence[self.label_id]:
            self.label_id = best

    def label_scores(self, k: int) -> tuple[list[int], list[float]]:
        """The label first, then the other top classes, with their share of the accumulated evidence."""
        share = self.evidence / self.evidence.sum().clamp(min=1e-9)
        ids = [self.label_id] + [int(i) for i in share.topk(min(k, len(share))).indices if int(i) != self.label_id]
        ids = ids[:k]
        return ids, [float(share[i]) for i in ids]

    def predicted_box(self, horizon: int = 5, full: bool = False) -> np.ndarray:
        """Constant velocity for a few frames at most: an object hidden for long is looked for where it was
        last going, not extrapolated across the image (the search area grows instead, see `_associate`).
        `full`: where the whole object is, from its last whole view, rather than its last (maybe partly hidden)
        observation."""
        frames = (self.age - self.full_age if full else self.lost_frames) + 1
        shift = self.velocity * min(frames, horizon)
        return (self.full_box if full else self.box) + np.concatenate([shift, shift]).astype(np.float32)


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes -> (N, M) intersection areas."""
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_containment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes -> (N, M) share of each b inside each a."""
    return box_intersection(a, b) / np.maximum(box_area(b), 1e-9)[None, :]


def box_at_border(a: np.ndarray, b: np.ndarray, tolerance: float) -> np.ndarray:
    """(N, 4) x (M, 4) boxes -> (N, M) whether each b reaches to within `tolerance` of one of a's sides (a share
    of a's width for its left and right sides, of its height for its top and bottom)."""
    width, height = (a[:, 2] - a[:, 0])[:, None], (a[:, 3] - a[:, 1])[:, None]
    return ((b[None, :, 0] - a[:, None, 0] <= tolerance * width) | (a[:, None, 2] - b[None, :, 2] <= tolerance * width)
            | (b[None, :, 1] - a[:, None, 1] <= tolerance * height)
            | (a[:, None, 3] - b[None, :, 3] <= tolerance * height))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes -> (N, M) IoU."""
    inter = box_intersection(a, b)
    return inter / np.maximum(box_area(a)[:, None] + box_area(b)[None, :] - inter, 1e-9)


class Tracker:
    """Per-camera tracker; `update` once per frame with that frame's instances."""

    def __init__(self, config: TrackerConfig = TrackerConfig()) -> None:
        self.config = config
        self.tracks: list[Track] = []
        self.vocabulary_version = 0  # the vocabulary the tracks' evidence is over
        self.prepared: PreparedVocabulary | None = None  # that vocabulary (names and text for queries)
        self._next_id = 1
        self.frame_shape: tuple[int, int] | None = None  # (H, W) of the frames the tracks were seen in
        self._last_labels: tuple[int, np.ndarray] | None = None  # (vocabulary version, sampled label map)

    def sync_frame(self, labels: np.ndarray, vocabulary_version: int, scene_cut_share: float = 0.0) -> bool:
        """Before an update with a new frame: end every track when the frame cannot continue the last one.

        Either the camera's resolution changed (the tracks' boxes and masks are in the old frame's pixels and
        cannot be matched by place), or the scene cut: more than `scene_cut_share` of the label map (sampled every
        `CUT_STRIDE` pixels) changed class since the last frame of the same vocabulary. A track carried over a cut
        would give an unrelated object a remembered name (a cyan star called the cyan cross of the scene before).
        Ids are not given out again soon: the counter goes on. Returns whether the tracks were ended."""
        sample = labels[::CUT_STRIDE, ::CUT_STRIDE].copy()
        last, self._last_labels = self._last_labels, (vocabulary_version, sample)
        resized = self.frame_shape is not None and tuple(labels.shape) != self.frame_shape
        self.frame_shape = tuple(labels.shape)
        cut = (not resized and scene_cut_share > 0 and last is not None and last[0] == vocabulary_version
               and last[1].shape == sample.shape and float((last[1] != sample).mean()) > scene_cut_share)
        if resized or cut:
            self.tracks = []
        return resized or cut

    def sync_vocabulary(self, prepared: PreparedVocabulary, logit_scale: float) -> None:
        """Before an update with a frame of another vocabulary: relabel every track for it."""
        if prepared.version != self.vocabulary_version:
            self.relabel(prepared, logit_scale)
            self.vocabulary_version = prepared.version
        self.prepared = prepared

    def update(self, instances: list[Instance]) -> list[Track]:
        """Associate, update, create, age and prune; returns the tracks to publish (confirmed, seen now)."""
        cfg = self.config
        matches, unmatched = self._associate(instances)
        last_masks = {self.tracks[t].id: self.tracks[t].packed_mask for t, _ in matches}
        matched_tracks = set()
        for track_index, instance_index in matches:
            self._observe(self.tracks[track_index], instances[instance_index])
            matched_tracks.add(track_index)
        for index, track in enumerate(self.tracks):
            if index not in matched_tracks:
                track.visible = False
                track.lost_frames += 1
                track.age += 1
                if track.state == CONFIRMED or track.state == LOST:
                    track.state = LOST
        started = [self._start(instances[index]) for index in unmatched]
        self._note_parting(last_masks, [(self.tracks[t], instances[i]) for t, i in matches]
                           + list(zip(started, (instances[i] for i in unmatched), strict=True)))
        self.tracks += started
        # Tentative tracks that miss a frame are noise; lost tracks are kept for max_lost frames.
        self.tracks = [t for t in self.tracks if (t.visible or t.state == LOST) and t.lost_frames <= cfg.max_lost]
        if len(self.tracks) > cfg.max_tracks:
            self.tracks.sort(key=lambda t: (t.visible, -t.lost_frames, t.hits), reverse=True)
            del self.tracks[cfg.max_tracks:]
        return self.published()

    def _note_parting(self, last_masks: dict[int, PackedMask], observed: list[tuple[Track, Instance]]) -> None:
        """Objects merged in the label map part over a few frames: a new track comes out of a seen track's last
        mask (most of its pixels were that track's), then grows into it for a frame or two. While it does, the
        older track's whole view is what it shows now, not the merged region of before: that region would be
        searched for it once it is lost, and the other object, or one like it, found there.
        `last_masks`: track id -> its mask before this frame, for the tracks seen in this frame; `observed`: the
        tracks seen (or started) in this frame with their instances."""
        seen = {track.id: track for track, _ in observed}
        for track, instance in observed:
            if track.hits == 1:  # started in this frame
                track.parent = next((parent for parent, mask in last_masks.items()
                                     if mask.overlap(instance.mask) >= 0.5 * instance.area), 0)
            if not track.parent:
                continue
            if track.hits > 1 + self.config.parting_frames or track.parent not in last_masks:
                track.parent = 0
            elif last_masks[track.parent].overlap(instance.mask) >= 0.2 * last_masks[track.parent].area:
                seen[track.parent].forget_whole_view()

    def expected_masks(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """(box (4,) int, crop (y2 - y1, x2 - x1) bool, label) of where each confirmed track seen in the last
        frame should be now: its last mask moved by its velocity (the box may reach past the frame). Instance
        extraction uses them to keep apart objects that touch."""
        expected = []
        for track in self.tracks:
            if track.state == CONFIRMED and track.visible:
                dx, dy = (int(round(float(v))) for v in track.velocity)
                box = np.array(track.packed_mask.box) + np.array([dx, dy, dx, dy])
                expected.append((box, track.packed_mask.crop(), track.label_id))
        return expected

    def published(self) -> list[Track]:
        return [t for t in self.tracks if t.state == CONFIRMED and t.visible]

    def relabel(self, prepared: PreparedVocabulary, logit_scale: float) -> None:
        """A new vocabulary: each track's evidence recomputed from its mean embedding (weight = its hits)."""
        if not self.tracks:
            return
        embeddings = torch.stack([t.embedding for t in self.tracks])
        probabilities = prepared.class_probabilities(embeddings, logit_scale)
        for track, probs in zip(self.tracks, probabilities, strict=True):
            track.evidence = probs * float(min(track.hits, 10))
            track.label_id = int(track.evidence.argmax())

    def _associate(self, instances: list[Instance]) -> tuple[list[tuple[int, int]], list[int]]:
        cfg = self.config
        if not self.tracks or not instances:
            return [], list(range(len(instances)))
        predicted = np.stack([t.predicted_box() for t in self.tracks])
        boxes = np.stack([i.box for i in instances])
        overlap = box_iou(predicted, boxes)  # (T, N)
        # An object coming out from behind another shows a part first, maybe not the part last seen: for a lost
        # track, an instance lying within where the whole object was, at its rim (where an occluder moving off
        # uncovers it first), overlaps it fully. Not one in the middle: another object that stands there.
        lost = np.array([t.lost_frames > 0 for t in self.tracks])
        if lost.any():
            whole = np.stack([t.predicted_box(full=True) for t in self.tracks])
            emerging = lost[:, None] & box_at_border(whole, boxes, cfg.rim_share)
            overlap = np.where(emerging, np.maximum(overlap, box_containment(whole, boxes)), overlap)
        similarity = (torch.stack([t.embedding for t in self.tracks])
                      @ torch.stack([i.embedding for i in instances]).T).numpy()
        same_label = np.array([[float(t.label_id == i.class_id) for i in instances] for t in self.tracks])
        # Where a track could plausibly be: near its prediction, the search area growing while it is lost.
        size = np.maximum(predicted[:, 2:] - predicted[:, :2], 1.0).max(axis=1)
        reach = size * (1.0 + cfg.search_growth * np.array([t.lost_frames for t in self.tracks]))
        centres_t = (predicted[:, :2] + predicted[:, 2:]) / 2
        centres_i = (boxes[:, :2] + boxes[:, 2:]) / 2
        distance = np.linalg.norm(centres_t[:, None] - centres_i[None], axis=-1)
        cost = (cfg.iou_weight * (1 - overlap) + cfg.embedding_weight * (1 - similarity)
                + cfg.label_weight * (1 - same_label))
        allowed = (similarity >= cfg.min_similarity) & ((overlap > 0) | (distance <= reach[:, None]))
        # Every pair that may not match costs the same, just above max_cost: otherwise the solver would take a
        # worse pairing of everything over a good pairing of some (a huge cost forces it to avoid that pair at
        # any price, e.g. swapping two objects' ids to keep a third unmatched).
        cost = np.where(allowed, np.minimum(cost, cfg.max_cost + 1e-5), cfg.max_cost + 1e-5)
        rows, cols = linear_sum_assignment(cost)
        matches = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if cost[r, c] <= cfg.max_cost]
        matches = self._prefer_lost(matches, cost)
        taken = {c for _, c in matches}
        return matches, [i for i in range(len(instances)) if i not in taken]

    def _prefer_lost(self, matches: list[tuple[int, int]], cost: np.ndarray) -> list[tuple[int, int]]:
        """An instance matched to a tentative track (never published) that an unmatched lost track could also
        take goes to the lost track: an object coming back into view shows a part first, which starts a new
        track that fits the next frames better than the old one does; the tentative track, unmatched, ends."""
        matched = {r for r, _ in matches}
        result = []
        for r, c in matches:
            if self.tracks[r].state == TENTATIVE:
                lost = [t for t, track in enumerate(self.tracks)
                        if track.state == LOST and t not in matched and cost[t, c] <= self.config.max_cost]
                if lost:
                    r = min(lost, key=lambda t: cost[t, c])
                    matched.add(r)
            result.append((r, c))
        return result

    def _observe(self, track: Track, instance: Instance) -> None:
        cfg = self.config
        area = float(instance.area)
        if area >= cfg.whole_share * track.full_area:  # the whole object (not a part, with the rest hidden)
            # The velocity from whole views only: a part's centre moves as the occluder moves, not the object.
            old_centre = (track.full_box[:2] + track.full_box[2:]) / 2
            new_centre = (instance.box[:2] + instance.box[2:]) / 2
            step = (new_centre - old_centre) / (track.age + 1 - track.full_age)
            track.velocity = (0.5 * track.velocity + 0.5 * step).astype(np.float32)
            track.full_box, track.full_age = instance.box, track.age + 1
        track.full_area = max(area, cfg.full_area_decay * track.full_area)
        track.box, track.packed_mask = instance.box, PackedMask.of(instance.mask, instance.box)
        track.embedding = F.normalize(cfg.embedding_momentum * track.embedding
                                      + (1 - cfg.embedding_momentum) * instance.embedding, dim=-1)
        track.evidence = track.evidence * cfg.evidence_decay + instance.probabilities
        track.update_label(cfg.label_margin)
        track.score = float(instance.probabilities.max())
        track.centroid, track.extent = instance.centroid, instance.extent
        track.hits += 1
        track.age += 1
        track.lost_frames = 0
        track.visible = True
        if track.state == LOST or (track.state == TENTATIVE and track.hits >= cfg.min_hits):
            track.state = CONFIRMED

    def _start(self, instance: Instance) -> Track:
        track = Track(id=self._next_id, box=instance.box, packed_mask=PackedMask.of(instance.mask, instance.box),
                      embedding=instance.embedding,
                      evidence=instance.probabilities.clone(), score=float(instance.probabilities.max()),
                      centroid=instance.centroid, extent=instance.extent)
        if self.config.min_hits <= 1:
            track.state = CONFIRMED
        self._next_id = self._new_id()
        return track

    def _new_id(self) -> int:
        """The next id after the current one that no live track uses; ids stay in 1..65535 (mono16 id image)."""
        used = {t.id for t in self.tracks}
        candidate = self._next_id
        while True:
            candidate = candidate % 65535 + 1
            if candidate not in used:
                return candidate
