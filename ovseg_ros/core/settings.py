"""Every setting in one table (the node's parameters): default, description, range or choices, reload or not.

ROS-free. The node declares each as a parameter with a descriptor (`ovseg_ros/ros/parameters.py`), the `ovseg`
CLI and the benchmarks generate their options from it, presets fill its defaults, and `make_settings` turns a
set of values into the one typed, immutable `Settings` object the pipeline factory takes.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from .clip_dense import DENSE_VARIANTS
from .dense import (
    BELOW_THRESHOLD_LABELS,
    PAMR_DILATION_UNITS,
    PAMR_GUIDES,
    REFINEMENTS,
    RESIZES,
    SYNONYM_MERGES,
    WHOLE_IMAGE_RESIZES,
    WHOLE_IMAGE_UPSAMPLES,
    DenseConfig,
)
from .presets import DEFAULT_PRESET, PRESETS, get_preset
from .vocabulary import DEFAULT_TEMPLATES

DEFAULT_TRACK_BACKGROUND = ("floor", "ground", "wall", "ceiling", "sky", "road", "grass", "sand", "water")
DEFAULT_VOCABULARY = ("grass", "water", "sky", "wall", "sand", "red circle", "blue square", "yellow triangle")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: object
    description: str
    read_only: bool = False  # a change needs a reload (reconfigure the lifecycle node instead)
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    dynamic_typing: bool = False  # a string or a string array (a list of names, also as 'a,b,c')
    dense_field: str | None = None  # the DenseConfig field this parameter sets

    def check(self, value) -> str | None:
        """None if acceptable, else the reason."""
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        if self.low is not None and not isinstance(value, (bool, str, list)) and not self.low <= value <= self.high:
            return f"{self.name} must be in [{self.low}, {self.high}], got {value}"
        if self.dynamic_typing and not (isinstance(value, str) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))):
            return f"{self.name} must be a string array or one comma-separated string, got {value!r}"
        return None


SPECS: tuple[ParamSpec, ...] = (
    ParamSpec("preset", DEFAULT_PRESET, "a model and the inference settings of its paper (README, Presets); "
              "sets the defaults of the parameters it names, explicitly set parameters win", read_only=True,
              choices=tuple(PRESETS)),
    ParamSpec("autostart", True, "configure and activate at start-up; false = wait for lifecycle transitions",
              read_only=True),
    ParamSpec("clip_model", "ovseg-demo-clip",
              "CLIP: a models/manifest.yaml name, an open_clip architecture (seeded random init), or ARCH:/path",
              read_only=True),
    ParamSpec("dense_model", "", "a trained dense segmenter instead of clip_model's training-free dense pass: a "
              "manifest name (sed-convnext-b, sed-convnext-l), an SED architecture (seeded random init) or ARCH:/path; "
              "its own CLIP then also labels prompts and objects; empty = clip_model", read_only=True),
    ParamSpec("sam_model", "ovseg-demo-sam",
              "SAM for prompts: a manifest name or ARCH:/path (demo, vit_b, vit_l, vit_h, vit_t); empty disables",
              read_only=True),
    ParamSpec("prompt_model", "sam", "who answers segment_prompt: sam (sam_model's masks, labelled by pooling the "
              "frame's dense CLIP features: training-free) or Open-Vocabulary SAM, mask and label from one RN50x16 "
              "pass: ovsam-coco, ovsam-lvis (the released checkpoints; NTU S-Lab License, non-commercial), or an "
              "OV-SAM architecture with seeded random weights (ovsam-rn50x16-coco, ovsam-rn50x16-lvis, "
              "ovsam-test-tiny)", read_only=True),
    ParamSpec("device", "cpu", "torch device: cpu, cuda, cuda:N", read_only=True),
    ParamSpec("precision", "fp32", "model precision", read_only=True, choices=("fp32", "bf16", "fp16"),
              dense_field="precision"),
    ParamSpec("backend", "torch", "inference backend of the image tower (auto: time the available ones on the "
              "first frame and keep the fastest)", read_only=True,
              choices=("auto", "torch", "torch-compile", "onnxruntime", "tensorrt")),
    ParamSpec("engine_cache_dir", "", "directory for compiled engines/exports; empty = ~/.cache/ovseg_ros/engines",
              read_only=True),
    ParamSpec("dense_variant", "plain", "last-block variant of the dense CLIP pass", choices=DENSE_VARIANTS,
              dense_field="variant"),
    ParamSpec("input_size", 0, "short side the image is resized to, in pixels; 0 = the model's native size",
              low=0, high=2048, dense_field="input_size"),
    ParamSpec("resize_interpolation", "bilinear", "how the image is resized to input_size: bilinear (as the papers) or "
              "area (anti-aliased when shrinking)", choices=RESIZES, dense_field="resize"),
    ParamSpec("whole_image_resize", "patch", "without windows: patch (both sides rounded to the patch, the grid "
              "covers every pixel) or exact (short side exactly input_size, as the papers' whole-image code)",
              choices=WHOLE_IMAGE_RESIZES, dense_field="whole_image_resize"),
    ParamSpec("whole_image_upsample", "direct", "without windows, how the patch logits reach the frame's size: "
              "direct (SCLIP) or via_input (to the model input's size first, then the frame's: NACLIP)",
              choices=WHOLE_IMAGE_UPSAMPLES, dense_field="whole_image_upsample"),
    ParamSpec("window_stride", 0, "sliding windows: stride in resized-image pixels; each window's per-pixel logits "
              "are averaged; 0 = the whole image in one pass", low=0, high=2048, dense_field="window_stride"),
    ParamSpec("window_size", 0, "sliding windows: side in pixels (a multiple of the patch); 0 = the model's "
              "native size", low=0, high=2048, dense_field="window_size"),
    ParamSpec("logit_scale", 0.0, "temperature of the per-pixel softmax over classes; 0 = CLIP's own (max 100)",
              low=0.0, high=1000.0, dense_field="logit_scale"),
    ParamSpec("pamr_steps", 10, "PAMR (pixel-adaptive mask refinement) iterations at full resolution; 0 = off",
              low=0, high=50, dense_field="pamr_steps"),
    ParamSpec("pamr_dilations", [8, 16], "PAMR neighbourhood dilations in pixels", dense_field="pamr_dilations"),
    ParamSpec("pamr_dilation_unit", "input", "whose pixels pamr_dilations counts: frame (the camera frame's, as "
              "the papers' code) or input (the resized model input's, scaled to the frame: the same neighbourhood "
              "relative to the patch grid at any camera resolution)", choices=PAMR_DILATION_UNITS,
              dense_field="pamr_dilation_unit"),
    ParamSpec("pamr_guide", "frame", "the image PAMR's affinities come from: frame (the camera frame) or input "
              "(the resized model input upsampled to the frame, as NACLIP's and SCLIP's released code)",
              choices=PAMR_GUIDES, dense_field="pamr_guide"),
    ParamSpec("synonym_merge", "max", "synonyms (';') as separate queries whose best wins (max), or one averaged "
              "query per class (mean)", read_only=True, choices=SYNONYM_MERGES, dense_field="synonym_merge"),
    ParamSpec("score_threshold", 0.0, "pixels whose class probability is below this are unlabelled (65535), or "
              "the first class (below_threshold)", low=0.0, high=1.0, dense_field="score_threshold"),
    ParamSpec("below_threshold", "unlabelled", "what pixels below score_threshold become: unlabelled (65535) or "
              "first_class (the vocabulary's first class is a background class, as the papers' prob_thd)",
              choices=BELOW_THRESHOLD_LABELS, dense_field="below_threshold"),
    ParamSpec("area_threshold", 0.0, "classes predicted on at most this share of the frame are removed, their "
              "pixels take the next best class (SCLIP's area_thd; with below_threshold first_class the first "
              "class is exempt and not counted); 0 = off", low=0.0, high=0.99, dense_field="area_threshold"),
    ParamSpec("selection_threshold", 0.3, "dynamic category selection tau (relative to the best class); 0 = off",
              low=0.0, high=1.0, dense_field="selection_threshold"),
    ParamSpec("selection_patch_top_k", 2, "category selection: classes in any patch's top-k are kept (2: README "
              "accuracy figures, every ground-truth class kept on 40/40 scenes with 16 of 69)", low=1,
              high=100, dense_field="selection_patch_top_k"),
    ParamSpec("selection_suppression", 0.0, "category selection: weight of the image-level score in the patch "
              "ranking (DCP-CLIP's suppression)", low=0.0, high=10.0, dense_field="selection_suppression"),
    ParamSpec("tag_validation_top_k", 0, "tag validation: relabel a region whose label is not in its pooled top-k; "
              "0 = off", low=0, high=100, dense_field="tag_validation_top_k"),
    ParamSpec("refinement", "none", "edge-aware refinement of the class maps", choices=REFINEMENTS,
              dense_field="refinement"),
    ParamSpec("fast_top_k", 0, "SED's fast inference (dense_model sed-*): after the cost embedding and each "
              "decoder stage, classes in no pixel's top-k are dropped; 0 = off (the released SED-fast: 8)",
              low=0, high=1000, dense_field="fast_top_k"),
    ParamSpec("vocabulary", list(DEFAULT_VOCABULARY), "initial class names (';' separates synonyms)", read_only=True),
    ParamSpec("prompt_templates", list(DEFAULT_TEMPLATES), "initial prompt templates, each with one '{}', or the "
              "name of a template set (imagenet80: CLIP's 80 ImageNet templates)", read_only=True),
    ParamSpec("vocabulary_file", "", "JSON file the vocabulary is saved to on every change and restored from at "
              "start; empty = no persistence", read_only=True),
    ParamSpec("max_classes", 1000, "largest vocabulary accepted", read_only=True, low=1, high=100000),
    ParamSpec("max_name_length", 128, "longest class name accepted", read_only=True, low=1, high=4096),
    ParamSpec("cameras", "", "camera names served by this node with one model (e.g. [front, rear] or "
              "'front,rear'): topics NAME/image, NAME/labels, ...; frames of all cameras are batched through the "
              "image tower; empty = one camera on image, labels, ...", read_only=True, dynamic_typing=True),
    ParamSpec("input_type", "raw", "raw: sensor_msgs/Image on `image`; compressed: CompressedImage (jpeg, png) on "
              "`image/compressed`", read_only=True, choices=("raw", "compressed")),
    ParamSpec("max_image_pixels", 4096 * 4096, "larger frames are refused (protects memory)", low=1,
              high=7680 * 4320),
    ParamSpec("image_qos", "sensor_data", "QoS of the image subscription", read_only=True,
              choices=("sensor_data", "default")),
    ParamSpec("image_reliability", "", "override the reliability of image_qos; empty = the profile's",
              read_only=True, choices=("", "best_effort", "reliable")),
    ParamSpec("qos_depth", 1, "queue depth of the image subscription", read_only=True, low=1, high=100),
    ParamSpec("max_rate_hz", 0.0, "process at most this many frames per second per camera; 0 = as fast as possible",
              low=0.0, high=1000.0),
    ParamSpec("publish_overlay", True, "publish the rgb8 colour overlay for rviz"),
    ParamSpec("publish_confidence", False, "publish `confidence` (32FC1): the winning class's probability per "
              "pixel; pixels below score_threshold are 65535 (unknown) in `labels`"),
    ParamSpec("overlay_alpha", 0.5, "opacity of the class colours in the overlay", low=0.0, high=1.0),
    ParamSpec("frame_cache_size", 4, "recent frames kept for prompt queries by stamp", read_only=True, low=1,
              high=64),
    ParamSpec("eager_sam", False, "compute SAM's image embedding for every frame, not on the first prompt",
              read_only=True),
    ParamSpec("prompt_top_k", 3, "labels returned per prompt", read_only=True, low=1, high=20),
    ParamSpec("segment_everything", False, "also publish a point-grid instance segmentation on `instances`"),
    ParamSpec("everything_points_per_side", 16, "point grid of the segment-everything mode", read_only=True,
              low=2, high=64),
    ParamSpec("track_objects", True, "track object instances (connected class regions) across frames: `objects` "
              "(TrackedObjects: stable ids, labels accumulated over frames, 3D with depth), `object_ids` (mono16 "
              "track id per pixel) and the find_objects service"),
    ParamSpec("track_source", "dense", "where tracked objects come from: dense (regions of the label map) or "
              "everything (SAM's point-grid masks; needs sam_model, better masks, costs a SAM pass per frame)",
              choices=("dense", "everything")),
    ParamSpec("track_min_hits", 2, "frames an object must be seen before its track is published", low=1, high=100),
    ParamSpec("track_max_lost", 30, "frames a track is kept while its object is not seen (occlusions up to this "
              "long keep the id)", low=0, high=10000),
    ParamSpec("track_scene_cut", 0.3, "a scene cut ends every track: more than this share of the label map changed "
              "class since the camera's last frame (a new scene, a camera switched; a robot's own motion changes "
              "far less between frames); 0 = never", low=0.0, high=1.0),
    ParamSpec("track_max_tracks", 100, "most tracks kept per camera (memory bound)", low=1, high=10000),
    ParamSpec("track_min_area", 0.002, "smallest region tracked, as a fraction of the frame", low=0.0, high=1.0),
    ParamSpec("track_max_area", 0.25, "largest region tracked, as a fraction of the frame (larger regions are "
              "floor, sky, walls: left to the label map)", low=0.0, high=1.0),
    ParamSpec("track_background", list(DEFAULT_TRACK_BACKGROUND), "classes never tracked as objects, whatever "
              "their size (what objects stand on or in front of): names matched against every synonym of the "
              "vocabulary's classes, case-insensitive; a string array or one comma-separated string (\"\" = none)",
              dynamic_typing=True),
    ParamSpec("objects_embeddings", False, "include each object's CLIP embedding in `objects`"),
    ParamSpec("use_depth", False, "pair an aligned depth image (`depth/image`, 16UC1 mm or 32FC1 m) and "
              "`depth/camera_info` with each frame: labels_cloud, labels_markers, 3D prompt answers",
              read_only=True),
    ParamSpec("depth_tolerance_s", 0.02, "largest colour-depth stamp difference accepted", low=0.0, high=1.0),
    ParamSpec("depth_buffer_size", 10, "depth frames kept for pairing", read_only=True, low=1, high=100),
    ParamSpec("max_range_m", 10.0, "depth beyond this is dropped from the cloud", low=0.01, high=1000.0),
    ParamSpec("cloud_stride", 1, "keep every n-th pixel in rows and columns of the cloud", low=1, high=32),
    ParamSpec("publish_markers", True, "publish labels_markers (class names at 3D centroids)"),
    ParamSpec("marker_boxes", True, "add each class region's 3D extent as a box marker"),
    ParamSpec("text_cache_dir", "", "directory for the on-disk text-embedding cache; empty = memory only",
              read_only=True),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
DENSE_PARAMETERS = frozenset(spec.name for spec in SPECS if spec.dense_field)


def preset_defaults(preset: str) -> dict[str, object]:
    """Every parameter's default under a preset: the preset's value where it names one, else the table's."""
    settings = get_preset(preset).settings
    unknown = set(settings) - set(SPEC_BY_NAME)
    if unknown:  # pragma: no cover - guarded by tests/unit/test_presets.py
        raise ValueError(f"preset {preset} names unknown parameters: {', '.join(sorted(unknown))}")
    return {spec.name: settings.get(spec.name, spec.default) for spec in SPECS}


def _settings_field(spec: ParamSpec) -> tuple[str, type, dataclasses.Field]:
    kind = tuple if isinstance(spec.default, list) else type(spec.default)
    default = tuple(spec.default) if isinstance(spec.default, list) else spec.default
    return spec.name, kind, dataclasses.field(default=default)


# The typed settings object: one frozen field per row of SPECS (lists become tuples), generated from the table so
# no name is written twice. Built by `make_settings`; changed only by building a new one (`replace_settings`).
Settings = dataclasses.make_dataclass("Settings", [_settings_field(spec) for spec in SPECS], frozen=True)
Settings.__module__ = __name__
Settings.__doc__ = "Every setting of one pipeline (see SPECS for each field's meaning, range and default)."


def make_settings(values: Mapping[str, object] | None = None, preset: str | None = None) -> Settings:
    """Settings from a preset's defaults (`values['preset']` or `preset`, else the default preset) with `values`
    over them; ValueError with the first reason when a value is unknown, out of range or inconsistent."""
    values = dict(values or {})
    preset = values.get("preset", preset or DEFAULT_PRESET)
    reason = SPEC_BY_NAME["preset"].check(preset)
    if reason:
        raise ValueError(reason)
    merged = preset_defaults(preset)
    unknown = set(values) - set(merged)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    merged.update(values, preset=preset)
    for spec in SPECS:
        reason = spec.check(merged[spec.name])
        if reason:
            raise ValueError(reason)
    settings = Settings(**{name: tuple(value) if isinstance(value, list) else value for name, value in merged.items()})
    check_consistent(settings)
    return settings


def replace_settings(settings: Settings, changes: Mapping[str, object]) -> Settings:
    """A new Settings with `changes` applied and checked like `make_settings` (the old one is untouched)."""
    return make_settings({**dataclasses.asdict(settings), **changes})


def check_consistent(settings: Settings) -> DenseConfig:
    """Rules across settings (ValueError with the reason); returns the dense configuration they describe."""
    config = dense_config(dataclasses.asdict(settings))
    prompts = bool(settings.sam_model) or settings.prompt_model != "sam"
    if config.refinement == "sam" and not prompts:
        raise ValueError("refinement 'sam' refines the dense labels with SAM and needs sam_model (it is empty)")
    if settings.track_objects and settings.track_source == "everything" and not prompts:
        raise ValueError("track_source 'everything' tracks SAM's masks and needs sam_model (it is empty)")
    if settings.dense_model:
        from .sed import check_sed_config

        check_sed_config(config)
    elif config.fast_top_k:
        raise ValueError("fast_top_k is SED's fast inference and needs dense_model (it is empty)")
    return config


def describe_settings(settings: Settings) -> str:
    """The model and dense settings in force, each marked '*' where it differs from the preset's value."""
    preset = preset_defaults(settings.preset)
    parts = []
    for name in ["clip_model", "dense_model", *sorted(DENSE_PARAMETERS)]:
        value = getattr(settings, name)
        value = list(value) if isinstance(value, tuple) else value
        parts.append(f"{name}={value}{'' if value == preset[name] else '*'}")
    return " ".join(parts) + " (* = set explicitly, not the preset's)"


def dense_config(values: Mapping[str, object]) -> DenseConfig:
    """The DenseConfig that parameter values describe (ValueError with the reason if they do not fit)."""
    fields = {}
    for name in DENSE_PARAMETERS:
        value = values[name]
        fields[SPEC_BY_NAME[name].dense_field] = tuple(int(v) for v in value) if name == "pamr_dilations" else value
    return DenseConfig(**fields)


# Older, shorter option names of some node parameters (kept: scripts use them).
OPTION_ALIASES = {"clip_model": "--clip", "dense_variant": "--variant", "score_threshold": "--threshold",
                  "selection_threshold": "--selection", "tag_validation_top_k": "--tag-validation"}


def add_setting_options(parser: argparse.ArgumentParser, exclude_choices: set[str] = frozenset(),
                        extra: tuple[str, ...] = ()) -> None:
    """--preset and one option per dense node parameter (same names, help and choices as the node's table);
    an option left out takes the preset's value, exactly as a node parameter left out does."""
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                        help="model + the inference settings of its paper; the options below override it")
    for name in ["clip_model", *sorted(DENSE_PARAMETERS), *extra]:
        spec = SPEC_BY_NAME[name]
        flags = [f"--{name.replace('_', '-')}"] + ([OPTION_ALIASES[name]] if name in OPTION_ALIASES else [])
        if isinstance(spec.default, list):
            kind = _str_list if all(isinstance(v, str) for v in spec.default) else _int_list
        elif isinstance(spec.default, bool):
            kind = _boolean
        else:
            kind = type(spec.default)
        parser.add_argument(*flags, dest=name, type=kind, default=None, help=spec.description,
                            choices=[c for c in spec.choices if c not in exclude_choices] or None)


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def settings_from_args(args: argparse.Namespace, **fixed) -> Settings:
    """The preset's settings with every option the user gave put over them (and `fixed` over those)."""
    given = {name: getattr(args, name) for name in SPEC_BY_NAME if getattr(args, name, None) is not None}
    return make_settings({**given, **fixed, "preset": args.preset})
