"""Inference as the papers run it: sliding windows that average upsampled logits, PAMR, logit scale, synonyms as
separate queries, template sets, presets. References are written here from the papers, independently of the core.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core.clip_dense import encode_tokens
from ovseg_ros.core.dense import DenseConfig, DenseSegmenter, slide_windows
from ovseg_ros.core.metrics import mask_iou
from ovseg_ros.core.pamr import PamrAffinity
from ovseg_ros.core.presets import PRESETS
from ovseg_ros.core.registry import load_clip
from ovseg_ros.core.settings import SPEC_BY_NAME, dense_config, preset_defaults
from ovseg_ros.core.text_cache import TextEmbeddingCache
from ovseg_ros.core.vocabulary import Vocabulary, VocabularyError, make_vocabulary, validate_templates
from ovseg_ros.synth.world import generate_scene


@pytest.fixture(scope="module")
def encoder():
    return load_clip("ovseg-demo-clip")


def segmenter_with(encoder, **config) -> DenseSegmenter:
    return DenseSegmenter(encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id), DenseConfig(**config))


# ---------------------------------------------------------------- sliding windows
def test_windows_tile_like_mmseg():
    assert slide_windows((336, 448), (224, 224), 112) == [
        (0, 0, 224, 224), (0, 112, 224, 336), (0, 224, 224, 448),
        (112, 0, 336, 224), (112, 112, 336, 336), (112, 224, 336, 448)]
    assert slide_windows((300, 500), (224, 224), 112)[-1] == (76, 276, 300, 500)  # last window moved back
    assert slide_windows((200, 100), (224, 224), 112) == [(0, 0, 200, 100)]  # smaller than a window: one


def test_two_windows_average_their_upsampled_logits(encoder):
    """A 128x192 image, windows 128 wide every 64 px: the merge equals logits computed window by window."""
    segmenter = segmenter_with(encoder, input_size=128, window_size=128, window_stride=64, synonym_merge="mean")
    image = generate_scene(11, size=(128, 192), split="eval").image
    prepared = segmenter.prepare(Vocabulary(("grass", "sky", "red circle", "blue square")))
    text = prepared.text_embeddings
    with torch.inference_mode():
        pixels = segmenter.preprocess(image)
        assert pixels.shape[-2:] == (128, 192)
        frame = segmenter.encode(pixels)[0]
        merged = segmenter.pixel_logits(frame, text, (128, 192))
        expected = torch.zeros(4, 128, 192)
        count = torch.zeros(1, 128, 192)
        for left in (0, 64):
            _, dense = encoder.dense_features(pixels[:, :, :, left:left + 128], "plain")
            logits = torch.einsum("bhwd,cd->bchw", dense, text)
            expected[:, :, left:left + 128] += F.interpolate(logits, size=(128, 128), mode="bilinear")[0]
            count[:, :, left:left + 128] += 1
        expected /= count
    assert frame.windows == [(0, 0, 128, 128), (0, 64, 128, 192)]
    assert torch.allclose(merged, expected, atol=1e-5)
    result = segmenter.segment(image, prepared)
    probabilities = torch.softmax(encoder.logit_scale * expected, dim=0)
    assert np.array_equal(result.labels, probabilities.argmax(0).numpy().astype(np.uint16))
    assert np.allclose(result.confidence, probabilities.max(0).values.numpy(), atol=1e-5)


def test_logit_scale_sets_the_softmax_temperature(encoder):
    image = generate_scene(5, size=(128, 128), split="eval").image
    vocabulary = Vocabulary(("grass", "sky", "red circle"))
    confidences = []
    for scale in (10.0, 40.0):
        segmenter = segmenter_with(encoder, logit_scale=scale, selection_threshold=0.0)
        confidences.append(segmenter.segment(image, segmenter.prepare(vocabulary)).confidence.mean())
    assert confidences[1] > confidences[0]


# ---------------------------------------------------------------- PAMR
def reference_pamr(image: torch.Tensor, scores: torch.Tensor, steps: int, dilations) -> torch.Tensor:
    """Araslanov & Roth's PAMR written per pixel with index clamping (replicate borders)."""
    channels, height, width = image.shape
    ys = torch.arange(height)[:, None].expand(height, width)
    xs = torch.arange(width)[None, :].expand(height, width)

    def at(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return t[:, (ys + dy).clamp(0, height - 1), (xs + dx).clamp(0, width - 1)]

    around = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    neighbours = [o for o in around if o != (0, 0)]
    sigma = torch.stack([at(image, *o) for o in around]).std(dim=0)
    kappa = torch.stack([-(image - at(image, *o)).abs() / (1e-8 + 0.1 * sigma) for o in neighbours]).mean(dim=1)
    alpha = torch.softmax(kappa, dim=0)
    for _ in range(steps):
        scores = sum(alpha[i] * at(scores, *o) for i, o in enumerate(neighbours))
    return scores


def test_pamr_equals_the_papers_equations():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 37, 53, generator=generator)
    scores = torch.rand(5, 37, 53, generator=generator)
    refined = PamrAffinity(image, (2, 4)).refine(scores, 3)
    assert torch.allclose(refined, reference_pamr(image, scores, 3, (2, 4)), atol=1e-5)


def test_pamr_moves_a_blurred_mask_back_onto_the_edges():
    ious_before, ious_after = [], []
    for seed in range(6):
        scene = generate_scene(seed, size=(160, 200), split="eval")
        target = scene.labels == scene.labels[scene.labels.shape[0] // 2, scene.labels.shape[1] // 2]
        if target.mean() > 0.5:
            target = ~target
        coarse = F.interpolate(torch.from_numpy(target).float()[None, None], scale_factor=1 / 16, mode="area")
        blurred = F.interpolate(coarse, size=target.shape, mode="bilinear")[0, 0]
        scores = torch.stack([1 - blurred, blurred])
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float()
        refined = PamrAffinity(image, (8, 16)).refine(scores, 10)
        ious_before.append(mask_iou(scores.argmax(0).numpy() == 1, target))
        ious_after.append(mask_iou(refined.argmax(0).numpy() == 1, target))
    assert np.mean(ious_after) > np.mean(ious_before) + 0.02, (ious_before, ious_after)


def test_segmenter_applies_pamr_at_full_resolution(encoder):
    image = generate_scene(3, size=(120, 160), split="eval").image
    vocabulary = Vocabulary(("grass", "water", "sky", "red circle", "blue square"))
    plain = segmenter_with(encoder, selection_threshold=0.0)
    refined = segmenter_with(encoder, selection_threshold=0.0, pamr_steps=10, pamr_dilations=(4, 8))
    prepared = plain.prepare(vocabulary)
    base, with_pamr = plain.segment(image, prepared), refined.segment(image, prepared)
    assert "pamr" in with_pamr.timings_ms and "pamr" not in base.timings_ms
    assert not np.array_equal(base.labels, with_pamr.labels)
    frame = refined.encode(refined.preprocess(image))[0]
    logits = refined.pixel_logits(frame, prepared.text_embeddings, image.shape[:2])
    guide = torch.from_numpy(image).permute(2, 0, 1).float()
    expected = reference_pamr(guide, logits, 10, (4, 8)).argmax(0).numpy()
    assert (with_pamr.labels == expected).mean() > 0.999


def test_pamr_guided_by_the_model_input_as_the_papers_code(encoder):
    """pamr_guide "input": the affinities come from the normalised, resized model input upsampled back to the
    frame (NACLIP predict: interpolate(inputs, ori_shape, bilinear)), built here with OpenCV and torch alone."""
    image = generate_scene(5, size=(120, 170), split="eval").image
    vocabulary = Vocabulary(("grass", "water", "sky", "red circle", "blue square"))
    framed = segmenter_with(encoder, selection_threshold=0.0, pamr_steps=10, pamr_dilations=(4, 8))
    guided = segmenter_with(encoder, selection_threshold=0.0, pamr_steps=10, pamr_dilations=(4, 8),
                            pamr_guide="input")
    prepared = guided.prepare(vocabulary)
    frame = guided.encode(guided.preprocess(image))[0]
    logits = guided.pixel_logits(frame, prepared.text_embeddings, image.shape[:2])
    height, width = frame.canvas
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    normalised = torch.from_numpy(((resized - mean) / std).astype(np.float32)).permute(2, 0, 1)
    guide = F.interpolate(normalised[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    expected = reference_pamr(guide, logits, 10, (4, 8)).argmax(0).numpy()
    from_input, from_frame = guided.segment(image, prepared), framed.segment(image, prepared)
    assert (from_input.labels == expected).mean() > 0.9999
    assert not np.array_equal(from_input.labels, from_frame.labels)  # the two guides do differ


def test_whole_image_exact_resize_and_upsampling_via_the_input(encoder):
    """whole_image_resize "exact" keeps the scaled size (the conv floors it to whole patches) and "via_input"
    upsamples grid -> input -> frame, as NACLIP's forward_feature + predict."""
    image = generate_scene(6, size=(121, 173), split="eval").image
    segmenter = segmenter_with(encoder, input_size=100, whole_image_resize="exact",
                               whole_image_upsample="via_input")
    assert segmenter.model_input_shape(121, 173) == (100, 143)  # int(173 * 100 / 121 + 0.5)
    prepared = segmenter.prepare(Vocabulary(("grass", "water", "sky")))
    frame = segmenter.encode(segmenter.preprocess(image))[0]
    assert frame.grid.shape[:2] == encoder.visual.conv1(torch.zeros(1, 3, 100, 143)).shape[-2:]
    logits = torch.einsum("hwd,cd->chw", frame.grid, prepared.text_embeddings)
    step = F.interpolate(logits[None], size=(100, 143), mode="bilinear", align_corners=False)
    expected = F.interpolate(step, size=(121, 173), mode="bilinear", align_corners=False)[0]
    got = segmenter.pixel_logits(frame, prepared.text_embeddings, (121, 173))
    assert torch.allclose(got, expected, atol=1e-6)
    direct = segmenter_with(encoder, input_size=100, whole_image_resize="exact")
    once = F.interpolate(logits[None], size=(121, 173), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(direct.pixel_logits(frame, prepared.text_embeddings, (121, 173)), once, atol=1e-6)


def test_background_class_below_threshold_and_sclip_area_threshold(encoder):
    """below_threshold first_class gives low-confidence pixels class 0 (the papers' prob_thd); area_threshold
    removes classes on at most that share of the other classes' pixels, which take their next best class, with
    probabilities still over the whole softmax (SCLIP's area_thd)."""
    image = generate_scene(7, size=(96, 128), split="eval").image
    vocabulary = Vocabulary(("background;wall", "grass", "water", "sky", "red circle", "blue square"))
    base = segmenter_with(encoder, logit_scale=40.0)
    prepared = base.prepare(vocabulary)
    probs = base.probability_maps(image, prepared).numpy()
    plain = base.segment(image, prepared)
    assert np.array_equal(plain.labels, probs.argmax(0))
    assert np.allclose(plain.confidence, probs.max(0), atol=1e-6)
    cut = float(np.quantile(probs.max(0), 0.3))
    thresholded = segmenter_with(encoder, logit_scale=40.0, score_threshold=cut, below_threshold="first_class")
    labels = thresholded.segment(image, prepared).labels
    assert np.array_equal(labels, np.where(probs.max(0) < cut, 0, probs.argmax(0)))
    counts = np.bincount(probs.argmax(0).ravel(), minlength=len(vocabulary))
    share = 0.5 * (counts[1:][counts[1:] > 0].min() + counts[1:].max()) / counts[1:].sum()
    area = segmenter_with(encoder, logit_scale=40.0, below_threshold="first_class", area_threshold=share)
    removed = [c for c in range(1, len(vocabulary)) if counts[c] <= share * counts[1:].sum()]
    assert removed and len(removed) < len(vocabulary) - 1
    kept = probs.copy()
    kept[removed] = 0.0
    result = area.segment(image, prepared)
    assert np.array_equal(result.labels, kept.argmax(0))
    assert np.allclose(result.confidence, kept.max(0), atol=1e-5)


# ---------------------------------------------------------------- text: synonyms and templates
def test_synonyms_are_separate_queries_and_the_best_one_wins(encoder):
    vocabulary = Vocabulary(("grass;lawn", "sky", "red circle;red disc"))
    by_max = segmenter_with(encoder, synonym_merge="max").prepare(vocabulary)
    by_mean = segmenter_with(encoder, synonym_merge="mean").prepare(vocabulary)
    assert by_max.text_embeddings.shape[0] == 5 and by_max.query_classes.tolist() == [0, 0, 1, 2, 2]
    assert by_mean.text_embeddings.shape[0] == 3 and by_mean.query_classes is None
    features = F.normalize(torch.randn(7, by_max.text_embeddings.shape[1]), dim=-1)
    probs = by_max.class_probabilities(features, 40.0)
    queries = torch.softmax(40.0 * features @ by_max.text_embeddings.T, dim=-1)
    expected = torch.stack([queries[:, :2].max(1).values, queries[:, 2], queries[:, 3:].max(1).values], dim=1)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_template_sets_and_placeholder_rules():
    assert len(validate_templates(["imagenet80"])) == 80
    assert len(make_vocabulary(["cup"], ["imagenet80", "a {} on a table."]).templates) == 81
    assert validate_templates(["{{}} a {}"]) == ("{{}} a {}",)
    for bad in (["a {0}"], ["a {name}"], ["a {} {}"], ["{{}} only literal braces"], ["a {:>4}"], ["a {"],
                ["a {!r}"], ["imagenet81"]):
        with pytest.raises(VocabularyError):
            validate_templates(bad)


def test_eighty_templates_embed_every_class(encoder):
    segmenter = segmenter_with(encoder)
    prepared = segmenter.prepare(make_vocabulary(["grass", "red circle"], ["imagenet80"]))
    assert prepared.text_embeddings.shape == (2, 128)
    assert torch.allclose(prepared.text_embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------- presets
def test_every_preset_names_real_parameters_with_sources():
    for preset in PRESETS.values():
        assert set(preset.settings) <= set(SPEC_BY_NAME), preset.name
        for name, value in preset.settings.items():
            assert SPEC_BY_NAME[name].check(value) is None, (preset.name, name)
        dense_config(preset_defaults(preset.name))  # every preset makes a valid configuration
        if preset.name != "demo":
            assert set(preset.settings) <= set(preset.sources), preset.name


def test_the_demo_preset_is_the_parameter_table():
    """The node's default preset changes nothing the table says (one truth for defaults)."""
    demo = preset_defaults("demo")
    for name, value in PRESETS["demo"].settings.items():
        default = SPEC_BY_NAME[name].default
        expected = list(validate_templates(value)) if name == "prompt_templates" else value
        assert default == expected, name
    assert demo["clip_model"] == "ovseg-demo-clip"


def test_papers_settings_in_the_presets():
    naclip = dense_config(preset_defaults("naclip-vit-b16"))
    assert (naclip.variant, naclip.input_size, naclip.window_size, naclip.window_stride, naclip.logit_scale,
            naclip.pamr_steps, naclip.pamr_dilations) == ("naclip", 336, 224, 112, 40.0, 10, (8, 16))
    clear = dense_config(preset_defaults("clearclip-vit-b16"))
    assert (clear.variant, clear.input_size, clear.window_size, clear.window_stride, clear.logit_scale,
            clear.pamr_steps) == ("clearclip", 448, 448, 224, 50.0, 0)
    sclip = dense_config(preset_defaults("sclip-vit-b16"))
    assert (sclip.variant, sclip.input_size, sclip.window_stride, sclip.logit_scale) == ("sclip", 336, 112, 40.0)
    for name in ("naclip-vit-b16", "sclip-vit-b16", "clearclip-vit-b16"):
        assert preset_defaults(name)["prompt_templates"] == ["imagenet80"]
        assert preset_defaults(name)["clip_model"] == "clip-vit-b16-openai"
        assert preset_defaults(name)["resize_interpolation"] == "bilinear"  # mmseg's resize


def test_a_preset_on_a_640x480_frame_resizes_and_tiles_as_the_paper(encoder):
    """NACLIP's settings with the demo model: 640x480 -> 448x336 (short side 336), six 224 windows."""
    values = preset_defaults("naclip-vit-b16")
    segmenter = DenseSegmenter(encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id),
                               dense_config(values))
    assert segmenter.window_size() == (224, 224)
    assert segmenter.model_input_shape(480, 640) == (336, 448)
    assert len(segmenter.windows((336, 448))) == 6
    result = segmenter.segment(generate_scene(2, size=(480, 640), split="eval").image,
                               segmenter.prepare(make_vocabulary(["grass", "sky"], ["imagenet80"])))
    assert result.labels.shape == (480, 640) and {"merge_upsample", "pamr"} <= set(result.timings_ms)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_selection_tag_validation_and_sam_refinement_compose_with_every_preset(encoder, preset):
    """Each preset's inference settings (run on the demo CLIP) with DCS, tag validation and SAM refinement on."""
    from ovseg_ros.core.prompt import PromptSegmenter
    from ovseg_ros.core.registry import load_sam

    values = preset_defaults(preset) | {"selection_threshold": 0.3, "tag_validation_top_k": 2, "refinement": "sam",
                                        "pamr_steps": min(2, preset_defaults(preset)["pamr_steps"])}
    segmenter = DenseSegmenter(encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id),
                               dense_config(values))
    prompter = PromptSegmenter(load_sam("ovseg-demo-sam"), encoder, cache_size=2)
    scene = generate_scene(4, size=(96, 128), split="eval")
    prepared = segmenter.prepare(make_vocabulary(["grass", "sky;heaven", "water", "red circle", "blue square"],
                                                 values["prompt_templates"]))
    result = segmenter.segment(scene.image, prepared)
    assert 0 < len(result.selected_classes) <= 5 and "tag_validation" in result.timings_ms
    prompter.add_frame((1, 0), scene.image, result.dense_features)
    refined = prompter.refine_result((1, 0), result, prepared, 0.0)
    assert refined.labels.shape == (96, 128) and set(refined.class_ids) <= set(range(5))


@pytest.mark.parametrize("arch", ["ovseg-demo-clip", "ViT-B-16-quickgelu"])
def test_text_encoding_stops_at_the_end_of_text_token_without_changing_the_embedding(encoder, arch):
    """The 80-template ensembles run the text tower only up to the last end-of-text token of the batch: the
    embeddings equal open_clip's full-context encode_text (causal mask, pooled at end-of-text)."""
    model_encoder = encoder if arch == "ovseg-demo-clip" else load_clip(arch)
    names = ["cup", "traffic light"] + (["a long class name with several words in it"] if arch != "ovseg-demo-clip"
                                        else [])  # the demo CLIP's context is 16 tokens
    prompts = [template.format(name) for template in validate_templates(["imagenet80"])[:12] for name in names]
    tokens = model_encoder.tokenizer(prompts)
    with torch.inference_mode():
        full = model_encoder.model.encode_text(tokens)
        short = encode_tokens(model_encoder.model, tokens)
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # there was padding to skip
    assert (full - short).abs().max().item() <= 1e-5 * full.abs().max().item()


def test_pamr_dilations_follow_the_patch_grid_in_the_demo_and_the_frame_in_the_papers():
    demo = dense_config(preset_defaults("demo"))
    assert demo.pamr_dilation_unit == "input"
    assert demo.pamr_dilations_for((224, 224), (224, 224)) == (8, 16)  # the model's own size: as given
    assert demo.pamr_dilations_for((480, 640), (224, 299)) == (17, 34)  # a 640x480 camera: scaled with the grid
    for name in ("naclip-vit-b16", "sclip-vit-b16", "clearclip-vit-b16"):
        papers = dense_config(preset_defaults(name))  # NACLIP runs PAMR at the original image's size, in its pixels
        assert papers.pamr_dilation_unit == "frame"
        assert papers.pamr_dilations_for((480, 640), (336, 448)) == (8, 16)


def test_precision_falls_back_to_fp32_where_it_would_not_pay(monkeypatch):
    from ovseg_ros.core.pipeline import usable_precision

    cpu = torch.device("cpu")
    assert usable_precision("fp32", cpu) == ("fp32", None)
    assert usable_precision("fp16", cpu)[0] == "fp32" and "CUDA" in usable_precision("fp16", cpu)[1]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    precision, reason = usable_precision("bf16", cpu)
    assert precision == "fp32" and "AMX" in reason
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert usable_precision("bf16", cpu) == ("bf16", None)
