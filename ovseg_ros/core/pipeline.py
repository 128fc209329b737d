"""The whole frame pipeline, ROS-free: one factory, one settings object, one call per batch.

A frame's path: `process_batch` takes one settings snapshot and one vocabulary reference for the batch, runs the
image tower once over every camera's frame, labels each frame (dense segmenter), caches it for prompts with its
header and depth (one cache per camera), refines the labels with SAM when the snapshot says so, draws the overlay,
computes the 3D outputs from the paired depth and, if asked, segments everything -- and returns all of it as a
`FrameOutput` per frame, which the node only converts to messages. Prompts (`answer_prompts`) and vocabulary
changes (`set_vocabulary`: validate, embed, persist, swap) go through the same object, so the node, the `ovseg`
CLI, the benchmarks and the demo share one implementation built by `build_pipeline`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .dense import DenseSegmenter, PreparedVocabulary, SegmentationResult
from .geometry import PairedDepth, Region3D, class_regions, labelled_cloud_points, region_centroid
from .instances import (
    background_mask,
    extract_instances,
    instances_from_masks,
    object_masks,
    pooled_embeddings,
    pooled_weights,
)
from .overlay import blend, draw_object_names, draw_prompt_answers
from .prompt import CachedFrame, Prompt, PromptAnswer, PromptError, PromptSegmenter
from .settings import Settings, check_consistent, replace_settings
from .text_cache import TextEmbeddingCache
from .tracking import CONFIRMED, Track, Tracker
from .turns import ModelTurns
from .vocabulary import (
    Exemplar,
    Vocabulary,
    VocabularyError,
    VocabularyLimits,
    classes_named,
    load_vocabulary,
    make_vocabulary,
    save_vocabulary,
    with_exemplars,
)

LOG = logging.getLogger("ovseg_ros.pipeline")
EXEMPLAR_MARGIN = 0.1  # cosine by which an example image beats the best text query inside it (see _exemplar_scale)
MIN_EXAMPLE_SCALE = 0.05  # an example scaled this far down wins almost nowhere (the reply says so)
MIN_EXAMPLE_SIDE = 8  # pixels: a smaller image or box holds too little to stand for an object
EXEMPLAR_CONTEXT = 0.5  # share of the surroundings' pooled feature taken off a box example (see context_subtracted)
FrameKey = tuple[int, int]  # (sec, nanosec) of the frame's header stamp: how prompts name a cached frame
REQUESTS = "\0requests"  # the frame cache of images sent with prompt requests (never a camera's name)


def frame_key(stamp) -> FrameKey:
    """The cache key of anything with `sec` and `nanosec` (a builtin_interfaces Time)."""
    return int(stamp.sec), int(stamp.nanosec)


@dataclass
class FrameInput:
    """One camera frame handed to `process_batch`."""

    camera: str  # camera name ("" = the one unnamed camera)
    image: np.ndarray  # (H, W, 3) uint8 RGB
    key: FrameKey
    header: object = None  # returned untouched with the outputs and with prompt answers on this frame
    depth: PairedDepth | None = None  # depth paired with this frame (aligned, metres)


@dataclass
class FrameOutput:
    """Everything published for one frame; `error` set (and nothing else) if this frame failed alone."""

    frame: FrameInput
    result: SegmentationResult | None = None
    vocabulary: Vocabulary | None = None  # the vocabulary `result` was computed with
    overlay: np.ndarray | None = None  # (H, W, 3) uint8 RGB, when publish_overlay
    depth: PairedDepth | None = None  # the paired depth limited to max_range_m
    cloud: np.ndarray | None = None  # CLOUD_DTYPE points, with depth
    regions: list[Region3D] | None = None  # per present class, with depth and publish_markers
    instances: np.ndarray | None = None  # (H, W) uint16 instance ids (0 = none), when segment_everything
    instance_answers: list[PromptAnswer] = field(default_factory=list)
    objects: list[ObjectView] | None = None  # published tracks (confirmed, visible now), when track_objects
    object_ids: np.ndarray | None = None  # (H, W) uint16 track id per pixel (0 = none), when track_objects
    named_objects: list[tuple[int, str, np.ndarray]] = field(default_factory=list)  # (id or 0, label, box) of
    # every track seen in this frame: the names the overlay shows
    tracking_ms: float = 0.0  # instances + tracker update
    tracking_error: str = ""  # set when tracking alone failed on this frame (everything else is published)
    settings: Settings | None = None  # the snapshot this frame was computed with
    error: str = ""


@dataclass(frozen=True)
class ObjectView:
    """A track as published: a copy taken by the worker, so services and publishers never see it change."""

    id: int
    label: str
    class_id: int
    score: float  # share of the accumulated evidence behind `label`
    top_labels: list[str]
    top_scores: list[float]
    box: np.ndarray  # (4,) x1, y1, x2, y2
    state: str
    age: int
    hits: int
    visible: bool
    mask: np.ndarray  # (H, W) bool, last seen
    embedding: np.ndarray  # (D,) float32 normalised
    centroid: np.ndarray | None
    extent: np.ndarray | None

    @classmethod
    def of(cls, track: Track, names: list[str], top_k: int) -> ObjectView:
        ids, scores = track.label_scores(top_k)
        return cls(track.id, names[ids[0]], ids[0], scores[0], [names[i] for i in ids], scores, track.box.copy(),
                   track.state, track.age, track.hits, track.visible, track.mask,
                   track.embedding.numpy().astype(np.float32), track.centroid, track.extent)


@dataclass
class FoundObjects:
    header: object  # of the frame the camera's tracks were last updated on
    objects: list[ObjectView]
    scores: list[float]  # cosine similarity to the query (objects ranked by the query-vs-vocabulary probability)
    depth_frame_id: str = ""  # the frame of the objects' 3D places


@dataclass
class PromptRequest:
    """A prompt query in core terms (the node converts SegmentPrompt / PromptQuery to this)."""

    prompts: list[Prompt]
    camera: str = ""  # "" = the first camera
    key: FrameKey | None = None  # a cached frame's stamp; None = the newest
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB sent with the request: cached apart from camera frames
    image_key: FrameKey = (0, 0)
    image_header: object = None
    vocabulary: list[str] = field(default_factory=list)  # non-empty: label with these names instead (version 0)
    multimask: bool = False
    crop_fusion: bool = False


@dataclass
class PromptOutcome:
    frame: CachedFrame  # the frame the prompts were answered on (header and depth with it)
    camera: str
    answers: list[PromptAnswer]
    vocabulary_version: int  # 0 when the request brought its own vocabulary
    places: list[tuple[np.ndarray, np.ndarray] | None] | None  # per answer (centroid, extent), None = no depth
    overlay: np.ndarray | None  # the answers drawn on the frame, when publish_overlay


@dataclass
class ExemplarRequest:
    """An example image of a class: its own image (e.g. a crop), or a box on a recent frame of a camera."""

    label: str
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    box: np.ndarray | None = None  # (4,) x1, y1, x2, y2 on the camera's frame
    camera: str = ""
    key: FrameKey | None = None  # the frame's stamp; None = the newest


@dataclass(frozen=True)
class VocabularyChange:
    success: bool
    message: str
    version: int  # the version in force afterwards (0 = no model)


class SegmentationPipeline:
    """Dense segmentation, prompts, refinement, 3D and the vocabulary of one node's cameras, on shared models.

    Thread-safe for one batch worker plus any number of service threads: settings and vocabulary are immutable
    objects swapped by reference, and each batch or request reads each reference once.
    """

    def __init__(self, settings: Settings, segmenter: DenseSegmenter, prompter: PromptSegmenter | None,
                 vocabulary: Vocabulary, cameras: list[str]) -> None:
        self.cameras = list(cameras) or [""]
        self.limits = VocabularyLimits(max_classes=settings.max_classes, max_name_length=settings.max_name_length)
        self._segmenter = segmenter
        self._settings = (settings, segmenter.with_config(check_consistent(settings)))
        self._prepared = self._segmenter.prepare(vocabulary)
        self._vocab_lock = threading.Lock()  # serialises changes; readers just take the reference
        self.turns = ModelTurns()  # vocabulary writes take the model ahead of the next frame
        self.prompters: dict[str, PromptSegmenter] = {}  # camera (or REQUESTS) -> its own frame cache
        if prompter is not None:  # one SAM and one CLIP; a frame cache per camera and one for sent images
            self.prompters[self.cameras[0]] = prompter
            for name in [*self.cameras[1:], REQUESTS]:
                self.prompters[name] = prompter.for_another_camera()
            prompter.prepare_vocabulary(self._prepared.vocabulary)
        self.trackers = {name: Tracker() for name in self.cameras}
        self._latest: dict[str, tuple[FrameKey, torch.Tensor, tuple[int, int]]] = {}  # camera -> newest frame's
        # key, dense features and size (examples given as boxes need them, with or without SAM's frame cache)
        self._tracked_header: dict[str, object] = {}  # camera -> header of the frame its tracks were updated on
        self._tracker_lock = threading.Lock()  # the worker updates, services read
        self.last_batch = 0  # frames in the last image-tower pass

    # ------------------------------------------------------------------ state
    @property
    def settings(self) -> Settings:
        return self._settings[0]

    @property
    def segmenter(self) -> DenseSegmenter:
        """The dense segmenter frozen to the current settings."""
        return self._settings[1]

    @property
    def prepared(self) -> PreparedVocabulary:
        return self._prepared

    @property
    def vocabulary(self) -> Vocabulary:
        return self._prepared.vocabulary

    @property
    def has_prompts(self) -> bool:
        return bool(self.prompters)

    def update_settings(self, changes: dict[str, object]) -> Settings:
        """Apply setting changes as one new snapshot (ValueError with the reason, nothing changed, if refused)."""
        settings = replace_settings(self.settings, changes)
        config = check_consistent(settings)
        if config.refinement == "sam" and not self.has_prompts:
            raise ValueError("refinement 'sam' needs the SAM model, which this pipeline has not loaded")
        if settings.track_objects and settings.track_source == "everything" and not self.has_prompts:
            raise ValueError("track_source 'everything' needs the SAM model, which this pipeline has not loaded")
        was_tracking = self.settings.track_objects
        self._settings = (settings, self._segmenter.with_config(config))  # one reference swap
        if was_tracking and not settings.track_objects:
            self.clear_tracks()
        return settings

    def describe(self) -> dict[str, str]:
        """Model, device, backend and vocabulary, for diagnostics."""
        segmenter = self.segmenter
        runner = segmenter.active_runner
        backend = self.settings.backend
        if runner is not None:
            chosen = getattr(runner, "chosen", None)  # auto: the backend it measured fastest
            backend = f"auto -> {chosen.name}" if chosen is not None else runner.name
        return {"model": segmenter.encoder.model_id, "device": str(segmenter.encoder.device), "backend": backend,
                "vocabulary_version": str(self._prepared.version), "classes": str(len(self.vocabulary))}

    # ------------------------------------------------------------------ frames
    def warm_up(self) -> None:
        """One pass at start so the first camera frame does not pay for lazy initialisation."""
        self.segmenter.segment(np.zeros((64, 64, 3), np.uint8), self._prepared)

    def process_batch(self, frames: list[FrameInput]) -> list[FrameOutput]:
        """Segment every frame in one tower pass and compute all their outputs with ONE settings snapshot and ONE
        vocabulary. A failing frame gets `error`; the others go on."""
        settings, segmenter = self._settings
        prepared = self._prepared
        self.last_batch = len(frames)
        if not frames:
            return []
        try:
            with self.turns.routine():  # a vocabulary write waiting goes first
                results = segmenter.segment_batch([frame.image for frame in frames], prepared)
        except Exception as exc:  # one bad batch must never stop the stream
            return [FrameOutput(frame, error=f"frame failed: {exc!r}") for frame in frames]
        outputs = []
        for frame, result in zip(frames, results, strict=True):
            try:
                outputs.append(self._finish(frame, result, prepared, settings))
            except Exception as exc:
                outputs.append(FrameOutput(frame, error=f"frame failed: {exc!r}"))
        return outputs

    def _finish(self, frame: FrameInput, result: SegmentationResult, prepared: PreparedVocabulary,
                settings: Settings) -> FrameOutput:
        output = FrameOutput(frame, vocabulary=prepared.vocabulary, settings=settings)
        self._latest[frame.camera] = (frame.key, result.dense_features, frame.image.shape[:2])
        depth = frame.depth.limited(settings.max_range_m) if frame.depth is not None else None
        prompter = self.prompters.get(frame.camera)
        if prompter is not None:
            prompter.add_frame(frame.key, frame.image, result.dense_features, frame.header, depth)
            if result.config.refinement == "sam":
                result = prompter.refine_result(frame.key, result, prepared, result.config.score_threshold)
        output.result = result
        names = prepared.vocabulary.display_names
        if settings.publish_overlay:
            output.overlay = blend(frame.image, result.labels, len(names), alpha=float(settings.overlay_alpha),
                                   names=names, class_ids=result.class_ids, class_areas=result.class_areas)
        if depth is not None:
            output.depth = depth
            output.cloud = labelled_cloud_points(depth, frame.image, result.labels, result.confidence,
                                                 settings.cloud_stride)
            if settings.publish_markers:
                output.regions = class_regions(depth, result.labels, result.class_ids, names)
        everything = settings.track_objects and settings.track_source == "everything" and prompter is not None
        if prompter is not None and (settings.segment_everything or everything):
            instances, answers = prompter.segment_everything(frame.key, prepared,
                                                             points_per_side=settings.everything_points_per_side)
            if settings.segment_everything:
                output.instances, output.instance_answers = instances, answers
        if settings.track_objects:
            try:
                self._objects(frame, output, result, prepared, settings, depth, answers if everything else None)
            except Exception as exc:  # the frame's labels, overlay and 3D are still published
                output.tracking_error = f"tracking failed: {exc!r}"
        return output

    def _objects(self, frame: FrameInput, output: FrameOutput, result: SegmentationResult,
                 prepared: PreparedVocabulary, settings: Settings, depth: PairedDepth | None,
                 answers: list[PromptAnswer] | None) -> None:
        """Object instances of the frame (dense regions, or SAM's masks) -> the camera's tracker."""
        start = time.perf_counter()
        scale = self.segmenter.encoder.logit_scale
        background_classes = classes_named(prepared.vocabulary, settings.track_background)
        with self._tracker_lock:
            self.trackers[frame.camera].sync_frame(result.labels, prepared.version, settings.track_scene_cut)
        if answers is not None:
            masks = object_masks([a.mask for a in answers],
                                 background_mask(result, settings.track_max_area, background_classes),
                                 settings.track_min_area, settings.track_max_area)
            objects = instances_from_masks(masks[: settings.track_max_tracks], result.dense_features, prepared,
                                           scale, depth)
        else:
            with self._tracker_lock:  # labels of the frame's vocabulary: relabel first after a change
                tracker = self.trackers[frame.camera]
                tracker.sync_vocabulary(prepared, scale)
                known = tracker.expected_masks()
            objects = extract_instances(result, prepared, scale, depth, settings.track_min_area,
                                        settings.track_max_area, max_instances=settings.track_max_tracks,
                                        known=known, background_classes=background_classes)
        self._track(frame.camera, frame.header, objects, output, prepared, settings,
                    depth.frame_id if depth is not None else "")
        output.tracking_ms = (time.perf_counter() - start) * 1000

    def _track(self, camera: str, header: object, objects: list, output: FrameOutput,
               prepared: PreparedVocabulary, settings: Settings, depth_frame_id: str) -> None:
        names = prepared.vocabulary.display_names
        with self._tracker_lock:
            tracker = self.trackers[camera]
            tracker.config = dataclasses.replace(tracker.config, min_hits=settings.track_min_hits,
                                                 max_lost=settings.track_max_lost,
                                                 max_tracks=settings.track_max_tracks)
            tracker.sync_vocabulary(prepared, self.segmenter.encoder.logit_scale)
            published = tracker.update(objects[: settings.track_max_tracks])
            output.objects = [ObjectView.of(t, names, settings.prompt_top_k) for t in published]
            output.named_objects = [(t.id if t.state == CONFIRMED else 0, names[t.label_id], t.box)
                                    for t in tracker.tracks if t.visible]
            if output.overlay is not None:  # every object seen now is named; ids only where `objects` has them
                draw_object_names(output.overlay, output.named_objects)
            self._tracked_header[camera] = (header, depth_frame_id)
        ids = np.zeros(output.result.labels.shape, np.uint16)
        for view in sorted(output.objects, key=lambda v: -int(v.mask.sum())):  # smaller on top
            ids[view.mask] = view.id
        output.object_ids = ids

    def find_objects(self, query: str, camera: str = "", max_results: int = 0,
                     include_lost: bool = False) -> FoundObjects:
        """A camera's tracks ranked by CLIP similarity of their embeddings to free text (the vocabulary's
        templates), without touching the vocabulary. ValueError / PromptError with the reason if refused."""
        query = query.strip()
        if not query:
            raise ValueError("the query is empty: say what to look for, e.g. 'red circle'")
        if len(query) > self.limits.max_name_length:
            raise ValueError(f"the query has {len(query)} characters; the limit is {self.limits.max_name_length}")
        camera = self.camera_named(camera)
        settings = self.settings
        if not settings.track_objects:
            raise ValueError("object tracking is off (track_objects: false)")
        with self._tracker_lock:
            tracker = self.trackers[camera]
            prepared = tracker.prepared  # the vocabulary the tracks' evidence is over (names and queries agree)
            tracks = [t for t in tracker.tracks
                      if t.state == "confirmed" and t.visible or include_lost and t.state == "lost"]
            header, depth_frame_id = self._tracked_header.get(camera, (None, ""))
            views = [ObjectView.of(t, prepared.vocabulary.display_names, settings.prompt_top_k) for t in tracks] \
                if prepared is not None else []
        if not views:
            return FoundObjects(header, [], [], depth_frame_id)
        text = self.segmenter.text_cache.embed((query,), prepared.vocabulary.templates, persist=False)[0]
        embeddings = torch.from_numpy(np.stack([v.embedding for v in views]))
        scores = (embeddings @ text.float()).tolist()
        # Ranked by how much better the query fits than every vocabulary class (the query as one more class).
        queries = torch.cat([prepared.text_embeddings.float(), text[None].float()])
        ranking = torch.softmax(self.segmenter.encoder.logit_scale * embeddings @ queries.T, dim=-1)[:, -1].tolist()
        order = sorted(range(len(views)), key=lambda i: -ranking[i])[: max_results or None]
        return FoundObjects(header, [views[i] for i in order], [scores[i] for i in order], depth_frame_id)

    def clear_tracks(self) -> None:
        """Forget every camera's tracks (tracking paused: deactivation, track_objects off)."""
        with self._tracker_lock:
            for camera in self.trackers:
                self.trackers[camera] = Tracker(self.trackers[camera].config)
            self._tracked_header.clear()

    # ------------------------------------------------------------------ prompts
    def answer_prompts(self, request: PromptRequest) -> PromptOutcome:
        """Open-Vocabulary SAM on a cached camera frame or on the request's own image; PromptError if refused."""
        if not self.prompters:
            raise PromptError("prompts are disabled: no sam_model (and prompt_model is sam)")
        camera = self.camera_named(request.camera)
        prepared, version = self._prepared, self._prepared.version
        if request.vocabulary:
            override = make_vocabulary(list(request.vocabulary), [], previous=prepared.vocabulary,
                                       limits=self.limits)
            prepared, version = self.segmenter.prepare(override), 0
        if request.image is not None:  # the client's image, in a cache of its own: never a camera's frame
            source = REQUESTS
            self.prompters[source].add_frame(request.image_key, request.image,
                                             self.segmenter.frame_features(request.image), request.image_header)
            key = request.image_key
        else:
            key = request.key
            source = self._frame_source(camera, key)
        prompter = self.prompters[source]
        frame, answers = prompter.query(prompter.frame(key).key, request.prompts, prepared,
                                        multimask=request.multimask, crop_fusion=request.crop_fusion)
        places = None
        if frame.depth is not None:
            places = [region_centroid(a.mask, frame.depth.depth_m, frame.depth.intrinsics) for a in answers]
        overlay = draw_prompt_answers(frame.image, answers, request.prompts) if self.settings.publish_overlay \
            else None
        return PromptOutcome(frame, camera, answers, version, places, overlay)

    def camera_named(self, name: str) -> str:
        """The camera a request means: empty = the first; an unknown name is refused with the known ones."""
        name = name.strip().strip("/")
        if not name:
            return self.cameras[0]
        if name in self.cameras:
            return name
        known = ", ".join(c for c in self.cameras if c) or "none (this node has one unnamed camera)"
        raise PromptError(f"unknown camera {name!r}; cameras of this node: {known}")

    def _frame_source(self, camera: str, key: FrameKey | None) -> str:
        """Where a by-stamp prompt finds its frame: the camera's frames first, then images sent with earlier
        requests (kept apart, so a client's image never stands in for a camera frame with the same stamp).
        No stamp means the camera's newest frame, or the newest sent image while the camera has none."""
        own, sent = self.prompters[camera].cached_keys(), self.prompters[REQUESTS].cached_keys()
        if key is None:
            return camera if own or not sent else REQUESTS
        if key in own:
            return camera
        return REQUESTS if key in sent or not own else camera

    # ------------------------------------------------------------------ vocabulary
    def set_vocabulary(self, labels: list[str], templates: list[str], exemplars: list[ExemplarRequest] = (),
                       clear_exemplars: bool = False) -> VocabularyChange:
        """Validate, embed, persist, swap -- in that order: a change that cannot be kept is not made. Never raises.
        Example images already in the vocabulary stay for the labels that remain unless `clear_exemplars`."""
        with self._vocab_lock, self.turns.urgent():
            current = self._prepared
            try:
                vocabulary = make_vocabulary(labels, templates, previous=current.vocabulary, limits=self.limits)
                keep = () if clear_exemplars else current.vocabulary.exemplars
                measured = [self._exemplar(e, index) for index, e in enumerate(exemplars)]
                base = with_exemplars(vocabulary, [], keep, self.limits)
                prepared = self.segmenter.prepare(base)
                weak = []
                if measured:  # each new example is scaled against the queries it will compete with
                    scaled = [self._scaled_exemplar(*m, prepared) for m in measured]
                    weak = [e.label for e, scale in scaled if scale <= MIN_EXAMPLE_SCALE]
                    vocabulary = with_exemplars(vocabulary, [e for e, _ in scaled], keep, self.limits)
                    prepared = self.segmenter.prepare(vocabulary)
                else:
                    vocabulary = base
                if self.prompters:  # a prompt model with its own text side embeds the classes now, not on a prompt
                    next(iter(self.prompters.values())).prepare_vocabulary(vocabulary)
            except (VocabularyError, PromptError) as exc:
                return VocabularyChange(False, str(exc), current.version)
            except Exception as exc:  # text encoding failure must not take the node down
                return VocabularyChange(False, f"embedding the vocabulary failed: {exc!r}", current.version)
            path = vocabulary_path(self.settings)
            if path:
                try:
                    save_vocabulary(vocabulary, path)
                except OSError as exc:
                    return VocabularyChange(False, f"cannot save the vocabulary to {path} ({exc}); the vocabulary "
                                                   "in force is unchanged", current.version)
            self._prepared = prepared
        examples = f", {len(vocabulary.exemplars)} example images" if vocabulary.exemplars else ""
        if weak:
            examples += (f" (the example for {', '.join(map(repr, weak))} differs too little from the rest of its "
                         "frame to win many pixels: a tighter box or a clearer view would help)")
        return VocabularyChange(True, f"vocabulary v{vocabulary.version}: {len(vocabulary)} classes{examples}",
                                vocabulary.version)

    def _exemplar(self, request: ExemplarRequest, index: int) -> tuple[str, torch.Tensor, np.ndarray, torch.Tensor]:
        """The example's label, the dense features (h, w, D) it came from, its (H, W) region there and its
        unscaled (D,) feature: its image's dense features pooled whole, or the frame's under the box less its
        surroundings (the same kind of feature every pixel and object is classified with)."""
        label = request.label.strip()
        if not label:
            raise VocabularyError(f"exemplar_labels[{index}] is empty: an example image needs a class name")
        if request.image is not None:
            if min(request.image.shape[:2]) < MIN_EXAMPLE_SIDE:
                raise VocabularyError(f"exemplar_images[{index}] is {request.image.shape[1]}x"
                                      f"{request.image.shape[0]} pixels: an example needs at least "
                                      f"{MIN_EXAMPLE_SIDE}x{MIN_EXAMPLE_SIDE}")
            dense = self.segmenter.frame_features(request.image)
            mask = np.ones(request.image.shape[:2], bool)
            return label, dense, mask, pooled_embeddings(dense, mask[None])[0]
        camera = self.camera_named(request.camera)
        if request.key is not None and camera in self.prompters and request.key in \
                self.prompters[camera].cached_keys():
            frame = self.prompters[camera].frame(request.key)
            dense, size = frame.clip_dense, frame.image.shape[:2]
        elif (latest := self._latest.get(camera)) is not None and request.key in (None, latest[0]):
            _, dense, size = latest
        else:
            raise VocabularyError("no frame of camera " + (repr(camera) if camera else "(the first)")
                                  + (" with that stamp" if request.key else " yet") + " to take the example from")
        box = np.asarray(request.box, dtype=np.float64).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise VocabularyError(f"example box {index} needs four finite numbers x1, y1, x2, y2")
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= size[1] and 0 <= y1 < y2 <= size[0]):
            raise VocabularyError(f"example box {index} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty or leaves the "
                                  f"{size[1]}x{size[0]} frame")
        if min(x2 - x1, y2 - y1) < MIN_EXAMPLE_SIDE:
            raise VocabularyError(f"example box {index} is {x2 - x1:g}x{y2 - y1:g} pixels: an example needs at "
                                  f"least {MIN_EXAMPLE_SIDE}x{MIN_EXAMPLE_SIDE}")
        mask = np.zeros(size, bool)
        mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
        return label, dense, mask, context_subtracted(dense, mask, box)

    def _scaled_exemplar(self, label: str, dense: torch.Tensor, mask: np.ndarray, embedding: torch.Tensor,
                         against: PreparedVocabulary) -> tuple[Exemplar, float]:
        scale = self._exemplar_scale(dense, mask, embedding, against.text_embeddings)
        return Exemplar(label, tuple(float(v) for v in embedding * scale), self.segmenter.encoder.model_id), scale

    @staticmethod
    def _exemplar_scale(dense: torch.Tensor, mask: np.ndarray, embedding: torch.Tensor, queries: torch.Tensor
                        ) -> float:
        """Image-to-image cosines run far higher than image-to-text ones, so a raw example would win most pixels
        of any frame. Its query is scaled (the softmax sees the scaled cosine) as far as its own frame allows:
        the largest scale (at most 1) at which it stays below the best text query on 99 % of the cells outside
        its region. On a new frame the same object's cells are less like the example than its own were, so a
        scale chosen only to win its own region by a margin loses the object elsewhere. An example image with no
        frame around it gets the smallest scale that beats the text inside it by EXEMPLAR_MARGIN. `queries`
        (Q, D) are those it will compete with: the new vocabulary's text and the examples it keeps."""
        weights = pooled_weights(dense, mask).reshape(-1)
        cells = dense.reshape(-1, dense.shape[-1]).float().cpu()
        own = cells @ embedding  # (cells,) cosine to the example
        best_text = (cells @ queries.float().T).max(dim=1).values
        outside = (weights <= 0.0) & (own > 0)
        if outside.sum() >= 10:  # the scale at which 1 % of the other cells would turn into the example
            scale = float(torch.quantile(best_text[outside] / own[outside], 0.01))
        else:
            inside = weights >= 0.5 if (weights >= 0.5).any() else weights > 0
            scale = float((best_text[inside].mean() + EXEMPLAR_MARGIN) / own[inside].mean().clamp(min=1e-6))
        return max(MIN_EXAMPLE_SCALE, min(1.0, scale))


def context_subtracted(dense: torch.Tensor, mask: np.ndarray, box: np.ndarray) -> torch.Tensor:
    """(D,) feature of a box example: the box's pooled feature less EXEMPLAR_CONTEXT of its surroundings' (a
    band half the box's size around it), renormalised. A box around a thin or round object is mostly
    background; what the box shares with its surroundings is not what the operator pointed at. On the demo
    model this took the example's class from ~40 % to ~90 % of the same object's pixels on a new frame."""
    x1, y1, x2, y2 = (float(v) for v in box)
    half_w, half_h = (x2 - x1) / 2, (y2 - y1) / 2
    around = np.zeros(mask.shape, bool)
    top, left = max(0, int(y1 - half_h)), max(0, int(x1 - half_w))
    around[top:int(np.ceil(y2 + half_h)), left:int(np.ceil(x2 + half_w))] = True
    around &= ~mask
    if not around.any():  # the box is the whole frame
        return pooled_embeddings(dense, mask[None])[0]
    inside, context = pooled_embeddings(dense, np.stack([mask, around]))
    return F.normalize(inside - EXEMPLAR_CONTEXT * context, dim=0)


# ---------------------------------------------------------------------- factory
def vocabulary_path(settings: Settings) -> str:
    """vocabulary_file with ~ expanded (the same file is saved and restored); "" = no persistence."""
    return os.path.expanduser(settings.vocabulary_file) if settings.vocabulary_file else ""


def initial_vocabulary(settings: Settings, log: Callable[[int, str], None]) -> Vocabulary:
    """The persisted vocabulary if there is a valid one (a restart keeps what the operator set); a file that
    cannot be used is renamed FILE.bad-TIME and the `vocabulary` setting is used."""
    limits = VocabularyLimits(max_classes=settings.max_classes, max_name_length=settings.max_name_length)
    path = vocabulary_path(settings)
    if path and os.path.exists(path):
        try:
            vocabulary = load_vocabulary(path, limits)
            log(logging.INFO, f"restored vocabulary v{vocabulary.version} ({len(vocabulary)} classes) from {path}")
            return vocabulary
        except VocabularyError as exc:
            log(logging.WARNING, f"{exc}; moved it to {set_aside(path)} and using the `vocabulary` parameter "
                                 "instead")
    return make_vocabulary(list(settings.vocabulary), list(settings.prompt_templates), limits=limits)


def set_aside(path: str) -> str:
    """Rename a state file that cannot be used to PATH.bad-<time>, so the next start does not trip over it."""
    aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"(could not move it: {exc})"
    return aside


def usable_precision(precision: str, device: torch.device) -> tuple[str, str | None]:
    """The precision to run and, when it is not the one asked for, why. On a CPU, bf16 pays only with bf16
    matrix units (AVX-512 BF16 or AMX: measured 2.8x fp32 on the development machine's tower); without them
    oneDNN emulates it, slower than fp32. fp16 autocast is for CUDA."""
    if device.type != "cpu" or precision == "fp32":
        return precision, None
    if precision == "bf16":
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        if any(probe is not None and probe() for probe in probes):
            return precision, None
        return "fp32", "this CPU has neither AVX-512 BF16 nor AMX (bf16 would run slower than fp32)"
    return "fp32", "fp16 autocast needs a CUDA device"


def build_segmenter(settings: Settings) -> DenseSegmenter:
    """The dense segmenter `settings` describe: CLIP from the registry, text cache, backend built and checked."""
    from .backends import BackendUnavailable
    from .registry import ModelError, load_clip, load_sed

    config = check_consistent(settings)
    encoder = load_sed(settings.dense_model, device=settings.device) if settings.dense_model \
        else load_clip(settings.clip_model, device=settings.device)
    cache = TextEmbeddingCache(encoder.encode_text, encoder.model_id, settings.text_cache_dir or None)
    precision, reason = usable_precision(config.precision, encoder.device)
    if reason:
        LOG.warning("precision %s: %s; running %s", config.precision, reason, precision)
        config = dataclasses.replace(config, precision=precision)
    if settings.dense_model:
        from .sed import SedSegmenter

        try:
            segmenter: DenseSegmenter = SedSegmenter(encoder, cache, config, backend=settings.backend,
                                                     engine_cache_dir=settings.engine_cache_dir or None)
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
        return segmenter
    segmenter = DenseSegmenter(encoder, cache, config, backend=settings.backend,
                               engine_cache_dir=settings.engine_cache_dir or None)
    try:
        segmenter.runner()
    except BackendUnavailable as exc:
        raise ModelError(f"backend '{settings.backend}' cannot run here: {exc}") from exc
    return segmenter


def build_prompter(settings: Settings, segmenter: DenseSegmenter) -> PromptSegmenter | None:
    """What answers prompts: OV-SAM (`prompt_model`), else SAM over the segmenter's CLIP, else None (sam_model
    empty)."""
    from .registry import load_ovsam, load_sam

    if settings.prompt_model != "sam":
        from .ovsam import OvSamPromptSegmenter

        precision, reason = usable_precision(settings.precision, torch.device(settings.device))
        if reason:
            LOG.warning("OV-SAM precision %s: %s; running %s", settings.precision, reason, precision)
        model = load_ovsam(settings.prompt_model, device=settings.device, backend=settings.backend,
                           precision=precision, engine_cache_dir=settings.engine_cache_dir or None,
                           text_cache_dir=settings.text_cache_dir or None)
        return OvSamPromptSegmenter(model, segmenter.encoder, cache_size=settings.frame_cache_size,
                                    eager_sam=settings.eager_sam, top_k=settings.prompt_top_k)
    if not settings.sam_model:
        return None
    sam = load_sam(settings.sam_model, device=settings.device)
    return PromptSegmenter(sam, segmenter.encoder, cache_size=settings.frame_cache_size,
                           eager_sam=settings.eager_sam, top_k=settings.prompt_top_k)


def build_pipeline(settings: Settings, cameras: list[str] | None = None, vocabulary: Vocabulary | None = None,
                   log: Callable[[int, str], None] | None = None, warm_up: bool = True) -> SegmentationPipeline:
    """The one factory: models from the registry (verified), the vocabulary (given, restored or from settings),
    one frame cache per camera. ModelError / VocabularyError / ValueError say why it cannot be built."""
    from .cameras import parse_camera_names

    log = log or (lambda level, message: LOG.log(level, message))
    check_consistent(settings)
    names = cameras if cameras is not None else parse_camera_names(settings.cameras)
    segmenter = build_segmenter(settings)
    if segmenter.encoder.model_id.split("@")[1].startswith("random"):
        model = f"SED '{settings.dense_model}'" if settings.dense_model else f"CLIP '{settings.clip_model}'"
        log(logging.WARNING, f"{model} runs with seeded random weights: the labels mean nothing")
    if settings.dense_model:
        log(logging.INFO, f"dense model {settings.dense_model}: its CLIP labels prompts and objects "
                          f"(clip_model '{settings.clip_model}' is not loaded)")
    log(logging.INFO, f"image tower backend: {segmenter.runner().name}")
    prompter = build_prompter(settings, segmenter)
    if prompter is None:
        log(logging.INFO, "sam_model is empty: segment_prompt is disabled")
    elif settings.prompt_model != "sam":
        model = prompter.model  # type: ignore[attr-defined]
        log(logging.INFO, f"prompts: Open-Vocabulary SAM {settings.prompt_model} ({model.model_id}); its image "
                          "pass runs on the first prompt of a frame")
        if model.model_id.split("@")[1].startswith("random"):
            log(logging.WARNING, f"OV-SAM '{settings.prompt_model}' runs with seeded random weights: its labels "
                                 "mean nothing")
    pipeline = SegmentationPipeline(settings, segmenter, prompter, vocabulary or initial_vocabulary(settings, log),
                                    names)
    if warm_up:
        pipeline.warm_up()
    return pipeline

