"""The dense open-vocabulary segmenter: one image in, a label map over the current vocabulary out.

ROS-free: the node, the command-line tool, the benchmarks and the tests all drive this object.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .clip_dense import DENSE_VARIANTS, ClipDenseEncoder
from .pamr import DEFAULT_DILATIONS, PamrAffinity
from .text_cache import TextEmbeddingCache
from .vocabulary import UNLABELLED, Vocabulary

REFINEMENTS = ("none", "guided", "sam")  # "sam" is applied by the caller that owns SAM (PromptSegmenter)
PRECISIONS = ("fp32", "bf16", "fp16")
SYNONYM_MERGES = ("max", "mean")  # synonyms as separate queries (class probability = max), or one averaged query
PAMR_DILATION_UNITS = ("frame", "input")
RESIZES = ("bilinear", "area")  # area: OpenCV INTER_AREA when shrinking (anti-aliased), bilinear when enlarging
PAMR_GUIDES = ("frame", "input")  # PAMR's colour affinities from the camera frame, or from the model input upsampled
WHOLE_IMAGE_RESIZES = ("patch", "exact")  # whole-image input: sides rounded to the patch, or exactly the scaled size
WHOLE_IMAGE_UPSAMPLES = ("direct", "via_input")  # whole-image logits: grid -> frame, or grid -> input -> frame
BELOW_THRESHOLD_LABELS = ("unlabelled", "first_class")
LONG_SIDE_MAX = 2048  # mmseg's Resize scale (2048, short side) with keep_ratio: the long side never exceeds this


def precision_autocast(device_type: str, precision: str):
    """torch.autocast for a `precision` setting: off for fp32, bf16 or fp16 otherwise."""
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass(frozen=True)
class DenseConfig:
    """How the dense pass runs; every field is a node parameter."""

    variant: str = "plain"
    input_size: int = 0  # short side the image is resized to; 0 = the tower's native size
    score_threshold: float = 0.0  # pixels whose winning class probability is below this are UNLABELLED
    class_chunk: int = 64  # classes upsampled at once; bounds memory for large vocabularies
    # Sliding windows as the training-free papers run them: window_size crops (0 = the tower's native size) every
    # window_stride pixels of the resized image; each window's per-pixel logits are averaged. 0 = whole image.
    window_stride: int = 0
    window_size: int = 0
    logit_scale: float = 0.0  # softmax temperature of the per-pixel class scores; 0 = CLIP's own (capped at 100)
    pamr_steps: int = 0  # PAMR iterations on the full-resolution scores; 0 = off
    pamr_dilations: tuple[int, ...] = DEFAULT_DILATIONS
    # "frame": dilations in the frame's pixels (the papers' code); "input": in the resized model input's pixels,
    # scaled to the frame, so the neighbourhood keeps its size relative to the patch grid at any camera resolution
    pamr_dilation_unit: str = "frame"
    # "frame": affinities from the camera frame; "input": from the normalised model input (resized, so blurred or
    # sharpened) upsampled back to the frame's size, as NACLIP's and SCLIP's released predict() does
    pamr_guide: str = "frame"
    # Whole-image inference (no windows): "patch" rounds both sides to the patch so the grid covers every pixel;
    # "exact" resizes to exactly short side input_size (the released forward_feature: remainder pixels past the
    # last whole patch are not seen by the tower)
    whole_image_resize: str = "patch"
    # Whole-image logits reach the frame "direct" (grid -> frame, SCLIP) or "via_input" (grid -> model input size
    # -> frame, NACLIP)
    whole_image_upsample: str = "direct"
    # Pixels below score_threshold: UNLABELLED, or the vocabulary's first class (a background class, as the
    # papers' configs with prob_thd do)
    below_threshold: str = "unlabelled"
    # SCLIP's area_thd: classes covering at most this share of the predicted pixels are removed and their pixels
    # take their next best class; with below_threshold first_class the first class is exempt and not counted
    area_threshold: float = 0.0
    synonym_merge: str = "max"  # "max": each synonym its own query; "mean": one averaged query per class
    resize: str = "bilinear"  # how the image is resized to the model input: "bilinear" (the papers, the demo) or
    # "area" (anti-aliased when shrinking)
    selection_threshold: float = 0.0  # DCS tau, relative to the best class; 0 disables category selection
    selection_patch_top_k: int = 6  # DCS patch level: classes in any patch's top-k join the candidates
    selection_min_classes: int = 1  # DCS never keeps fewer than this (best image-level scores)
    # Weight of log(image-level score) added to the patch logits before the patch top-k (DCP-CLIP's image-level
    # suppression). 0 by default: with the demo CLIP it removed stuff classes (README, accuracy figures).
    selection_suppression: float = 0.0
    tag_validation_top_k: int = 0  # >0: relabel a region whose label is not in its mask-pooled top-k
    refinement: str = "none"  # "none" or "guided" (edge-aware guided filter on the class maps)
    precision: str = "fp32"  # "fp32", or autocast to "bf16" (CPU matrix units) / "fp16" (CUDA)
    # SED only: its fast inference (TEST.FAST_INFERENCE with TEST.TOPK = fast_top_k); 0 = off
    fast_top_k: int = 0

    def __post_init__(self) -> None:
        if self.variant not in DENSE_VARIANTS:
            raise ValueError(f"dense variant must be one of {', '.join(DENSE_VARIANTS)}, got {self.variant!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.input_size < 0:
            raise ValueError(f"input_size must be >= 0, got {self.input_size}")
        if self.class_chunk < 1:
            raise ValueError("class_chunk must be >= 1")
        if not 0.0 <= self.selection_threshold <= 1.0:
            raise ValueError(f"selection_threshold must be in [0, 1], got {self.selection_threshold}")
        if self.window_stride < 0 or self.tag_validation_top_k < 0 or self.selection_patch_top_k < 1 \
                or self.fast_top_k < 0:
            raise ValueError("window_stride, tag_validation_top_k and fast_top_k must be >= 0, "
                             "selection_patch_top_k >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {', '.join(REFINEMENTS)}, got {self.refinement!r}")
        if self.window_size < 0 or self.logit_scale < 0 or self.pamr_steps < 0:
            raise ValueError("window_size, logit_scale and pamr_steps must be >= 0")
        if self.pamr_dilation_unit not in PAMR_DILATION_UNITS:
            raise ValueError(f"pamr_dilation_unit must be one of {', '.join(PAMR_DILATION_UNITS)}, "
                             f"got {self.pamr_dilation_unit!r}")
        if not self.pamr_dilations or any(int(d) < 1 for d in self.pamr_dilations):
            raise ValueError(f"pamr_dilations must be positive integers, got {list(self.pamr_dilations)}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")
        for name, value, choices in (("pamr_guide", self.pamr_guide, PAMR_GUIDES),
                                     ("whole_image_resize", self.whole_image_resize, WHOLE_IMAGE_RESIZES),
                                     ("whole_image_upsample", self.whole_image_upsample, WHOLE_IMAGE_UPSAMPLES),
                                     ("below_threshold", self.below_threshold, BELOW_THRESHOLD_LABELS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if not 0.0 <= self.area_threshold < 1.0:
            raise ValueError(f"area_threshold must be in [0, 1), got {self.area_threshold}")
        if self.synonym_merge not in SYNONYM_MERGES:
            raise ValueError(f"synonym_merge must be one of {', '.join(SYNONYM_MERGES)}, got {self.synonym_merge!r}")

    @property
    def below_threshold_label(self) -> int:
        """The label of pixels below score_threshold: UNLABELLED, or class 0 (below_threshold first_class)."""
        return 0 if self.below_threshold == "first_class" else UNLABELLED

    def pamr_dilations_for(self, size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, ...]:
        """PAMR's dilations in frame pixels, for a frame of `size` (H, W) resized to `canvas` for the tower."""
        dilations = tuple(int(d) for d in self.pamr_dilations)
        if self.pamr_dilation_unit == "frame":
            return dilations
        scale = min(size) / min(canvas)
        return tuple(max(1, round(d * scale)) for d in dilations)


@dataclass(frozen=True)
class PreparedVocabulary:
    """A vocabulary with its text embeddings: what a frame is segmented against (swapped atomically).

    Classes are scored through queries: one per class (synonyms averaged) or one per synonym, in which case a
    class's probability is the largest of its queries' (softmax over all queries), as the papers' code does.
    """

    vocabulary: Vocabulary
    text_embeddings: torch.Tensor  # (Q, D) normalised, one row per query
    query_classes: torch.Tensor | None = None  # (Q,) int64 class of each query; None = query i is class i
    template_embeddings: torch.Tensor | None = None  # (C, P, D) one row per template (SED's cost volume)

    @property
    def version(self) -> int:
        return self.vocabulary.version

    @property
    def query_class_index(self) -> torch.Tensor:
        if self.query_classes is None:
            return torch.arange(self.text_embeddings.shape[0])
        return self.query_classes

    def class_probabilities(self, features: torch.Tensor, scale: float) -> torch.Tensor:
        """(N, D) normalised image features -> (N, C) class probabilities (softmax over queries, max per class)."""
        text = self.text_embeddings.to(features.device)
        return self.merge_queries(torch.softmax(scale * features.float() @ text.T, dim=-1)).cpu()

    def merge_queries(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, Q) query probabilities -> (N, C) class probabilities: each class takes its best query."""
        if self.query_classes is None:
            return probs
        owners = self.query_classes.to(probs.device).expand(probs.shape[0], -1)
        out = torch.zeros(probs.shape[0], len(self.vocabulary), device=probs.device)
        return out.scatter_reduce_(1, owners, probs, reduce="amax", include_self=False)


@dataclass
class FrameFeatures:
    """One frame's tower outputs: the windows it was cut into and what the tower made of each."""

    canvas: tuple[int, int]  # (H, W) of the resized image the windows tile
    windows: list[tuple[int, int, int, int]]  # (top, left, bottom, right) in canvas pixels
    global_emb: torch.Tensor  # (1, D) normalised; the mean over windows
    window_dense: torch.Tensor  # (n_windows, h, w, D) normalised
    grid: torch.Tensor  # (gh, gw, D) normalised features on the canvas' patch grid (windows averaged)

    @property
    def whole(self) -> bool:
        """One window covering the whole resized image (no sliding)."""
        return len(self.windows) == 1 and self.windows[0] == (0, 0, *self.canvas)


@dataclass
class SegmentationResult:
    labels: np.ndarray  # (H, W) uint16 class ids, UNLABELLED below threshold
    confidence: np.ndarray  # (H, W) float32 probability of the winning class
    class_ids: list[int]
    class_names: list[str]
    class_scores: list[float]  # mean confidence over each present class's pixels
    class_areas: list[float]  # fraction of the image
    vocabulary_version: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    dense_features: torch.Tensor | None = None  # (h, w, D) CLIP features, reused by prompt queries on this frame
    selected_classes: list[int] = field(default_factory=list)  # classes kept by category selection
    config: DenseConfig | None = None  # the one settings snapshot this result was computed with

    @property
    def inference_ms(self) -> float:
        return float(sum(self.timings_ms.values()))


MAX_BATCH = 8  # frames per image-tower pass: the exported backends are built for batch 1..8


class DenseSegmenter:
    """CLIP dense features -> cosine similarity to class text embeddings -> upsampled label map.

    The frame's path, as the training-free papers run it: resize (short side `input_size`), cut into windows
    (or one window = the whole image), one batched tower pass, per-window cosine logits upsampled to the window
    and averaged where windows overlap, upsampled to the frame, PAMR, logit scale, softmax, argmax, threshold.
    Category selection (DCP-CLIP) limits everything after the tower to the classes it keeps.
    """

    def __init__(self, encoder: ClipDenseEncoder, text_cache: TextEmbeddingCache,
                 config: DenseConfig = DenseConfig(), backend: str = "torch",
                 engine_cache_dir: str | None = None) -> None:
        self.encoder = encoder
        self.text_cache = text_cache
        self.config = config
        self.backend = backend
        self.engine_cache_dir = engine_cache_dir
        # Shared by every snapshot (`with_config`): backends built once per (variant, precision).
        self._runners: dict[tuple[str, str], object] = {}
        self._runners_lock = threading.Lock()
        self._tower_lock = threading.Lock()  # one tower pass at a time (the worker, prompt images, examples)
        self._active: list = [None]

    def with_config(self, config: DenseConfig) -> DenseSegmenter:
        """This segmenter frozen to one settings snapshot (same models, text cache and backends): a batch runs
        on one, so a parameter change in the middle of a frame never mixes two configurations."""
        snapshot = copy.copy(self)
        snapshot.config = config
        return snapshot

    def runner(self):
        """The backend running the image tower for this configuration's variant and precision (built once)."""
        from .backends import make_runner

        key = (self.config.variant, self.config.precision)
        with self._runners_lock:
            runner = self._runners.get(key)
            if runner is None:
                runner = make_runner(self.encoder, self.config.variant, self.backend, self.config.precision,
                                     self.engine_cache_dir)
                self._runners[key] = runner
            self._active[0] = runner
        return runner

    def prepare(self, vocabulary: Vocabulary) -> PreparedVocabulary:
        """Embed a vocabulary (cached); call before swapping it in so frames never wait for text encoding.
        Example images (of this model) are queries of their class, beside its text."""
        examples = [e for e in vocabulary.exemplars if e.model_id == self.encoder.model_id]
        if not examples and (self.config.synonym_merge == "mean"
                             or all(len(names) == 1 for names in vocabulary.synonyms)):
            return PreparedVocabulary(vocabulary, self.text_cache.embed_vocabulary(vocabulary))
        if self.config.synonym_merge == "mean":
            text, owners = self.text_cache.embed_vocabulary(vocabulary), list(range(len(vocabulary)))
        else:
            names = tuple(name for names in vocabulary.synonyms for name in names)
            owners = [index for index, names in enumerate(vocabulary.synonyms) for _ in names]
            text = self.text_cache.embed(names, vocabulary.templates)
        if examples:
            text = torch.cat([text, torch.tensor([e.embedding for e in examples], dtype=text.dtype)])
            owners += [vocabulary.labels.index(e.label) for e in examples]
        return PreparedVocabulary(vocabulary, text, torch.tensor(owners))

    @property
    def pixel_logit_scale(self) -> float:
        return self.config.logit_scale or self.encoder.logit_scale

    def window_size(self) -> tuple[int, int]:
        """Side of the sliding windows in pixels (a multiple of the patch)."""
        if not self.config.window_size:
            return self.encoder.native_size
        patch_h, patch_w = self.encoder.patch_size
        return (max(patch_h, self.config.window_size // patch_h * patch_h),
                max(patch_w, self.config.window_size // patch_w * patch_w))

    def model_input_shape(self, height: int, width: int) -> tuple[int, int]:
        """Size an image is resized to: short side = input_size (long side at most LONG_SIDE_MAX), as mmseg's
        keep-ratio Resize. With windows the size is exact, except that a side smaller than the window is rounded
        to the patch, since it is then the window's side. Without windows both sides are rounded to multiples of
        the patch (whole_image_resize "patch") or kept exact ("exact", as the released whole-image path)."""
        short = self.config.input_size or min(self.encoder.native_size)
        scale = min(short / min(height, width), LONG_SIDE_MAX / max(height, width))
        windowed = self.config.window_stride > 0
        window = self.window_size() if windowed else None
        exact_whole = not windowed and self.config.whole_image_resize == "exact"
        shape = []
        for axis, side in enumerate((height, width)):
            patch = self.encoder.patch_size[axis]
            exact = int(side * scale + 0.5)
            if exact_whole or (window is not None and exact >= window[axis]):
                shape.append(max(patch, exact))
            else:
                shape.append(max(patch, int(round(side * scale / patch)) * patch))
        return shape[0], shape[1]

    def windows(self, canvas: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """(top, left, bottom, right) windows over a resized image; one covering it when windows are off."""
        if self.config.window_stride <= 0:
            return [(0, 0, *canvas)]
        return slide_windows(canvas, self.window_size(), self.config.window_stride)

    def preprocess(self, image_rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, h, w) CLIP-normalised at the model input size (bilinear as the papers, or
        area-averaged when shrinking)."""
        new_h, new_w = self.model_input_shape(*image_rgb.shape[:2])
        shrink = new_h < image_rgb.shape[0] and self.config.resize == "area"
        resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).to(self.encoder.device)
        tensor = tensor.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return self.encoder.normalise(tensor)

    @property
    def active_runner(self):
        """The backend in use, without building one (None before the first frame); for status reports."""
        return self._active[0]

    @torch.inference_mode()
    def frame_features(self, image_rgb: np.ndarray) -> torch.Tensor:
        """(h, w, D) dense features of an image exactly as `segment` computes them (same backend, size, variant)."""
        frozen = self.with_config(self.config)
        return frozen.encode(frozen.preprocess(image_rgb))[0].grid

    def run_tower(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised -> (global (B, D), dense (B, h, w, D)), at most MAX_BATCH per pass."""
        run = self.runner()
        autocast = self.config.precision != "fp32" and self.backend in ("torch", "torch-compile", "auto")
        outputs = []
        with self._tower_lock:
            for start in range(0, pixels.shape[0], MAX_BATCH):
                outputs.append(self._tower_chunk(run, pixels[start:start + MAX_BATCH].contiguous(), autocast))
        return torch.cat([g for g, _ in outputs]), torch.cat([d for _, d in outputs])

    def _tower_chunk(self, run, chunk: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # exported backends (ONNX Runtime, TensorRT) take float32 and apply their own precision
        with precision_autocast(self.encoder.device.type, self.config.precision if autocast else "fp32"):
            global_emb, dense = run(chunk)
        return global_emb.float(), dense.float()

    def encode(self, pixels: torch.Tensor) -> list[FrameFeatures]:
        """Resized images of one size (B, 3, H, W) -> each one's windows through the tower, batched."""
        batch, _, height, width = pixels.shape
        boxes = self.windows((height, width))
        crops = torch.cat([pixels[:, :, top:bottom, left:right] for top, left, bottom, right in boxes])
        global_emb, dense = self.run_tower(crops)  # window-major: row w * batch + b
        n = len(boxes)
        global_emb = global_emb.reshape(n, batch, -1)
        dense = dense.reshape(n, batch, *dense.shape[1:])
        frames = []
        for b in range(batch):
            window_dense = dense[:, b]
            frames.append(FrameFeatures(
                canvas=(height, width), windows=boxes,
                global_emb=F.normalize(global_emb[:, b].mean(dim=0, keepdim=True), dim=-1),
                window_dense=window_dense,
                # A copy, not a view: frame caches keep a frame's grid, and a view would keep the whole batch's
                # features alive (every camera's) in accelerator memory.
                grid=window_dense[0].clone() if n == 1 else self._grid(window_dense, boxes, (height, width))))
        return frames

    def _grid(self, window_dense: torch.Tensor, boxes: list[tuple[int, int, int, int]],
              canvas: tuple[int, int]) -> torch.Tensor:
        """Window features averaged on the canvas' patch grid (for prompts, selection and tag validation)."""
        patch_h, patch_w = self.encoder.patch_size
        grid_h, grid_w = canvas[0] // patch_h, canvas[1] // patch_w
        total = torch.zeros(grid_h, grid_w, window_dense.shape[-1], device=window_dense.device)
        count = torch.zeros(grid_h, grid_w, 1, device=window_dense.device)
        for features, (top, left, _, _) in zip(window_dense, boxes, strict=True):
            rows = slice(top // patch_h, min(grid_h, top // patch_h + features.shape[0]))
            cols = slice(left // patch_w, min(grid_w, left // patch_w + features.shape[1]))
            total[rows, cols] += features[: rows.stop - rows.start, : cols.stop - cols.start]
            count[rows, cols] += 1
        return F.normalize(total / count.clamp(min=1), dim=-1)

    def select_categories(self, global_emb: torch.Tensor, patch_logits: torch.Tensor,
                          text: torch.Tensor) -> torch.Tensor:
        """DCP-CLIP dynamic category selection: image-level (CLS) candidates united with patch-level winners
        under image-level suppression. Returns sorted query indices; all queries when disabled."""
        classes = patch_logits.shape[-1]
        tau = self.config.selection_threshold
        everything = torch.arange(classes, device=patch_logits.device)
        if tau <= 0 or classes <= self.config.selection_min_classes:
            return everything
        image_prob = torch.softmax(self.encoder.logit_scale * global_emb.float() @ text.T, dim=-1)[0]
        image_set = image_prob >= tau * image_prob.max()
        suppressed = patch_logits.float().reshape(-1, classes)
        if self.config.selection_suppression:
            suppressed = suppressed + self.config.selection_suppression * torch.log(image_prob + 1e-8)
        k = min(self.config.selection_patch_top_k, classes)
        patch_set = torch.zeros(classes, dtype=torch.bool, device=patch_logits.device)
        patch_set[suppressed.topk(k, dim=-1).indices.unique()] = True
        keep = image_set | patch_set
        keep[image_prob.topk(min(self.config.selection_min_classes, classes)).indices] = True
        return everything[keep]

    def validate_tags(self, class_index: np.ndarray, dense: torch.Tensor, prepared: PreparedVocabulary,
                      selected: torch.Tensor) -> np.ndarray:
        """DCP-CLIP tag validation: pool the dense features (h, w, D) under each predicted class's pixels and
        re-rank over the selected queries; a label outside its pooled top-k becomes the pooled top-1."""
        k = self.config.tag_validation_top_k
        grid = dense.shape[:2]
        present = np.unique(class_index)
        if len(present) == 0 or len(selected) <= k:
            return class_index
        masks = torch.from_numpy(np.stack([class_index == c for c in present])).float()[:, None]
        weights = F.adaptive_avg_pool2d(masks, grid)[:, 0]
        pooled = F.normalize(torch.einsum("phw,hwd->pd", weights.to(dense.dtype), dense).float(), dim=-1)
        text = prepared.text_embeddings.to(dense.device)
        scores = pooled @ text[selected].float().T
        top = scores.topk(min(k, len(selected)), dim=-1).indices
        owners = prepared.query_class_index.numpy()[selected.cpu().numpy()]
        out = class_index.copy()
        for row, cls in enumerate(present):
            candidates = owners[top[row].cpu().numpy()]
            if cls not in candidates:
                out[class_index == cls] = candidates[0]
        return out

    @torch.inference_mode()
    def segment(self, image_rgb: np.ndarray, prepared: PreparedVocabulary) -> SegmentationResult:
        return self.segment_batch([image_rgb], prepared)[0]

    @torch.inference_mode()
    def segment_batch(self, images_rgb: list[np.ndarray], prepared: PreparedVocabulary) -> list[SegmentationResult]:
        """Segment several images (e.g. one frame per camera) with one image-tower pass per input shape: the
        tower dominates the cost and a batch uses the accelerator better than a pass per image. Everything after
        the tower runs per image; each result's `image_encoder` time is its batch's. The configuration is read
        once: every result carries the one snapshot it was computed with (`result.config`)."""
        return self.with_config(self.config)._segment_batch(images_rgb, prepared)

    def _segment_batch(self, images_rgb: list[np.ndarray], prepared: PreparedVocabulary) -> list[SegmentationResult]:
        for image_rgb in images_rgb:
            if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
                raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image_rgb in enumerate(images_rgb):
            groups.setdefault(self.model_input_shape(*image_rgb.shape[:2]), []).append(index)
        results: list[SegmentationResult | None] = [None] * len(images_rgb)
        chunks = [members[i:i + MAX_BATCH] for members in groups.values() for i in range(0, len(members), MAX_BATCH)]
        for members in chunks:
            timings: dict[str, float] = {}
            clock = _Stopwatch(timings)
            pixels = torch.cat([self.preprocess(images_rgb[i]) for i in members])
            clock.lap("preprocess")
            features = self.encode(pixels)
            clock.lap("image_encoder")
            for row, (frame, index) in enumerate(zip(features, members, strict=True)):
                results[index] = self._label(images_rgb[index], frame, prepared, dict(timings), pixels[row])
        return results

    def pixel_logits(self, frame: FrameFeatures, text: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(c, H, W) cosine logits at the frame's size for c text queries: each window's patch logits upsampled
        (bilinear) to the window, averaged where windows overlap, then upsampled to the frame. Whole-image
        logits go to the frame directly, or through the model input's size (whole_image_upsample)."""
        logits = torch.einsum("nhwd,cd->nchw", frame.window_dense, text.to(frame.window_dense.dtype))
        if frame.whole and self.config.window_stride <= 0 and self.config.whole_image_upsample == "direct":
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]
        top, left, bottom, right = frame.windows[0]
        logits = F.interpolate(logits, size=(bottom - top, right - left), mode="bilinear", align_corners=False)
        canvas = torch.zeros(text.shape[0], *frame.canvas, device=logits.device)
        count = torch.zeros(1, *frame.canvas, device=logits.device)
        for window, (top, left, bottom, right) in zip(logits, frame.windows, strict=True):
            canvas[:, top:bottom, left:right] += window
            count[:, top:bottom, left:right] += 1
        canvas = canvas / count
        if tuple(frame.canvas) == tuple(size):
            return canvas
        return F.interpolate(canvas[None], size=size, mode="bilinear", align_corners=False)[0]

    def _pamr_affinity(self, image_rgb: np.ndarray, frame: FrameFeatures,
                       pixels: torch.Tensor) -> PamrAffinity | None:
        """PAMR's neighbour weights for this frame (None when PAMR is off): from the camera frame, or from the
        normalised model input `pixels` (3, h, w) upsampled to the frame (pamr_guide "input")."""
        if self.config.pamr_steps <= 0:
            return None
        size = image_rgb.shape[:2]
        if self.config.pamr_guide == "input":
            guide = F.interpolate(pixels[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        else:
            guide = torch.from_numpy(image_rgb).to(frame.grid.device).permute(2, 0, 1).float()
        return PamrAffinity(guide, self.config.pamr_dilations_for(size, frame.canvas))

    def _refined_logits(self, image_rgb: np.ndarray, frame: FrameFeatures, text: torch.Tensor,
                        queries: torch.Tensor, affinity: PamrAffinity | None, clock: _Stopwatch):
        """(start, (c, H, W) scaled logits) for `queries` a class_chunk at a time: upsampled, PAMR, refined."""
        size = image_rgb.shape[:2]
        grey = None
        if self.config.refinement == "guided":
            grey = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        chunk = self.config.class_chunk
        for start in range(0, len(queries), chunk):
            part = self.pixel_logits(frame, text[queries[start:start + chunk]], size)
            clock.add("merge_upsample")
            if affinity is not None:
                part = affinity.refine(part, self.config.pamr_steps)
                clock.add("pamr")
            if grey is not None:
                part = guided_filter_maps(grey, part)
            yield start, part * self.pixel_logit_scale

    def _label(self, image_rgb: np.ndarray, frame: FrameFeatures, prepared: PreparedVocabulary,
               timings: dict[str, float], pixels: torch.Tensor) -> SegmentationResult:
        """One image's tower outputs -> its label map (per-pixel work limited to the selected queries)."""
        clock = _Stopwatch(timings)
        device = frame.grid.device
        text = prepared.text_embeddings.to(device, frame.grid.dtype)
        patch_logits = self.encoder.logit_scale * torch.einsum("hwd,cd->hwc", frame.grid, text)
        selected = self.select_categories(frame.global_emb, patch_logits, text)
        clock.lap("category_selection")
        affinity = self._pamr_affinity(image_rgb, frame, pixels)
        if affinity is not None:
            clock.add("pamr")
        argmax = RunningArgmax()
        for start, scaled in self._refined_logits(image_rgb, frame, text, selected, affinity, clock):
            argmax.add(start, scaled)
            clock.add("classify")
        index, confidence = argmax.result()
        owners = prepared.query_class_index.numpy()
        class_index = owners[selected.cpu().numpy()[index]]
        if self.config.area_threshold > 0:
            removed = self._small_classes(class_index, len(prepared.vocabulary))
            if removed:
                kept = selected[~torch.from_numpy(np.isin(owners[selected.cpu().numpy()], removed))]
                rerun = RunningArgmax()
                for start, scaled in self._refined_logits(image_rgb, frame, text, kept, affinity, clock):
                    rerun.add(start, scaled)
                index, confidence = rerun.result(argmax.lse)  # the probabilities keep every class's softmax
                class_index = owners[kept.cpu().numpy()[index]]
            clock.lap("area_threshold")
        if self.config.tag_validation_top_k > 0:
            class_index = self.validate_tags(class_index, frame.grid, prepared, selected)
            clock.lap("tag_validation")
        result = summarise(class_index, confidence, prepared, self.config.score_threshold,
                           self.config.below_threshold_label)
        clock.lap("postprocess")
        result.timings_ms = timings
        result.dense_features = frame.grid
        result.selected_classes = sorted({int(c) for c in prepared.query_class_index[selected.cpu()]})
        result.config = self.config
        return result

    def _small_classes(self, class_index: np.ndarray, classes: int) -> list[int]:
        """SCLIP's area_thd: the classes predicted on at most area_threshold of the counted pixels, absent ones
        included (they cannot take the removed pixels either); the first class is exempt and not counted when
        it is the background. Empty when no present class is removed."""
        counts = np.bincount(class_index.ravel(), minlength=classes)
        first = 1 if self.config.below_threshold == "first_class" else 0
        total = counts[first:].sum()
        small = [c for c in range(first, classes) if counts[c] <= self.config.area_threshold * total]
        return small if any(counts[c] for c in small) else []

    @torch.inference_mode()
    def probability_maps(self, image_rgb: np.ndarray, prepared: PreparedVocabulary) -> torch.Tensor:
        """(C, H, W) float32 class probabilities at the frame's size, as `segment` computes them before the
        argmax (softmax over all queries, a class's synonyms merged by max; category selection and area
        threshold not applied): a per-class costmap for planners, and the papers' `seg_logits` output."""
        frozen = self.with_config(self.config)
        pixels = frozen.preprocess(image_rgb)
        frame = frozen.encode(pixels)[0]
        text = prepared.text_embeddings.to(frame.grid.device, frame.grid.dtype)
        queries = torch.arange(text.shape[0])
        affinity = frozen._pamr_affinity(image_rgb, frame, pixels[0])
        clock = _Stopwatch({})
        scaled = torch.cat([part for _, part in frozen._refined_logits(image_rgb, frame, text, queries, affinity,
                                                                       clock)])
        probs = torch.softmax(scaled.float(), dim=0)  # (Q, H, W)
        merged = prepared.merge_queries(probs.flatten(1).T)  # (H * W, C)
        return merged.T.reshape(-1, *probs.shape[1:]).cpu()


class RunningArgmax:
    """Argmax and softmax probability over classes that arrive a chunk at a time (bounded memory).

    Keeps a running max, argmax and log-sum-exp, so a 1000-class vocabulary never holds C x H x W floats."""

    def __init__(self) -> None:
        self.best = self.best_index = self.lse = None

    def add(self, start: int, scaled: torch.Tensor) -> None:
        """(c, H, W) scaled logits of classes start .. start + c - 1."""
        part_max, part_idx = scaled.max(dim=0)
        part_lse = torch.logsumexp(scaled, dim=0)
        if self.best is None:
            self.best, self.best_index, self.lse = part_max, part_idx + start, part_lse
            return
        better = part_max > self.best
        self.best = torch.where(better, part_max, self.best)
        self.best_index = torch.where(better, part_idx + start, self.best_index)
        self.lse = torch.logaddexp(self.lse, part_lse)

    def result(self, lse: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) int64 winning index and (H, W) float32 its softmax probability (normalised over the classes
        seen here, or by another pass's log-sum-exp `lse`)."""
        confidence = torch.exp(self.best - (self.lse if lse is None else lse))
        return self.best_index.to(torch.int64).cpu().numpy(), confidence.cpu().numpy().astype(np.float32)


def slide_windows(canvas: tuple[int, int], window: tuple[int, int], stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding-window tiling (what MaskCLIP, SCLIP, ClearCLIP and NACLIP use): windows start every
    `stride` pixels, the last one is moved back to end at the border, a side shorter than the window is one
    window of that side."""
    def starts(length: int, size: int) -> list[tuple[int, int]]:
        count = max(length - size + stride - 1, 0) // stride + 1
        spans = []
        for i in range(count):
            end = min(i * stride + size, length)
            spans.append((max(end - size, 0), end))
        return spans

    return [(top, left, bottom, right) for top, bottom in starts(canvas[0], window[0])
            for left, right in starts(canvas[1], window[1])]


class _Stopwatch:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = (now - self.last) * 1000
        self.last = now

    def add(self, name: str) -> None:
        """Like lap, but adds to the stage's time (a stage run once per chunk of classes)."""
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + (now - self.last) * 1000
        self.last = now


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int = 4, eps: float = 1e-3) -> np.ndarray:
    """He et al.'s guided filter (grey guide) with OpenCV box filters: edges of `guide` shape `source`."""
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, cv2.CV_32F, size)

    mean_i, mean_p = box(guide), box(source)
    cov_ip = box(guide * source) - mean_i * mean_p
    var_i = box(guide * guide) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box(a) * guide + box(b)


def guided_filter_maps(grey: np.ndarray, maps: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map of a (c, H, W) tensor through the guided filter with an (H, W) grey guide."""
    filtered = np.stack([guided_filter(grey, channel) for channel in maps.cpu().numpy()])
    return torch.from_numpy(filtered).to(maps.device)


def relabel(result: SegmentationResult, labels: np.ndarray, prepared: PreparedVocabulary,
            threshold: float) -> SegmentationResult:
    """The same frame's result with a refined label map (statistics recomputed, timings and features kept)."""
    below = result.config.below_threshold_label if result.config is not None else UNLABELLED
    refined = summarise(labels, result.confidence, prepared, threshold, below)
    refined.timings_ms = result.timings_ms
    refined.dense_features = result.dense_features
    refined.selected_classes = result.selected_classes
    refined.config = result.config
    return refined


def summarise(class_index: np.ndarray, confidence: np.ndarray, prepared: PreparedVocabulary,
              threshold: float, below_label: int = UNLABELLED) -> SegmentationResult:
    """Apply the threshold (pixels below it become `below_label`) and compute per-class area and mean score."""
    labels = class_index.astype(np.uint16)
    if threshold > 0:
        labels[confidence < threshold] = below_label
    total = labels.size
    counts = np.bincount(labels.ravel(), minlength=len(prepared.vocabulary))
    score_sums = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=len(prepared.vocabulary))
    names = prepared.vocabulary.display_names
    present = [int(i) for i in np.nonzero(counts[: len(names)])[0]]
    return SegmentationResult(
        labels=labels,
        confidence=confidence,
        class_ids=present,
        class_names=[names[i] for i in present],
        class_scores=[float(score_sums[i] / counts[i]) for i in present],
        class_areas=[float(counts[i] / total) for i in present],
        vocabulary_version=prepared.version,
    )
