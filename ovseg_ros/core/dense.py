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


@dataclass(frozen=True)
class DenseConfig:
    """How the dense pass runs; every field is a node parameter."""

    variant: str = "plain"
    input_size: int = 0  # short side fed to the image tower; 0 = the tower's native size
    score_threshold: float = 0.0  # pixels whose winning class probability is below this are UNLABELLED
    class_chunk: int = 64  # classes upsampled at once; bounds memory for large vocabularies

    def __post_init__(self) -> None:
        if self.variant not in DENSE_VARIANTS:
            raise ValueError(f"dense variant must be one of {', '.join(DENSE_VARIANTS)}, got {self.variant!r}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.input_size < 0:
            raise ValueError(f"input_size must be >= 0, got {self.input_size}")
        if self.class_chunk < 1:
            raise ValueError("class_chunk must be >= 1")


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

    @property
    def inference_ms(self) -> float:
        return float(sum(self.timings_ms.values()))


class DenseSegmenter:
    """CLIP dense features -> cosine similarity to class text embeddings -> upsampled label map."""

    def __init__(self, encoder: ClipDenseEncoder, text_cache: TextEmbeddingCache,
                 config: DenseConfig = DenseConfig()) -> None:
        self.encoder = encoder
        self.text_cache = text_cache
        self.config = config

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

    @torch.inference_mode()
    def segment(self, image_rgb: np.ndarray, prepared: PreparedVocabulary) -> SegmentationResult:
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        pixels = self.preprocess(image_rgb)
        t1 = time.perf_counter()
        timings["preprocess"] = (t1 - t0) * 1000
        _, dense = self.encoder.dense_features(pixels, self.config.variant)
        t2 = time.perf_counter()
        timings["image_encoder"] = (t2 - t1) * 1000
        text = prepared.text_embeddings.to(dense.device, dense.dtype)
        logits = self.encoder.logit_scale * torch.einsum("bhwd,cd->bchw", dense, text)
        labels, confidence = upsample_argmax(logits, image_rgb.shape[:2], self.config.class_chunk)
        t3 = time.perf_counter()
        timings["classify_upsample"] = (t3 - t2) * 1000
        result = summarise(labels, confidence, prepared, self.config.score_threshold)
        timings["postprocess"] = (time.perf_counter() - t3) * 1000
        result.timings_ms = timings
        return result


def upsample_argmax(logits: torch.Tensor, size: tuple[int, int], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact bilinear upsampling + softmax argmax, a chunk of classes at a time (bounded memory).

    Keeps a running max, argmax and log-sum-exp so a 1000-class vocabulary never holds C x H x W floats.
    """
    _, classes, _, _ = logits.shape
    best = None
    best_idx = None
    lse = None
    for start in range(0, classes, chunk):
        part = F.interpolate(logits[:, start:start + chunk].float(), size=size, mode="bilinear",
                             align_corners=False)[0]
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
    return best_idx.to(torch.int32).cpu().numpy(), confidence.cpu().numpy().astype(np.float32)


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
