"""Promptable open-vocabulary segmentation: points/boxes -> SAM masks -> open-vocabulary labels.

Open-Vocabulary SAM's zero-shot "feature crop" recipe: SAM's prompt encoder and mask decoder give the masks, and
each mask pools the frame's CLIP dense features, which are classified against the current text embeddings. The
CLIP pass is the one the dense segmenter already made for the frame, so a prompt costs only SAM's light decoder
and a pooling. Frames are cached by stamp (the last N), SAM's image embedding is computed lazily on the first
prompt unless `eager_sam` is set. Uni-OVSeg's segment-everything mode: point grid -> masks -> NMS -> labels.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from .clip_dense import ClipDenseEncoder
from .dense import PreparedVocabulary, SegmentationResult, relabel
from .geometry import PairedDepth
from .instances import pooled_embeddings

MAX_PROMPTS = 256
PROMPT_CHUNK = 32  # prompts decoded at once: SAM's decoder copies the (256, 64, 64) embedding per prompt
MAX_POINTS_PER_PROMPT = 64


class PromptError(ValueError):
    """A prompt request that cannot be answered; the message says why."""


@dataclass
class Prompt:
    """One object to segment: a box and/or points (x, y in pixels) labelled 1 (foreground) or 0 (background)."""

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: np.ndarray | None = None  # x1, y1, x2, y2


@dataclass
class PromptAnswer:
    mask: np.ndarray  # (H, W) bool
    mask_score: float  # SAM's predicted IoU
    labels: list[str]  # top-k class names, best first
    label_ids: list[int]
    label_scores: list[float]


@dataclass
class CachedFrame:
    key: tuple[int, int]
    image: np.ndarray  # (H, W, 3) uint8 RGB
    clip_dense: torch.Tensor  # (h, w, D) normalised
    header: object = None  # the source's header, returned with every answer on this frame (opaque here)
    depth: PairedDepth | None = None  # depth paired with this frame (never any for a client's image)
    sam_features: torch.Tensor | None = None
    sam_input_size: tuple[int, int] | None = None


def validate_prompts(prompts: list[Prompt], height: int, width: int) -> None:
    """Refuse what SAM would silently misread: NaN, outside the image, inverted boxes, bad labels."""
    if not prompts:
        raise PromptError("no prompts: give at least one point or box")
    if len(prompts) > MAX_PROMPTS:
        raise PromptError(f"{len(prompts)} prompts exceed the limit of {MAX_PROMPTS} per request")
    for index, prompt in enumerate(prompts):
        if len(prompt.points) == 0 and prompt.box is None:
            raise PromptError(f"prompt {index} has neither points nor a box")
        if len(prompt.points) > MAX_POINTS_PER_PROMPT:
            raise PromptError(f"prompt {index} has {len(prompt.points)} points; the limit is {MAX_POINTS_PER_PROMPT}")
        if len(prompt.points) != len(prompt.point_labels):
            raise PromptError(f"prompt {index}: {len(prompt.points)} points but {len(prompt.point_labels)} labels")
        if len(prompt.points):
            if not np.all(np.isfinite(prompt.points)):
                raise PromptError(f"prompt {index}: a point coordinate is NaN or infinite")
            xs, ys = prompt.points[:, 0], prompt.points[:, 1]
            if xs.min() < 0 or ys.min() < 0 or xs.max() > width - 1 or ys.max() > height - 1:
                raise PromptError(f"prompt {index}: a point lies outside the {width}x{height} image")
            if not np.isin(prompt.point_labels, (0, 1)).all():
                raise PromptError(f"prompt {index}: point labels must be 1 (foreground) or 0 (background)")
            if not (prompt.point_labels == 1).any() and prompt.box is None:
                raise PromptError(f"prompt {index}: only background points; add a foreground point or a box")
        if prompt.box is not None:
            box = np.asarray(prompt.box, dtype=np.float64)
            if box.shape != (4,) or not np.all(np.isfinite(box)):
                raise PromptError(f"prompt {index}: a box needs four finite numbers x1, y1, x2, y2")
            x1, y1, x2, y2 = box
            if x2 <= x1 or y2 <= y1:
                raise PromptError(f"prompt {index}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has x2<=x1 or y2<=y1")
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise PromptError(f"prompt {index}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) leaves the "
                                  f"{width}x{height} image")


def prompt_batches(prompts: list[Prompt]) -> list[tuple[tuple[bool, int], list[int]]]:
    """Prompts that decode together: those of one shape (has a box, number of points), `PROMPT_CHUNK` at a time.
    Returns ((has_box, n_points), prompt indices) per batch; usually one."""
    groups: dict[tuple[bool, int], list[int]] = collections.defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[(prompt.box is not None, len(prompt.points))].append(index)
    return [(shape, members[i:i + PROMPT_CHUNK]) for shape, members in groups.items()
            for i in range(0, len(members), PROMPT_CHUNK)]


class PromptSegmenter:
    """Answers prompts on recent frames; thread-safe (one lock around SAM's shared predictor state)."""

    def __init__(self, sam: Sam | None, encoder: ClipDenseEncoder, cache_size: int = 4, eager_sam: bool = False,
                 top_k: int = 3) -> None:
        """`sam` None: a subclass answers with a model of its own (OvSamPromptSegmenter)."""
        self.sam = sam.eval() if sam is not None else None
        self.predictor = SamPredictor(self.sam) if sam is not None else None
        self.encoder = encoder
        self.cache_size = max(1, cache_size)
        self.eager_sam = eager_sam
        self.top_k = top_k
        self._frames: collections.OrderedDict[tuple[int, int], CachedFrame] = collections.OrderedDict()
        self._lock = threading.RLock()
        self.timings_ms: dict[str, float] = {}

    def for_another_camera(self) -> PromptSegmenter:
        """A segmenter with its own frame cache (and predictor state) over the same SAM and CLIP weights, so
        one node serves several cameras with one copy of each model."""
        return PromptSegmenter(self.sam, self.encoder, self.cache_size, self.eager_sam, self.top_k)

    def prepare_vocabulary(self, vocabulary) -> None:
        """Called with each new vocabulary before it takes effect. SAM's answers are labelled from the dense
        path's embeddings, which are ready by then: nothing to do."""

    # ------------------------------------------------------------------ frames
    def add_frame(self, key: tuple[int, int], image: np.ndarray, clip_dense: torch.Tensor, header: object = None,
                  depth: PairedDepth | None = None) -> CachedFrame:
        """Cache a frame with the dense pass's CLIP features (the shared backbone pass), its header and depth."""
        frame = CachedFrame(key=key, image=image, clip_dense=clip_dense.detach(), header=header, depth=depth)
        with self._lock:
            self._frames[key] = frame
            self._frames.move_to_end(key)
            while len(self._frames) > self.cache_size:
                self._frames.popitem(last=False)
        if self.eager_sam:
            self._ensure_sam(frame)
        return frame

    def frame(self, key: tuple[int, int] | None) -> CachedFrame:
        """The cached frame with this stamp, or the newest for None; PromptError if evicted or never seen."""
        with self._lock:
            if not self._frames:
                raise PromptError("no frame cached yet: send an image with the request or wait for the camera")
            if key is None:
                return next(reversed(self._frames.values()))
            if key not in self._frames:
                stamps = ", ".join(f"{s}.{n:09d}" for s, n in self._frames)
                raise PromptError(f"no cached frame with stamp {key[0]}.{key[1]:09d} (evicted or never received); "
                                  f"cached: {stamps}")
            return self._frames[key]

    def cached_keys(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._frames)

    @torch.inference_mode()
    def _ensure_sam(self, frame: CachedFrame) -> None:
        with self._lock:
            if frame.sam_features is not None:
                return
            start = time.perf_counter()
            self.predictor.set_image(frame.image, image_format="RGB")
            frame.sam_features = self.predictor.get_image_embedding()
            frame.sam_input_size = tuple(self.predictor.input_size)
            self.timings_ms["sam_image_encoder"] = (time.perf_counter() - start) * 1000

    # ------------------------------------------------------------------ queries
    @torch.inference_mode()
    def query(self, key: tuple[int, int] | None, prompts: list[Prompt], prepared: PreparedVocabulary,
              multimask: bool = False, crop_fusion: bool = False) -> tuple[CachedFrame, list[PromptAnswer]]:
        frame = self.frame(key)
        height, width = frame.image.shape[:2]
        validate_prompts(prompts, height, width)
        self._ensure_sam(frame)
        start = time.perf_counter()
        masks = np.zeros((len(prompts), height, width), dtype=bool)
        scores = np.zeros(len(prompts), dtype=np.float32)
        for (has_box, n_points), members in prompt_batches(prompts):
            group_masks, group_scores = self._decode(frame, prompts, members, has_box, n_points, multimask)
            masks[members] = group_masks
            scores[members] = group_scores
        decode_ms = (time.perf_counter() - start) * 1000
        label_start = time.perf_counter()
        probabilities = self.classify_masks(frame, masks, prepared)
        if crop_fusion:
            probabilities = torch.sqrt(probabilities * self.classify_crops(frame.image, masks, prepared))
        answers = self._answers(masks, scores, probabilities, prepared)
        self.timings_ms.update(decode=decode_ms, recognise=(time.perf_counter() - label_start) * 1000)
        return frame, answers

    def _answers(self, masks: np.ndarray, mask_scores: np.ndarray, probabilities: torch.Tensor,
                 prepared: PreparedVocabulary) -> list[PromptAnswer]:
        """(P, H, W) masks, (P,) mask scores and (P, C) class probabilities -> one answer per prompt with its
        top-k labels."""
        names = prepared.vocabulary.display_names
        top_scores, top_ids = probabilities.topk(min(self.top_k, len(names)), dim=-1)
        answers = []
        for i in range(len(masks)):
            ids = [int(j) for j in top_ids[i]]
            answers.append(PromptAnswer(mask=masks[i], mask_score=float(mask_scores[i]),
                                        labels=[names[j] for j in ids], label_ids=ids,
                                        label_scores=[float(s) for s in top_scores[i]]))
        return answers

    def _decode(self, frame: CachedFrame, prompts: list[Prompt], members: list[int], has_box: bool, n_points: int,
                multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """SAM's prompt encoder and mask decoder on the frame's cached image embedding (what
        SamPredictor.predict_torch does, without swapping the cached embedding into the predictor's state)."""
        original = frame.image.shape[:2]
        transform, device = self.predictor.transform, self.predictor.device
        points = boxes = None
        if n_points:
            raw = np.stack([prompts[i].points for i in members]).astype(np.float32)
            coords = torch.as_tensor(transform.apply_coords(raw, original), device=device)
            labels = torch.as_tensor(np.stack([prompts[i].point_labels for i in members]), device=device)
            points = (coords, labels)
        if has_box:
            raw_boxes = np.stack([np.asarray(prompts[i].box, np.float32) for i in members])
            boxes = torch.as_tensor(transform.apply_boxes(raw_boxes, original), device=device)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, iou = self.sam.mask_decoder(image_embeddings=frame.sam_features,
                                             image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask)
        masks = self.sam.postprocess_masks(low_res, frame.sam_input_size, original) > self.sam.mask_threshold
        if multimask:  # SAM's own IoU prediction picks the best of the three
            best = iou.argmax(dim=1)
            rows = torch.arange(len(members))
            masks, iou = masks[rows, best], iou[rows, best]
        else:
            masks, iou = masks[:, 0], iou[:, 0]
        return masks.cpu().numpy(), iou.float().cpu().numpy()

    def classify_masks(self, frame: CachedFrame, masks: np.ndarray, prepared: PreparedVocabulary) -> torch.Tensor:
        """(P, H, W) masks -> (P, C) class probabilities from mask-pooled CLIP dense features."""
        return prepared.class_probabilities(pooled_embeddings(frame.clip_dense, masks), self.encoder.logit_scale)

    def classify_crops(self, image: np.ndarray, masks: np.ndarray, prepared: PreparedVocabulary) -> torch.Tensor:
        """The image-crop baseline: CLIP's global embedding of each mask's box crop (background greyed)."""
        size = self.encoder.native_size
        crops = []
        for mask in masks:
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                crops.append(np.full((size[0], size[1], 3), 127, np.uint8))
                continue
            x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            pad = int(0.1 * max(x2 - x1, y2 - y1))
            x1, y1 = max(0, x1 - pad), max(0, y1 - pad)
            x2, y2 = min(image.shape[1], x2 + pad), min(image.shape[0], y2 + pad)
            crop = image[y1:y2, x1:x2].copy()
            crop[~mask[y1:y2, x1:x2]] = (crop[~mask[y1:y2, x1:x2]] * 0.5 + 64).astype(np.uint8)
            crops.append(cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA))
        batch = torch.from_numpy(np.stack(crops)).to(self.encoder.device).permute(0, 3, 1, 2).float() / 255.0
        global_emb, _ = self.encoder.dense_features(self.encoder.normalise(batch), "plain")
        return prepared.class_probabilities(global_emb, self.encoder.logit_scale)

    # ------------------------------------------------------------------ dense refinement
    @torch.inference_mode()
    def refine_dense(self, key: tuple[int, int], labels: np.ndarray, prepared: PreparedVocabulary,
                     candidates: list[int] | None = None, min_area_fraction: float = 0.002,
                     max_regions: int = 32) -> np.ndarray:
        """SAM refinement of a dense label map: each connected region becomes a box prompt, SAM's mask replaces
        the blocky region, and the mask is labelled by pooling the frame's CLIP features under it (restricted
        to the candidate classes, e.g. those category selection kept). Larger masks are painted first."""
        frame = self.frame(key)
        height, width = labels.shape
        min_area = max(16, int(min_area_fraction * height * width))
        boxes = []
        for class_id in np.unique(labels):
            if class_id == 65535:
                continue
            count, _, stats, _ = cv2.connectedComponentsWithStats((labels == class_id).astype(np.uint8), 8)
            for x, y, w, h, area in stats[1:]:
                if area >= min_area:
                    boxes.append((area, np.array([x, y, x + w, y + h], np.float32)))
        if not boxes:
            return labels
        boxes = [box for _, box in sorted(boxes, key=lambda item: -item[0])[:max_regions]]
        _, answers = self.query(frame.key, [Prompt(box=box) for box in boxes], prepared)
        masks = np.stack([a.mask for a in answers])
        probabilities = self.classify_masks(frame, masks, prepared)
        if candidates is not None and len(candidates) < probabilities.shape[1]:
            allowed = torch.zeros(probabilities.shape[1], dtype=torch.bool)
            allowed[candidates] = True
            probabilities = probabilities.masked_fill(~allowed, 0)
        refined = labels.copy()
        order = np.argsort([-m.sum() for m in masks])
        for index in order:
            if masks[index].any():
                refined[masks[index]] = int(probabilities[index].argmax())
        return refined

    def refine_result(self, key: tuple[int, int], result: SegmentationResult, prepared: PreparedVocabulary,
                      threshold: float) -> SegmentationResult:
        """`refine_dense` applied to a dense result (statistics recomputed, timed as `sam_refinement`)."""
        start = time.perf_counter()
        labels = self.refine_dense(key, result.labels, prepared, result.selected_classes)
        refined = relabel(result, labels, prepared, threshold)
        refined.timings_ms["sam_refinement"] = (time.perf_counter() - start) * 1000
        return refined

    # ------------------------------------------------------------------ segment everything
    @torch.inference_mode()
    def segment_everything(self, key: tuple[int, int] | None, prepared: PreparedVocabulary,
                           points_per_side: int = 16, iou_threshold: float = 0.7,
                           nms_threshold: float = 0.7, min_area: int = 64) -> tuple[np.ndarray, list[PromptAnswer]]:
        """Uni-OVSeg inference: a point grid through SAM, NMS over the masks, CLIP labels for the survivors.

        Returns an instance image (H, W) uint16 (0 = none, i+1 = answer i) and the answers, largest first.
        """
        from torchvision.ops import nms

        frame = self.frame(key)
        height, width = frame.image.shape[:2]
        xs = (np.arange(points_per_side) + 0.5) * width / points_per_side
        ys = (np.arange(points_per_side) + 0.5) * height / points_per_side
        grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.float32)
        prompts = [Prompt(points=p[None], point_labels=np.ones(1, np.int64)) for p in grid]
        _, answers = self.query(frame.key, prompts, prepared, multimask=True)
        keep = [a for a in answers if a.mask_score >= iou_threshold and a.mask.sum() >= min_area]
        if not keep:
            return np.zeros((height, width), np.uint16), []
        boxes = []
        for answer in keep:
            ys_, xs_ = np.nonzero(answer.mask)
            boxes.append([xs_.min(), ys_.min(), xs_.max() + 1, ys_.max() + 1])
        order = nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor([a.mask_score for a in keep]),
                    nms_threshold)
        survivors = sorted((keep[int(i)] for i in order), key=lambda a: -int(a.mask.sum()))
        instances = np.zeros((height, width), np.uint16)
        for index, answer in enumerate(survivors):  # larger first, so smaller masks stay visible on top
            instances[answer.mask] = index + 1
        return instances, survivors
