"""SED behind the dense segmenter's contract: frame in, label map over the current vocabulary out.

The network is ``modeling/sed.py``; this file is what SED's released inference does around it, and what the rest
of the pipeline needs from a dense model:

- the test-time resize (detectron2's ResizeShortestEdge, PIL bilinear, short side 640, long side at most 2560),
  the CLIP normalisation in 0-255 units, the resize to the 768-pixel square the tower sees, and the
  post-processing (crop to the resized image's extent, bilinear to the frame's size), as ``SED.forward`` does;
- the text side as ``SEDPredictor.class_embeddings``: every class under each of the 80 ImageNet templates,
  normalised per template; a class's synonyms (';' here, ', ' in SED's class lists) averaged per template and
  renormalised;
- what the pipeline reuses: the tower's dense CLIP embeddings (24 x 24) for prompt labels, find_objects, tag
  validation and tracking, and the template-averaged class embeddings for those.

Category selection (DCP-CLIP's, ``selection_threshold`` > 0) runs first, on SED's own CLIP embeddings; the network
then sees only the kept classes. Its own fast-inference rejection (preset ``*-fast``) runs inside the decoder on
what is left. PAMR, when asked for, refines the upsampled class probabilities.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .clip_dense import encode_prompts
from .dense import (
    DenseConfig,
    DenseSegmenter,
    PreparedVocabulary,
    SegmentationResult,
    _Stopwatch,
    precision_autocast,
    summarise,
)
from .modeling.sed import SedConfig, SedNetwork
from .pamr import PamrAffinity
from .text_cache import TextEmbeddingCache
from .vocabulary import Vocabulary


def resize_shortest_edge(image_rgb: np.ndarray, short: int, max_size: int) -> np.ndarray:
    """detectron2's ResizeShortestEdge for a uint8 image: its output size rule and PIL's bilinear resize."""
    height, width = image_rgb.shape[:2]
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    size = (int(new_w + 0.5), int(new_h + 0.5))
    if size == (width, height):
        return image_rgb
    return np.array(Image.fromarray(image_rgb).resize(size, Image.BILINEAR))  # a writable copy


class SedEncoder:
    """SED's fine-tuned CLIP as the pipeline's encoder: text embeddings, and image embeddings for prompts."""

    def __init__(self, network: SedNetwork, tokenizer, model_id: str, device: str = "cpu") -> None:
        self.network = network.eval().to(device)
        self.config: SedConfig = network.config
        self.model = network.clip_model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)
        side = self.config.clip_resolution
        self.native_size = (side, side)
        self.patch_size = (32, 32)  # the ConvNeXt's total stride: one dense embedding per 32x32 pixels
        self.mean = torch.tensor(self.config.pixel_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.config.pixel_std, device=self.device).view(1, 3, 1, 1)
        self.logit_scale = float(self.model.logit_scale.exp().clamp(max=100).item())
        self.embed_dim = int(self.model.text_projection.shape[-1])

    def encode_text(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (len(prompts), D), float32 on the CPU (open_clip's encode_text, run up
        to the last end-of-text token)."""
        return encode_prompts(self.model, self.tokenizer, prompts, self.device, self.embed_dim, batch_size)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> normalised as SED's CLIP expects."""
        return (images * 255.0 - self.mean) / self.std

    def dense_features(self, images: torch.Tensor, variant: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (global (B, D), dense (B, h, w, D)), L2-normalised (the prompt path's crop
        classifier). The global embedding is CLIP's own: the tower's head after average pooling."""
        dense, _, pooled = self.network.image_features(images)
        return F.normalize(pooled.float(), dim=-1), dense_grid(dense)


def dense_grid(dense: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) dense embeddings -> (B, h, w, D) L2-normalised (the pipeline's layout)."""
    return F.normalize(dense.permute(0, 2, 3, 1).float(), dim=-1)


class SedTextEmbeddings:
    """Per-template class embeddings (T, P, D) as SED builds them, cached per class name set."""

    def __init__(self, encoder: SedEncoder) -> None:
        self.encoder = encoder
        self._cache: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}
        self._lock = threading.Lock()

    def class_embedding(self, synonyms: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        key = (synonyms, templates)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        prompts = [template.format(name) for template in templates for name in synonyms]
        embeddings = self.encoder.encode_text(prompts)  # template-major, normalised per prompt
        if len(synonyms) > 1:
            embeddings = embeddings.reshape(len(templates), len(synonyms), -1).mean(dim=1)
            embeddings = F.normalize(embeddings, dim=-1)
        with self._lock:
            self._cache[key] = embeddings
        return embeddings

    def vocabulary(self, vocabulary: Vocabulary, templates: tuple[str, ...]) -> torch.Tensor:
        return torch.stack([self.class_embedding(tuple(names), templates) for names in vocabulary.synonyms])


class SedTower(torch.nn.Module):
    """SED's image side as the backends compile it: normalised (B, 3, S, S) pixels -> (image embedding (B, D),
    dense embeddings (B, D, S/32, S/32), guidance res4, res3, res2). The decoder depends on the vocabulary's size
    (and, with fast inference, on the data), so it stays in torch."""

    output_names = ("global", "dense", "res4", "res3", "res2")
    variant = "sed"

    def __init__(self, encoder: SedEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.network = encoder.network  # registers the weights

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dense, guidance, pooled = self.network.image_features(pixels)
        return (pooled, dense, *guidance)


class SedSegmenter(DenseSegmenter):
    """DenseSegmenter's contract (prepare, segment, segment_batch, frame_features, probability_maps, with_config)
    over SED. The decoder's per-class convolutions run `class_chunk` classes at a time (memory stays bounded at
    847 classes; the cross-class attention still sees all). The DenseConfig fields that describe CLIP dense
    inference (variant, windows, logit scale, whole-image resize, synonym merge, area threshold) do not apply;
    `check_sed_config` refuses the ones that would otherwise silently change nothing."""

    def __init__(self, encoder: SedEncoder, text_cache: TextEmbeddingCache, config: DenseConfig = DenseConfig(),
                 backend: str = "torch", engine_cache_dir: str | None = None) -> None:
        super().__init__(encoder, text_cache, config, backend, engine_cache_dir)  # type: ignore[arg-type]
        self.templates = SedTextEmbeddings(encoder)
        self.network = encoder.network

    @property
    def sed_config(self) -> SedConfig:
        return self.network.config

    def runner(self):
        """The backend running SED's tower (SedTower) for this precision, built once."""
        from .backends import make_runner

        key = ("sed", self.config.precision)
        with self._runners_lock:
            runner = self._runners.get(key)
            if runner is None:
                runner = make_runner(self.encoder, "sed", self.backend, self.config.precision,  # type: ignore
                                     self.engine_cache_dir, tower=SedTower(self.encoder))
                self._runners[key] = runner
            self._active[0] = runner
        return runner

    def prepare(self, vocabulary: Vocabulary) -> PreparedVocabulary:
        """Template-averaged class embeddings (prompts, tracking, selection) and SED's per-template ones."""
        per_template = self.templates.vocabulary(vocabulary, vocabulary.templates)
        text = F.normalize(per_template.mean(dim=1), dim=-1)
        return PreparedVocabulary(vocabulary, text, template_embeddings=per_template)

    def preprocess_sed(self, image_rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 -> ((1, 3, S, S) the tower's input, the test-time resized (h, w))."""
        config = self.sed_config
        resized = resize_shortest_edge(image_rgb, config.min_size_test, config.max_size_test)
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).to(self.encoder.device)
        tensor = tensor.permute(2, 0, 1).unsqueeze(0).float()
        tensor = (tensor - self.encoder.mean) / self.encoder.std
        side = config.clip_resolution
        return F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False), resized.shape[:2]

    def _autocast(self):
        return precision_autocast(self.encoder.device.type, self.config.precision)

    @torch.inference_mode()
    def frame_features(self, image_rgb: np.ndarray) -> torch.Tensor:
        return dense_grid(self.tower(image_rgb)[1])[0]

    def tower(self, image_rgb: np.ndarray, timings: dict[str, float] | None = None):
        """SED's forward up to the decoder: (the test-time resized (h, w), dense embeddings (1, D, h', w'),
        guidance features, the image embedding (1, D))."""
        clock = _Stopwatch(timings if timings is not None else {})
        pixels, resized = self.preprocess_sed(image_rgb)
        clock.lap("preprocess")
        run = self.runner()
        eager = self.backend in ("torch", "torch-compile", "auto")  # exported backends apply their own precision
        with self._tower_lock, (self._autocast() if eager else contextlib.nullcontext()):
            pooled, dense, *guidance = run(pixels)
        clock.lap("image_encoder")
        return resized, dense.float(), [g.float() for g in guidance], pooled.float()

    def decode(self, dense: torch.Tensor, guidance: list[torch.Tensor], prepared: PreparedVocabulary,
               classes: torch.Tensor | None = None, timings: dict[str, float] | None = None) -> torch.Tensor:
        """The decoder's (K, S/4, S/4) probabilities for `classes` (all when None)."""
        clock = _Stopwatch(timings if timings is not None else {})
        text = prepared.template_embeddings
        if text is None:
            raise ValueError("this vocabulary was prepared for a CLIP dense model, not for SED")
        text = text.to(self.encoder.device)
        if classes is not None:
            text = text[classes.to(text.device)]
        with self._tower_lock, self._autocast():
            probs = self.network.aggregator(dense, text, guidance, fast_top_k=self.config.fast_top_k,
                                            class_chunk=self.config.class_chunk)
        clock.lap("decoder")
        return probs.float()

    def _to_frame(self, probs: torch.Tensor, resized: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """SED's sem_seg_postprocess for (k, h, w) maps: crop to the resized image's extent, bilinear to `size`."""
        cropped = probs[:, : resized[0], : resized[1]]
        return F.interpolate(cropped[None], size=size, mode="bilinear", align_corners=False)[0]

    def _segment_batch(self, images_rgb: list[np.ndarray], prepared: PreparedVocabulary) -> list[SegmentationResult]:
        for image_rgb in images_rgb:
            if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
                raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}")
        return [self._segment_one(image_rgb, prepared) for image_rgb in images_rgb]

    def _select(self, pooled: torch.Tensor, dense: torch.Tensor, prepared: PreparedVocabulary,
                timings: dict[str, float]) -> torch.Tensor | None:
        """DCP-CLIP's category selection on SED's CLIP embeddings; None when off (every class)."""
        if self.config.selection_threshold <= 0:
            return None
        clock = _Stopwatch(timings)
        grid = dense_grid(dense)[0]
        text = prepared.text_embeddings.to(grid.device)
        patch_logits = self.encoder.logit_scale * torch.einsum("hwd,cd->hwc", grid, text)
        selected = self.select_categories(F.normalize(pooled.float(), dim=-1), patch_logits, text)
        clock.lap("category_selection")
        return selected

    def _segment_one(self, image_rgb: np.ndarray, prepared: PreparedVocabulary) -> SegmentationResult:
        timings: dict[str, float] = {}
        resized, dense, guidance, pooled = self.tower(image_rgb, timings)
        selected = self._select(pooled, dense, prepared, timings)
        probs = self.decode(dense, guidance, prepared, selected, timings)
        clock = _Stopwatch(timings)
        size = image_rgb.shape[:2]
        affinity = None
        if self.config.pamr_steps > 0:
            guide = torch.from_numpy(image_rgb).to(probs.device).permute(2, 0, 1).float()
            affinity = PamrAffinity(guide, self.config.pamr_dilations_for(size, self.encoder.native_size))
        best = best_index = None
        chunk = self.config.class_chunk
        for start in range(0, probs.shape[0], chunk):
            part = self._to_frame(probs[start:start + chunk], resized, size)
            if affinity is not None:
                part = affinity.refine(part, self.config.pamr_steps)
            part_best, part_index = part.max(dim=0)
            if best is None:
                best, best_index = part_best, part_index
            else:
                better = part_best > best
                best = torch.where(better, part_best, best)
                best_index = torch.where(better, part_index + start, best_index)
        clock.lap("merge_upsample")
        kept = torch.arange(len(prepared.vocabulary)) if selected is None else selected.cpu()
        class_index = kept.numpy()[best_index.cpu().numpy()]
        grid = dense_grid(dense.float())[0]
        if self.config.tag_validation_top_k > 0:
            class_index = self.validate_tags(class_index, grid, prepared, kept)
            clock.lap("tag_validation")
        result = summarise(class_index, best.cpu().numpy().astype(np.float32), prepared,
                           self.config.score_threshold, self.config.below_threshold_label)
        clock.lap("postprocess")
        result.timings_ms = timings
        result.dense_features = grid
        result.selected_classes = sorted(int(c) for c in kept)
        result.config = self.config
        return result

    @torch.inference_mode()
    def probability_maps(self, image_rgb: np.ndarray, prepared: PreparedVocabulary) -> torch.Tensor:
        """(C, H, W) float32 class probabilities at the frame's size: SED's ``sem_seg`` output (sigmoid per
        class, not a softmax; 0 for classes its fast inference rejected)."""
        frozen = self.with_config(self.config)
        resized, dense, guidance, _ = frozen.tower(image_rgb)
        probs = frozen.decode(dense, guidance, prepared)
        return frozen._to_frame(probs, resized, image_rgb.shape[:2]).cpu()


def check_sed_config(config: DenseConfig) -> None:
    """Refuse the dense settings SED's inference has no place for (they would silently change nothing)."""
    problems = []
    if config.window_stride > 0:
        problems.append("window_stride (SED sees the whole image at 768 px; its released test path has no windows)")
    if config.area_threshold > 0:
        problems.append("area_threshold (SCLIP's post-processing, not SED's)")
    if config.refinement == "guided":
        problems.append("refinement guided")
    if problems:
        raise ValueError("not available with SED: " + "; ".join(problems))


def build_sed_encoder(arch: str, weights=None, device: str = "cpu", seed: int = 0) -> SedEncoder:
    """SED architecture `arch` (model_configs/sed/*.json) with its released checkpoint `weights` loaded
    strictly, or seeded random weights when `weights` is None."""
    import open_clip

    from .clip_builders import _quiet_random_init_warning, build_clip
    from .modeling.sed import build_sed, checkpoint_state_dict, get_sed_config
    from .registry import sha256_of

    config = get_sed_config(arch)
    if weights is None:
        torch.manual_seed(seed)
    with _quiet_random_init_warning(weights is not None):  # the checkpoint is loaded next
        network = build_sed(config, build_clip)
    if weights is not None:
        network.load_state_dict(checkpoint_state_dict(weights), strict=True)
    model_id = f"{arch}@{sha256_of(weights)[:12]}" if weights is not None else f"{arch}@random{seed}"
    return SedEncoder(network, open_clip.get_tokenizer(config.clip_arch), model_id, device=device)
