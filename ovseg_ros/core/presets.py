"""Presets: a model and the inference settings its published numbers were measured with, each value sourced.

A preset sets the defaults of the node's parameters (and of `ovseg segment`'s options); a parameter given
explicitly (params file, launch override, command line) wins. Keys are parameter names of ovseg_ros.parameters.

Sources (read in the released code, not guessed):
- NACLIP (Hajimiri et al., WACV 2025), github.com/sinahmr/NACLIP: `naclip.py` (NACLIP.__init__ defaults:
  arch 'reduced', attn 'naclip', gaussian_std 5, pamr_steps 10, pamr_stride (8, 16), logit_scale 40,
  slide_crop 224, slide_stride 112; postprocess_result: synonyms as queries, max), `configs/cfg_*.py`
  (Resize scale (2048, 336) keep_ratio: short side 336; prob_thd 0.1 only on sets with a background class).
- SCLIP (Wang et al., ECCV 2024), github.com/wangf3014/SCLIP: `clip_segmentor.py` (logit_scale 40, slide 224/112,
  pamr_steps 0 by default), `configs/cfg_*.py` (short side 336; 448 for COCO-Stuff).
- ClearCLIP (Lan et al., ECCV 2024), github.com/mc-lan/ClearCLIP: `clearclip_segmentor.py` (logit_scale 50,
  slide_crop 448, slide_stride 224, no PAMR), `configs/cfg_*.py` (Resize (2048, 448): short side 448).
- All three: `prompts/imagenet_template.py` (CLIP's 80 ImageNet templates, embeddings averaged per name).
- SED (Xie et al., CVPR 2024), github.com/xb534/SED: `configs/convnext{B,L}_768.yaml` and `sed/config.py` (the
  network and its test settings: MIN_SIZE_TEST 640, the 768-pixel CLIP input, PROMPT_ENSEMBLE_TYPE imagenet),
  `sed/modeling/transformer/sed_predictor.py` (synonyms ', ' averaged per template), README and `eval.sh`
  (SED-fast: TEST.FAST_INFERENCE True TEST.TOPK 8; no PAMR, no threshold, no sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PRESET = "demo"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: dict[str, object]
    sources: dict[str, str] = field(default_factory=dict)  # parameter -> where its value comes from


_NACLIP = "NACLIP naclip.py / configs"
_SCLIP = "SCLIP clip_segmentor.py / configs"
_CLEARCLIP = "ClearCLIP clearclip_segmentor.py / configs"
_TEMPLATES = "prompts/imagenet_template.py (CLIP's 80 ImageNet templates)"
_SYNONYMS = "get_cls_idx + postprocess_result: each synonym a query, class = max"
_NO_DCS = "the papers have no category selection; DCS composes (selection_threshold > 0)"
_RESIZE = "mmseg Resize: cv2 bilinear"
_OPENAI_B16 = "OpenAI CLIP ViT-B/16, the backbone of the papers' ViT-B/16 tables"

# What the three papers' presets share, and where each value comes from.
_PAPERS = {"clip_model": "clip-vit-b16-openai", "score_threshold": 0.0, "pamr_dilations": [8, 16],
           "prompt_templates": ["imagenet80"], "synonym_merge": "max", "selection_threshold": 0.0,
           "resize_interpolation": "bilinear", "pamr_dilation_unit": "frame", "pamr_guide": "input",
           "whole_image_resize": "exact", "below_threshold": "unlabelled", "area_threshold": 0.0}
_PAMR_ON_FRAME = "NACLIP naclip.py: PAMR on the logits upsampled to the original image (ori_shape)"
_PAMR_GUIDE = ("NACLIP naclip.py predict / SCLIP clip_segmentor.py forward_slide: PAMR's image is the "
               "normalised model input bilinearly upsampled to ori_shape")
_WHOLE_EXACT = "mmseg Resize keep_ratio: exact size, the tower's conv floors to whole patches (forward_feature)"
_PAPERS_SOURCES = {"clip_model": _OPENAI_B16, "prompt_templates": _TEMPLATES, "synonym_merge": _SYNONYMS,
                   "selection_threshold": _NO_DCS, "resize_interpolation": _RESIZE,
                   "pamr_dilation_unit": _PAMR_ON_FRAME, "pamr_guide": _PAMR_GUIDE,
                   "whole_image_resize": _WHOLE_EXACT,
                   "below_threshold": "prob_thd sets label 0 (the background class) only on sets that have one",
                   "area_threshold": "SCLIP's area_thd is set only in its VOC21 config"}

_SED_SETTINGS = {"score_threshold": 0.0, "pamr_steps": 0, "prompt_templates": ["imagenet80"],
                 "synonym_merge": "mean", "selection_threshold": 0.0, "tag_validation_top_k": 0,
                 "window_stride": 0}
_SED_SOURCES = {"prompt_templates": "SED PROMPT_ENSEMBLE_TYPE imagenet (80 templates, one cost-volume channel each)",
                "synonym_merge": "SED sed_predictor.py class_embeddings: synonyms averaged per template",
                "score_threshold": "SED evaluates the argmax of sem_seg (no threshold)",
                "pamr_steps": "SED has no PAMR", "selection_threshold": "SED has no DCS; its fast inference rejects",
                "window_stride": "SED's forward sets sliding_window False",
                "tag_validation_top_k": "SED has no tag validation"}


def _sed_preset(size: str, fast: bool) -> Preset:
    letter = size[0].upper()
    name = f"sed-convnext-{size[0]}"
    description = (f"SED{'-fast' if fast else ''} ({letter}), trained on COCO-Stuff: ConvNeXt-{letter} CLIP, "
                   f"cost volume and gradual-fusion decoder" + (", top-8 class rejection" if fast else ""))
    return Preset(name + ("-fast" if fast else ""), description,
                  {**_SED_SETTINGS, "dense_model": name, "fast_top_k": 8 if fast else 0},
                  {**_SED_SOURCES, "dense_model": f"SED README checkpoint SED{'-fast' if fast else ''} ({letter})",
                   "fast_top_k": ("SED README / eval.sh: TEST.FAST_INFERENCE True TEST.TOPK 8" if fast
                                  else "SED configs: TEST.FAST_INFERENCE False")})


PRESETS: dict[str, Preset] = {
    preset.name: preset for preset in (
        Preset(
            "naclip-vit-b16",
            "NACLIP on OpenAI ViT-B/16: neighbourhood attention, reduced last block, 336 px, windows 224/112, PAMR",
            {**_PAPERS, "dense_variant": "naclip", "input_size": 336, "window_size": 224, "window_stride": 112,
             "logit_scale": 40.0, "pamr_steps": 10, "whole_image_upsample": "via_input"},
            {**_PAPERS_SOURCES, "dense_variant": _NACLIP + " (arch reduced, attn naclip, std 5)",
             "input_size": "NACLIP configs: Resize (2048, 336) keep_ratio", "window_size": _NACLIP + " slide_crop",
             "window_stride": _NACLIP + " slide_stride", "logit_scale": _NACLIP,
             "score_threshold": "NACLIP prob_thd 0 (0.1 only with a background class)", "pamr_steps": _NACLIP,
             "pamr_dilations": _NACLIP + " pamr_stride",
             "whole_image_upsample": "NACLIP naclip.py: forward_feature upsamples to the input, predict to ori_shape"}),
        Preset(
            "sclip-vit-b16",
            "SCLIP on OpenAI ViT-B/16: correlative self-attention, 336 px, windows 224/112, no PAMR",
            {**_PAPERS, "dense_variant": "sclip", "input_size": 336, "window_size": 224, "window_stride": 112,
             "logit_scale": 40.0, "pamr_steps": 0, "whole_image_upsample": "direct"},
            {**_PAPERS_SOURCES, "dense_variant": _SCLIP + " (csa=True, residual and MLP kept)",
             "whole_image_upsample": "SCLIP clip_segmentor.py: forward_feature(inputs, ori_shape) upsamples once",
             "input_size": "SCLIP configs: Resize (2048, 336) (448 for COCO-Stuff)", "window_size": _SCLIP,
             "window_stride": _SCLIP, "logit_scale": _SCLIP + " (50-65 on some sets)",
             "score_threshold": "SCLIP prob_thd 0 (0.1 only with a background class)",
             "pamr_steps": _SCLIP + " (pamr_steps 0; optional)", "pamr_dilations": _SCLIP}),
        Preset(
            "clearclip-vit-b16",
            "ClearCLIP on OpenAI ViT-B/16: query-query attention, no residual/FFN, 448 px, windows 448/224",
            {**_PAPERS, "dense_variant": "clearclip", "input_size": 448, "window_size": 448, "window_stride": 224,
             "logit_scale": 50.0, "pamr_steps": 0, "whole_image_upsample": "direct"},
            {**_PAPERS_SOURCES, "dense_variant": _CLEARCLIP + " (model_type ClearCLIP, ignore_residual)",
             "input_size": "ClearCLIP configs: Resize (2048, 448)", "window_size": _CLEARCLIP + " slide_crop",
             "window_stride": _CLEARCLIP + " slide_stride", "logit_scale": _CLEARCLIP,
             "score_threshold": "ClearCLIP prob_thd 0 (0.15-0.5 only with a background class)",
             "pamr_steps": "ClearCLIP has no PAMR", "pamr_dilations": "unused", "pamr_guide": "unused",
             "whole_image_upsample": "ClearCLIP clearclip_segmentor.py: forward_feature(inputs, ori_shape)"}),
        Preset(
            "demo",
            "the project's demo CLIP on its synthetic world (the embedded demo and the tests' yardstick)",
            {"clip_model": "ovseg-demo-clip", "dense_variant": "plain", "input_size": 0, "window_size": 0,
             "window_stride": 0, "logit_scale": 0.0, "score_threshold": 0.0, "pamr_steps": 10,
             "pamr_dilations": [8, 16], "prompt_templates": ["default"], "synonym_merge": "max",
             "selection_threshold": 0.3, "resize_interpolation": "bilinear", "pamr_dilation_unit": "input"},
            {"clip_model": "models/demo/ovseg-demo-clip.md", "dense_variant":
             "demo model card: trained on the plain tokens", "selection_threshold": "README accuracy figures",
             "logit_scale": "the model's own (trained)",
             "pamr_steps": "docs/benchmarks.md, tracking on the demo world: IDF1 0.844, flicker 4.2x lower, "
             "find_objects top-1 0.926 with PAMR 10; 0.641, 1.7x and 0.79 without",
             "resize_interpolation": "README, demo camera figures: on 40 640x480 scenes resized to 224 px, stuff "
             "pixel accuracy 0.984 bilinear vs 0.753 area (the anti-aliased shrink smooths away the textures "
             "the demo CLIP learned at 224 px: sand read as wall)",
             "pamr_dilation_unit": "README, tracking at 640x480: IDF1 0.797 with 8/16 frame pixels, 0.854 with "
             "8/16 input pixels (16/32 frame pixels)"}),
        *(_sed_preset(size, fast) for size in ("base", "large") for fast in (False, True)),
    )
}


def get_preset(name: str) -> Preset:
    """The named preset; ValueError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
