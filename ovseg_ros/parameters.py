"""Every ovseg_node parameter in one table: default, description, range or choices, and whether it needs a reload.

ROS-free: the `ovseg` CLI and the benchmarks take their options and presets from it too. The node declares them
with descriptors (so `ros2 param describe` explains them and rclpy enforces the ranges) and checks them again in
the set-parameters callback, which refuses bad values with a reason.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .core.clip_dense import DENSE_VARIANTS
from .core.dense import REFINEMENTS, RESIZES, SYNONYM_MERGES, DenseConfig
from .core.presets import DEFAULT_PRESET, PRESETS, get_preset
from .core.vocabulary import DEFAULT_TEMPLATES

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
    dynamic_typing: bool = False  # accepts more than one type (e.g. a string or a string array)
    dense_field: str | None = None  # the DenseConfig field this parameter sets

    def descriptor(self):
        """rcl_interfaces ParameterDescriptor (imported here: the table itself is ROS-free for the CLI and benches)."""
        from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

        text = self.description + (f" (one of: {', '.join(self.choices)})" if self.choices else "")
        descriptor = ParameterDescriptor(description=text, read_only=self.read_only,
                                         dynamic_typing=self.dynamic_typing)
        if self.low is not None and isinstance(self.default, bool) is False:
            if isinstance(self.default, int):
                descriptor.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
            elif isinstance(self.default, float):
                descriptor.floating_point_range = [FloatingPointRange(from_value=float(self.low),
                                                                      to_value=float(self.high), step=0.0)]
        return descriptor

    def check(self, value) -> str | None:
        """None if acceptable, else the reason."""
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        if self.low is not None and not isinstance(value, (bool, str, list)) and not self.low <= value <= self.high:
            return f"{self.name} must be in [{self.low}, {self.high}], got {value}"
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
    ParamSpec("sam_model", "ovseg-demo-sam",
              "SAM for prompts: a manifest name or ARCH:/path (demo, vit_b, vit_l, vit_h, vit_t); empty disables",
              read_only=True),
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
    ParamSpec("resize_interpolation", "area", "how the image is resized to input_size: bilinear (as the papers) or "
              "area (anti-aliased when shrinking)", choices=RESIZES, dense_field="resize"),
    ParamSpec("window_stride", 0, "sliding windows: stride in resized-image pixels; each window's per-pixel logits "
              "are averaged; 0 = the whole image in one pass", low=0, high=2048, dense_field="window_stride"),
    ParamSpec("window_size", 0, "sliding windows: side in pixels (a multiple of the patch); 0 = the model's "
              "native size", low=0, high=2048, dense_field="window_size"),
    ParamSpec("logit_scale", 0.0, "temperature of the per-pixel softmax over classes; 0 = CLIP's own (max 100)",
              low=0.0, high=1000.0, dense_field="logit_scale"),
    ParamSpec("pamr_steps", 0, "PAMR (pixel-adaptive mask refinement) iterations at full resolution; 0 = off",
              low=0, high=50, dense_field="pamr_steps"),
    ParamSpec("pamr_dilations", [8, 16], "PAMR neighbourhood dilations in pixels", dense_field="pamr_dilations"),
    ParamSpec("synonym_merge", "max", "synonyms (';') as separate queries whose best wins (max), or one averaged "
              "query per class (mean)", read_only=True, choices=SYNONYM_MERGES, dense_field="synonym_merge"),
    ParamSpec("score_threshold", 0.0, "pixels whose class probability is below this are unlabelled (65535)",
              low=0.0, high=1.0, dense_field="score_threshold"),
    ParamSpec("selection_threshold", 0.3, "dynamic category selection tau (relative to the best class); 0 = off",
              low=0.0, high=1.0, dense_field="selection_threshold"),
    ParamSpec("selection_patch_top_k", 6, "category selection: classes in any patch's top-k are kept", low=1,
              high=100, dense_field="selection_patch_top_k"),
    ParamSpec("selection_suppression", 0.0, "category selection: weight of the image-level score in the patch "
              "ranking (DCP-CLIP's suppression)", low=0.0, high=10.0, dense_field="selection_suppression"),
    ParamSpec("tag_validation_top_k", 0, "tag validation: relabel a region whose label is not in its pooled top-k; "
              "0 = off", low=0, high=100, dense_field="tag_validation_top_k"),
    ParamSpec("refinement", "none", "edge-aware refinement of the class maps", choices=REFINEMENTS,
              dense_field="refinement"),
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
    ParamSpec("overlay_alpha", 0.5, "opacity of the class colours in the overlay", low=0.0, high=1.0),
    ParamSpec("frame_cache_size", 4, "recent frames kept for prompt queries by stamp", read_only=True, low=1,
              high=64),
    ParamSpec("eager_sam", False, "compute SAM's image embedding for every frame, not on the first prompt",
              read_only=True),
    ParamSpec("prompt_top_k", 3, "labels returned per prompt", read_only=True, low=1, high=20),
    ParamSpec("segment_everything", False, "also publish a point-grid instance segmentation on `instances`"),
    ParamSpec("everything_points_per_side", 16, "point grid of the segment-everything mode", read_only=True,
              low=2, high=64),
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


def dense_config(values: dict[str, object]) -> DenseConfig:
    """The DenseConfig that parameter values describe (ValueError with the reason if they do not fit)."""
    fields = {}
    for name in DENSE_PARAMETERS:
        value = values[name]
        fields[SPEC_BY_NAME[name].dense_field] = tuple(int(v) for v in value) if name == "pamr_dilations" else value
    return DenseConfig(**fields)


# Older, shorter option names of some node parameters (kept: scripts use them).
OPTION_ALIASES = {"clip_model": "--clip", "dense_variant": "--variant", "score_threshold": "--threshold",
                  "selection_threshold": "--selection", "tag_validation_top_k": "--tag-validation"}


def add_setting_options(parser: argparse.ArgumentParser, exclude_choices: set[str] = frozenset()) -> None:
    """--preset and one option per dense node parameter (same names, help and choices as the node's table);
    an option left out takes the preset's value, exactly as a node parameter left out does."""
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                        help="model + the inference settings of its paper; the options below override it")
    for name in ["clip_model", *sorted(DENSE_PARAMETERS)]:
        spec = SPEC_BY_NAME[name]
        flags = [f"--{name.replace('_', '-')}"] + ([OPTION_ALIASES[name]] if name in OPTION_ALIASES else [])
        if isinstance(spec.default, list):
            kind = _int_list
        else:
            kind = type(spec.default)
        parser.add_argument(*flags, dest=name, type=kind, default=None, help=spec.description,
                            choices=[c for c in spec.choices if c not in exclude_choices] or None)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def settings_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The preset's parameter values with every option the user gave put over them."""
    values = preset_defaults(args.preset)
    values.update({name: getattr(args, name) for name in values if getattr(args, name, None) is not None})
    return values
