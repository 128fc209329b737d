"""Open-Vocabulary SAM behind `segment_prompt`: one CLIP backbone pass gives the mask and the label.

The image pass (RN50x16 stages -> SAM2CLIP embeddings and an FPN; ``OvSamTower``, what the backends compile) runs
on demand for the prompted frame and is cached with it, so the dense path's frame rate never pays for it. A
prompt then costs SAM's prompt encoder and the CLIP2SAM decoder, two RoIAligns and CLIP's attention pool.

Inference follows the released ``OVSAM.predict`` / ``open_voc_inference`` (github.com/HarborYuan/ovsam @ 137d2c2):

- input: mmdet's test pipeline, ``Resize(scale=(1024, 1024), keep_ratio=True)`` (cv2 bilinear, the long side to
  1024, sizes rounded half up), SAM's mean/std, zero padding to 1024 x 1024 at the bottom and right;
- prompts in that input's pixels; points as SAM embeds them (a padding point when there is no box);
- the head classifies the FPN pooled in the *predicted* mask's box (``gen_box``); the CLIP branch pools the
  stride-32 stage in the prompt's box. For a point prompt the released evaluation uses the annotation's box,
  which a robot does not have: here the predicted mask's box stands in (the box the head uses too);
- the two classifiers are ensembled with alpha 0.1 for classes seen in training (matched by name against the
  checkpoint's training classes, as the released ``test.py`` overlap does) and beta 0.9 otherwise, against a
  background row of zeros; the label is the argmax of the softmax without the background;
- masks: the 256 x 256 logits upsampled to 1024, cropped to the resized image, upsampled to the frame, > 0.5
  after the sigmoid. There is no IoU head (the released decoder has ``with_iou=False``): an answer's
  ``mask_score`` is the mean mask probability inside its mask.

The released COCO evaluation also excludes the 15 COCO classes outside its 48/17 split (score -1000); a robot's
vocabulary keeps every class, so that step is not applied.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .clip_dense import encode_prompts
from .dense import PreparedVocabulary, precision_autocast
from .modeling.ovsam import OvSamConfig, OvSamNetwork, ensemble_logits, mask_boxes
from .prompt import CachedFrame, Prompt, PromptAnswer, PromptSegmenter, prompt_batches, validate_prompts
from .templates import VILD14
from .text_cache import TextEmbeddingCache
from .vocabulary import label_set, split_synonyms

MASK_CHUNK = 16  # prompts whose full-size masks are upsampled at once (16 x 1024 x 1024 floats: 64 MB)


def released_synonyms(label: str) -> list[str]:
    """A vocabulary label -> the names OV-SAM's class-embedding generator embeds (lower case, as its
    ``split_label``)."""
    return [name.lower() for name in split_synonyms(label)]


def resize_for_ovsam(image: np.ndarray, size: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
    """mmcv's ``imrescale`` to fit `size`: factor min(size / long side, size / short side), new sides
    int(side * factor + 0.5), cv2 bilinear. Returns the image and mmdet's scale factor (w_new / w, h_new / h)."""
    height, width = image.shape[:2]
    factor = min(size / max(height, width), size / min(height, width))
    new_w, new_h = int(width * factor + 0.5), int(height * factor + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return resized, (new_w / width, new_h / height)


@dataclass
class OvSamFeatures:
    """One frame's image pass: what every prompt on it reuses."""

    embedding: torch.Tensor  # (1, 256, 64, 64) SAM2CLIP image embedding
    fpn: tuple[torch.Tensor, ...]  # four (1, 256, s, s) FPN levels (strides 4..32)
    last_stage: torch.Tensor  # (1, C, 32, 32) the backbone's stride-32 stage (the CLIP branch)
    input_size: tuple[int, int]  # the resized image inside the 1024 x 1024 input (h, w)
    scale: tuple[float, float]  # frame pixels -> input pixels (x, y)


@dataclass
class OvSamPrediction:
    """Prompts on one frame, in the released model's terms (input pixels, logits)."""

    low_res_masks: torch.Tensor  # (N, 1, 256, 256) mask logits
    head_logits: torch.Tensor  # (N, K + 1) CLIP2SAM's classifier (background last)
    clip_logits: torch.Tensor  # (N, K + 1) the CLIP branch's
    scores: torch.Tensor  # (N, K + 1) the ensemble's log-scores (``cls_pred[:, 0]``)
    boxes: torch.Tensor  # (N, 4) the boxes the CLIP branch pooled (input pixels)

    @property
    def probabilities(self) -> torch.Tensor:
        """(N, K) class probabilities: the softmax over the classes and the background, background dropped."""
        return self.scores.softmax(-1)[:, :-1]


class OvSamTower(torch.nn.Module):
    """The image pass as the backends compile it: normalised, padded (B, 3, 1024, 1024) pixels ->
    (SAM2CLIP embedding, FPN levels 0-3, the backbone's stride-32 stage)."""

    output_names = ("embedding", "fpn0", "fpn1", "fpn2", "fpn3", "stage4")
    variant = "ovsam"

    def __init__(self, model: OvSamModel) -> None:
        super().__init__()
        self.encoder = model
        self.network = model.network  # registers the weights

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stages = self.network.backbone_stages(pixels)
        return (self.network.neck(stages), *self.network.fpn_neck(stages), stages[-1])


class OvSamModel:
    """OV-SAM's network with its text side and pre-processing; thread-safe (no per-call state)."""

    def __init__(self, network: OvSamNetwork, tokenizer, model_id: str, device: str = "cpu",
                 backend: str = "torch", precision: str = "fp32", engine_cache_dir: str | None = None,
                 text_cache_dir: str | None = None) -> None:
        self.network = network.eval().to(device)
        self.config: OvSamConfig = network.cfg
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)
        self.precision = precision
        self.mean = torch.tensor(self.config.pixel_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.config.pixel_std, device=self.device).view(1, 3, 1, 1)
        released = label_set(self.config.label_set)
        self.training_names = frozenset(name for i in released["base_ids"]
                                        for name in released_synonyms(released["labels"][i]))
        self.backend = backend
        self.engine_cache_dir = engine_cache_dir
        self._runner = None
        self._classes: collections.OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        # One embedding per synonym and template set, in memory and (with text_cache_dir) on disk: LVIS's 1203
        # classes are ~1200 names x 14 templates, minutes on a CPU, paid once.
        self.text_cache = TextEmbeddingCache(self.encode_text, model_id, text_cache_dir)

    # ------------------------------------------------------------------ text
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised RN50x16 text embeddings (len(prompts), D) on the CPU."""
        model = self.network.clip
        return encode_prompts(model, self.tokenizer, prompts, self.device, self.config.text_dim)

    def class_embeddings(self, labels: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels -> ((D, K + 1, P) prototypes, (K + 1,) seen-in-training weights), as the released
        ``gen_cls.py`` builds the classifier: each synonym embedded with ViLD's 14 templates (normalised, averaged,
        normalised), a class's synonyms as P prototypes (padded with its first), and a background row of zeros.
        Cached for the last few vocabularies."""
        with self._lock:
            if labels in self._classes:
                self._classes.move_to_end(labels)
                return self._classes[labels]
        names = [released_synonyms(label) for label in labels]
        flat = [name for synonyms in names for name in synonyms]
        per_name = self.text_cache.embed(tuple(flat), VILD14)  # normalised template mean, renormalised
        width = max(len(s) for s in names)
        rows, start = [], 0
        for synonyms in names:
            block = per_name[start:start + len(synonyms)]
            if len(synonyms) < width:
                block = torch.cat([block, block[:1].expand(width - len(synonyms), -1)])
            rows.append(block)
            start += len(synonyms)
        rows.append(torch.zeros(width, per_name.shape[-1]))
        prototypes = torch.stack(rows).permute(2, 0, 1).contiguous().to(self.device)
        seen = torch.tensor([float(any(n in self.training_names for n in synonyms)) for synonyms in names] + [1.0],
                            device=self.device)
        with self._lock:
            self._classes[labels] = (prototypes, seen)
            while len(self._classes) > 4:
                self._classes.popitem(last=False)
        return prototypes, seen

    # ------------------------------------------------------------------ image
    def preprocess(self, image_rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[float, float]]:
        """(H, W, 3) uint8 RGB -> ((1, 3, 1024, 1024) input, resized (h, w), scale (x, y))."""
        resized, scale = resize_for_ovsam(image_rgb, self.config.image_size)
        pixels = torch.from_numpy(np.ascontiguousarray(resized)).to(self.device).permute(2, 0, 1)[None].float()
        pixels = (pixels - self.mean) / self.std
        size = self.config.image_size
        h, w = resized.shape[:2]
        pixels = F.pad(pixels, (0, size - w, 0, size - h), value=0.0)
        return pixels, (h, w), scale

    def runner(self):
        """The backend running ``OvSamTower``, built once."""
        if self._runner is None:
            from .backends import make_runner

            self._runner = make_runner(self, "ovsam", self.backend, self.precision, self.engine_cache_dir,
                                       tower=OvSamTower(self))
        return self._runner

    @torch.inference_mode()
    def image_features(self, image_rgb: np.ndarray) -> OvSamFeatures:
        pixels, input_size, scale = self.preprocess(image_rgb)
        with precision_autocast(self.device.type, self.precision):
            outputs = self.runner()(pixels)
        embedding, *fpn, last = (t.float() for t in outputs)
        return OvSamFeatures(embedding, tuple(fpn), last, input_size, scale)

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def predict(self, features: OvSamFeatures, labels: tuple[str, ...], points: torch.Tensor | None = None,
                point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                clip_boxes: torch.Tensor | None = None) -> OvSamPrediction:
        """Prompts in input pixels -- points (N, n, 2) with labels (N, n) and/or boxes (N, 4) -- -> masks and
        class scores for the vocabulary `labels`. The CLIP branch pools `clip_boxes` when given (the released
        evaluation passes the annotation's box), else the prompt's box, else the predicted mask's box."""
        network = self.network
        prototypes, seen = self.class_embeddings(labels)
        prompt_points = None if points is None else (points.to(self.device), point_labels.to(self.device))
        prompt_boxes = None if boxes is None else boxes.to(self.device)
        sparse, dense = network.pe(points=prompt_points, boxes=prompt_boxes, masks=None)
        head = network.mask_decoder
        low_res = head.decode(features.embedding, network.pe.get_dense_pe(), sparse, dense)
        predicted_boxes = mask_boxes(low_res.sigmoid()[:, 0] > 0.5) * 4
        head_logits = head.logits(head.region_embeddings(features.fpn, predicted_boxes), prototypes)
        if clip_boxes is not None:
            clip_boxes = clip_boxes.to(self.device)
        else:
            clip_boxes = prompt_boxes if prompt_boxes is not None else predicted_boxes
        clip_logits = head.logits(network.clip_region_embeddings(features.last_stage, clip_boxes), prototypes)
        at_clip_grid = F.interpolate(low_res, size=features.last_stage.shape[-2:], mode="bilinear",
                                     align_corners=False)
        valid = ((at_clip_grid > 0).flatten(1).sum(-1) > 0).float()
        scores = ensemble_logits(head_logits, clip_logits, seen, valid, self.config.alpha, self.config.beta)
        return OvSamPrediction(low_res, head_logits, clip_logits, scores, clip_boxes)

    def frame_masks(self, low_res: torch.Tensor, features: OvSamFeatures,
                    frame_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, 256, 256) logits -> ((N, H, W) bool masks, (N,) mean mask probability inside each mask), the
        released ``postprocess_masks`` then sigmoid > 0.5, `MASK_CHUNK` prompts at a time."""
        size = self.config.image_size
        h, w = features.input_size
        masks = np.zeros((low_res.shape[0], *frame_size), dtype=bool)
        confidence = np.zeros(low_res.shape[0], dtype=np.float32)
        for start in range(0, low_res.shape[0], MASK_CHUNK):
            chunk = F.interpolate(low_res[start:start + MASK_CHUNK], (size, size), mode="bilinear",
                                  align_corners=False)[..., :h, :w]
            probability = F.interpolate(chunk, frame_size, mode="bilinear", align_corners=False).sigmoid()[:, 0]
            inside = probability > 0.5
            masks[start:start + MASK_CHUNK] = inside.cpu().numpy()
            area = inside.flatten(1).sum(-1).clamp(min=1)
            confidence[start:start + MASK_CHUNK] = ((probability * inside).flatten(1).sum(-1) / area).cpu().numpy()
        return masks, confidence


class OvSamPromptSegmenter(PromptSegmenter):
    """PromptSegmenter's contract (frame cache, query, refinement, segment everything) with OV-SAM answering:
    masks and labels both come from the OV-SAM network; the frame's dense CLIP features still label what the
    dense path's refinement asks for. One image pass per prompted frame, cached with it."""

    def __init__(self, model: OvSamModel, encoder, cache_size: int = 4, eager_sam: bool = False,
                 top_k: int = 3) -> None:
        super().__init__(None, encoder, cache_size, eager_sam, top_k)
        self.model = model

    def for_another_camera(self) -> OvSamPromptSegmenter:
        return OvSamPromptSegmenter(self.model, self.encoder, self.cache_size, self.eager_sam, self.top_k)

    def prepare_vocabulary(self, vocabulary) -> None:
        """OV-SAM's class embeddings (its own RN50x16 text tower, 14 templates per synonym) are computed with the
        vocabulary change, so the first prompt after it does not pay for them. The camera caches share the model."""
        self.model.class_embeddings(vocabulary.labels)

    def _ensure_sam(self, frame: CachedFrame) -> None:
        with self._lock:
            if frame.sam_features is not None:
                return
            start = time.perf_counter()
            frame.sam_features = self.model.image_features(frame.image)
            self.timings_ms["ovsam_image_pass"] = (time.perf_counter() - start) * 1000

    @torch.inference_mode()
    def query(self, key: tuple[int, int] | None, prompts: list[Prompt], prepared: PreparedVocabulary,
              multimask: bool = False, crop_fusion: bool = False) -> tuple[CachedFrame, list[PromptAnswer]]:
        """Answer prompts with OV-SAM's masks and labels. `multimask` and `crop_fusion` have no OV-SAM
        counterpart (one mask token, one recognition path) and are ignored."""
        frame = self.frame(key)
        height, width = frame.image.shape[:2]
        validate_prompts(prompts, height, width)
        self._ensure_sam(frame)
        features: OvSamFeatures = frame.sam_features
        labels = prepared.vocabulary.labels
        start = time.perf_counter()
        masks = np.zeros((len(prompts), height, width), dtype=bool)
        confidence = np.zeros(len(prompts), dtype=np.float32)
        probabilities = torch.zeros(len(prompts), len(labels))
        sx, sy = features.scale
        for (has_box, n_points), members in prompt_batches(prompts):
            points = point_labels = boxes = None
            if n_points:
                raw = np.stack([prompts[i].points for i in members]).astype(np.float32) * np.float32([sx, sy])
                points = torch.from_numpy(raw)
                point_labels = torch.from_numpy(np.stack([prompts[i].point_labels for i in members]))
            if has_box:
                raw = np.stack([np.asarray(prompts[i].box, np.float32) for i in members])
                boxes = torch.from_numpy(raw * np.float32([sx, sy, sx, sy]))
            prediction = self.model.predict(features, labels, points, point_labels, boxes)
            group_masks, group_confidence = self.model.frame_masks(prediction.low_res_masks, features,
                                                                   (height, width))
            masks[members], confidence[members] = group_masks, group_confidence
            probabilities[members] = prediction.probabilities.float().cpu()
        self.timings_ms["decode"] = (time.perf_counter() - start) * 1000
        return frame, self._answers(masks, confidence, probabilities, prepared)


def build_ovsam_model(arch: str, parts: dict[str, str] | None = None, device: str = "cpu", seed: int = 0,
                      backend: str = "torch", precision: str = "fp32", engine_cache_dir: str | None = None,
                      model_id: str | None = None, trusted: bool = False,
                      text_cache_dir: str | None = None) -> OvSamModel:
    """The OV-SAM model of layout `arch`, with the released parts' files (part -> path) or, without them, the
    seeded random weights of ``ovseg_ros.bench.seeded_ovsam`` (outputs meaningless; tests and benchmarks)."""
    import open_clip

    from .modeling.ovsam import get_ovsam_config, load_ovsam_parts

    cfg = get_ovsam_config(arch)
    clip = open_clip.create_model(cfg.clip_arch, device="cpu")
    network = OvSamNetwork(cfg, clip)
    if parts:
        load_ovsam_parts(network, parts, trusted=trusted)
        model_id = model_id or f"{arch}@files"
    else:
        from ..bench.seeded_ovsam import load_seeded, seeded_parts

        load_seeded(network, seeded_parts(network, seed))
        model_id = model_id or f"{arch}@random{seed}"
    tokenizer = open_clip.get_tokenizer(cfg.clip_arch)
    return OvSamModel(network, tokenizer, model_id, device=device, backend=backend, precision=precision,
                      engine_cache_dir=engine_cache_dir, text_cache_dir=text_cache_dir)
