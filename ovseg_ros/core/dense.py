"""The dense open-vocabulary segmenter: one image in, a label map over the current vocabulary out.

ROS-free: the node, the command-line tool, the benchmarks and the tests all drive this object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .clip_dense import DENSE_VARIANTS, ClipDenseEncoder
from .text_cache import TextEmbeddingCache
from .vocabulary import UNLABELLED, Vocabulary

REFINEMENTS = ("none", "guided", "sam")  # "sam" is applied by the caller that owns SAM (PromptSegmenter)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DenseConfig:
    """How the dense pass runs; every field is a node parameter."""

    variant: str = "plain"
    input_size: int = 0  # short side fed to the image tower; 0 = the tower's native size
    score_threshold: float = 0.0  # pixels whose winning class probability is below this are UNLABELLED
    class_chunk: int = 64  # classes upsampled at once; bounds memory for large vocabularies
    window_stride: int = 0  # >0: slide native-size windows with this stride (model pixels) over larger inputs
    selection_threshold: float = 0.0  # DCS tau, relative to the best class; 0 disables category selection
    selection_patch_top_k: int = 6  # DCS patch level: classes in any patch's top-k join the candidates
    selection_min_classes: int = 1  # DCS never keeps fewer than this (best image-level scores)
    # Weight of log(image-level score) added to the patch logits before the patch top-k (DCP-CLIP's image-level
    # suppression). 0 by default: with the demo CLIP it removed stuff classes (README, accuracy figures).
    selection_suppression: float = 0.0
    tag_validation_top_k: int = 0  # >0: relabel a region whose label is not in its mask-pooled top-k
    refinement: str = "none"  # "none" or "guided" (edge-aware guided filter on the class maps)
    precision: str = "fp32"  # "fp32", or autocast to "bf16" (CPU matrix units) / "fp16" (CUDA)

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
        if self.window_stride < 0 or self.tag_validation_top_k < 0 or self.selection_patch_top_k < 1:
            raise ValueError("window_stride and tag_validation_top_k must be >= 0, selection_patch_top_k >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {', '.join(REFINEMENTS)}, got {self.refinement!r}")


@dataclass(frozen=True)
class PreparedVocabulary:
    """A vocabulary with its text embeddings: what a frame is segmented against (swapped atomically)."""

    vocabulary: Vocabulary
    text_embeddings: torch.Tensor  # (C, D) normalised

    @property
    def version(self) -> int:
        return self.vocabulary.version


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

    @property
    def inference_ms(self) -> float:
        return float(sum(self.timings_ms.values()))


MAX_BATCH = 8  # frames per image-tower pass: the exported backends are built for batch 1..8


class DenseSegmenter:
    """CLIP dense features -> cosine similarity to class text embeddings -> upsampled label map."""

    def __init__(self, encoder: ClipDenseEncoder, text_cache: TextEmbeddingCache,
                 config: DenseConfig = DenseConfig(), backend: str = "torch",
                 engine_cache_dir: str | None = None) -> None:
        self.encoder = encoder
        self.text_cache = text_cache
        self.config = config
        self.backend = backend
        self.engine_cache_dir = engine_cache_dir
        self._runner = None

    def runner(self):
        """The backend running the image tower; rebuilt when the dense variant changes."""
        from .backends import make_runner

        runner = self._runner
        if runner is None or runner.tower.variant != self.config.variant:
            runner = make_runner(self.encoder, self.config.variant, self.backend, self.config.precision,
                                 self.engine_cache_dir)
            self._runner = runner
        return runner

    def prepare(self, vocabulary: Vocabulary) -> PreparedVocabulary:
        """Embed a vocabulary (cached); call before swapping it in so frames never wait for text encoding."""
        return PreparedVocabulary(vocabulary, self.text_cache.embed_vocabulary(vocabulary))

    def model_input_shape(self, height: int, width: int) -> tuple[int, int]:
        """Resize target for an image: short side = input_size, both sides multiples of the patch size."""
        patch_h, patch_w = self.encoder.patch_size
        short = self.config.input_size or min(self.encoder.native_size)
        scale = short / min(height, width)
        new_h = max(patch_h, int(round(height * scale / patch_h)) * patch_h)
        new_w = max(patch_w, int(round(width * scale / patch_w)) * patch_w)
        return new_h, new_w

    def preprocess(self, image_rgb: np.ndarray) -> torch.Tensor:
        height, width = image_rgb.shape[:2]
        new_h, new_w = self.model_input_shape(height, width)
        interp = cv2.INTER_AREA if new_h < height else cv2.INTER_LINEAR
        resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=interp)
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).to(self.encoder.device)
        tensor = tensor.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return self.encoder.normalise(tensor)

    @property
    def active_runner(self):
        """The backend in use, without building one (None before the first frame); for status reports."""
        return self._runner

    @torch.inference_mode()
    def frame_features(self, image_rgb: np.ndarray) -> torch.Tensor:
        """(h, w, D) dense features of an image exactly as `segment` computes them (same backend, size, variant)."""
        return self.encode(self.preprocess(image_rgb))[1][0]

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised -> (global (B, D), dense (B, h, w, D)); sliding windows when configured."""
        if self.config.precision != "fp32" and self.backend in ("torch", "torch-compile", "auto"):
            # Exported backends (ONNX Runtime, TensorRT) take float32 in and apply their own precision.
            dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
            with torch.autocast(self.encoder.device.type, dtype=dtype):
                global_emb, dense = self._encode(pixels)
            return global_emb.float(), dense.float()
        return self._encode(pixels)

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        native_h, native_w = self.encoder.native_size
        batch, _, height, width = pixels.shape
        stride = self.config.window_stride
        run = self.runner()
        if stride <= 0 or (height <= native_h and width <= native_w):
            return run(pixels)
        patch_h, patch_w = self.encoder.patch_size
        stride = max(patch_h, stride // patch_h * patch_h)
        tops = _window_starts(height, native_h, stride)
        lefts = _window_starts(width, native_w, stride)
        dense_sum = torch.zeros(batch, height // patch_h, width // patch_w, self.encoder.embed_dim,
                                device=pixels.device)
        count = torch.zeros(1, height // patch_h, width // patch_w, 1, device=pixels.device)
        global_sum = torch.zeros(batch, self.encoder.embed_dim, device=pixels.device)
        for top in tops:
            for left in lefts:
                window = pixels[:, :, top:top + native_h, left:left + native_w]
                global_emb, dense = run(window.contiguous())
                rows = slice(top // patch_h, top // patch_h + dense.shape[1])
                cols = slice(left // patch_w, left // patch_w + dense.shape[2])
                dense_sum[:, rows, cols] += dense.float()
                count[:, rows, cols] += 1
                global_sum += global_emb.float()
        return F.normalize(global_sum, dim=-1), F.normalize(dense_sum / count.clamp(min=1), dim=-1)

    def select_categories(self, global_emb: torch.Tensor, patch_logits: torch.Tensor,
                          text: torch.Tensor) -> torch.Tensor:
        """DCP-CLIP dynamic category selection: image-level (CLS) candidates united with patch-level winners
        under image-level suppression. Returns sorted class indices; all classes when disabled."""
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

    def validate_tags(self, class_index: np.ndarray, dense: torch.Tensor, text: torch.Tensor,
                      selected: torch.Tensor) -> np.ndarray:
        """DCP-CLIP tag validation: pool the dense features under each predicted class's pixels and re-rank
        over the selected classes; a label outside its pooled top-k becomes the pooled top-1."""
        k = self.config.tag_validation_top_k
        grid = dense.shape[1:3]
        present = np.unique(class_index)
        if len(present) == 0 or len(selected) <= k:
            return class_index
        masks = torch.from_numpy(np.stack([class_index == c for c in present])).float()[:, None]
        weights = F.adaptive_avg_pool2d(masks, grid)[:, 0]
        pooled = F.normalize(torch.einsum("phw,hwd->pd", weights.to(dense.dtype), dense[0]).float(), dim=-1)
        scores = pooled @ text[selected].float().T
        top = scores.topk(min(k, len(selected)), dim=-1).indices
        selected_np = selected.cpu().numpy()
        out = class_index.copy()
        for row, cls in enumerate(present):
            candidates = selected_np[top[row].cpu().numpy()]
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
        the tower runs per image; each result's `image_encoder` time is its batch's."""
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
            global_emb, dense = self.encode(pixels)
            clock.lap("image_encoder")
            for row, index in enumerate(members):
                results[index] = self._label(images_rgb[index], global_emb[row:row + 1], dense[row:row + 1],
                                             prepared, dict(timings))
        return results

    def _label(self, image_rgb: np.ndarray, global_emb: torch.Tensor, dense: torch.Tensor,
               prepared: PreparedVocabulary, timings: dict[str, float]) -> SegmentationResult:
        """One image's (1, D) global and (1, h, w, D) dense features -> its label map."""
        clock = _Stopwatch(timings)
        text = prepared.text_embeddings.to(dense.device, dense.dtype)
        patch_logits = self.encoder.logit_scale * torch.einsum("bhwd,cd->bhwc", dense, text)[0]
        selected = self.select_categories(global_emb, patch_logits, text)
        clock.lap("category_selection")
        logits = patch_logits[..., selected].permute(2, 0, 1)[None]
        guide = image_rgb if self.config.refinement == "guided" else None
        index, confidence = upsample_argmax(logits, image_rgb.shape[:2], self.config.class_chunk, guide)
        class_index = selected.cpu().numpy()[index]
        clock.lap("classify_upsample")
        if self.config.tag_validation_top_k > 0:
            class_index = self.validate_tags(class_index, dense, text, selected)
            clock.lap("tag_validation")
        result = summarise(class_index, confidence, prepared, self.config.score_threshold)
        clock.lap("postprocess")
        result.timings_ms = timings
        result.dense_features = dense[0]
        result.selected_classes = [int(c) for c in selected]
        return result


class _Stopwatch:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = (now - self.last) * 1000
        self.last = now


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


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


def upsample_argmax(logits: torch.Tensor, size: tuple[int, int], chunk: int,
                    guide_rgb: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact bilinear upsampling + softmax argmax, a chunk of classes at a time (bounded memory).

    Keeps a running max, argmax and log-sum-exp so a 1000-class vocabulary never holds C x H x W floats.
    With a guide image, each class map is edge-aware filtered (guided filter) before the argmax.
    """
    _, classes, _, _ = logits.shape
    guide = None
    if guide_rgb is not None:
        guide = cv2.cvtColor(guide_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    best = best_idx = lse = None
    for start in range(0, classes, chunk):
        part = F.interpolate(logits[:, start:start + chunk].float(), size=size, mode="bilinear",
                             align_corners=False)[0]
        if guide is not None:
            filtered = [guided_filter(guide, channel) for channel in part.cpu().numpy()]
            part = torch.from_numpy(np.stack(filtered)).to(part.device)
        part_max, part_idx = part.max(dim=0)
        part_lse = torch.logsumexp(part, dim=0)
        if best is None:
            best, best_idx, lse = part_max, part_idx, part_lse
        else:
            better = part_max > best
            best = torch.where(better, part_max, best)
            best_idx = torch.where(better, part_idx + start, best_idx)
            lse = torch.logaddexp(lse, part_lse)
    confidence = torch.exp(best - lse)
    return best_idx.to(torch.int64).cpu().numpy(), confidence.cpu().numpy().astype(np.float32)


def relabel(result: SegmentationResult, labels: np.ndarray, prepared: PreparedVocabulary,
            threshold: float) -> SegmentationResult:
    """The same frame's result with a refined label map (statistics recomputed, timings and features kept)."""
    refined = summarise(labels, result.confidence, prepared, threshold)
    refined.timings_ms = result.timings_ms
    refined.dense_features = result.dense_features
    refined.selected_classes = result.selected_classes
    return refined


def summarise(class_index: np.ndarray, confidence: np.ndarray, prepared: PreparedVocabulary,
              threshold: float) -> SegmentationResult:
    """Apply the threshold and compute per-class area and mean score."""
    labels = class_index.astype(np.uint16)
    if threshold > 0:
        labels[confidence < threshold] = UNLABELLED
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
