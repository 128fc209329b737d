"""OV-SAM's pieces against independent statements of what the released code does, and the loader's refusals.

The whole network equals the released code in tests/integration/test_ovsam_exactness.py; here each step is
checked on its own, with formulas written out in the test: the classifier ensemble, mmdet's mask2bbox and
SingleRoIExtractor level mapping, mmcv's imrescale, the class-embedding generator's layout, the default box of a
point prompt's CLIP branch, strict loading, the released class lists as vocabularies, and the registry's refusal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from ovseg_ros.bench.seeded_ovsam import part_shapes, seeded_parts
from ovseg_ros.core.modeling.ovsam import (
    OVSAM_CHECKPOINT_PREFIXES,
    ensemble_logits,
    get_ovsam_config,
    load_ovsam_parts,
    mask_boxes,
    multilevel_roi_align,
    ovsam_config_names,
)
from ovseg_ros.core.ovsam import OvSamFeatures, build_ovsam_model, label_set, released_synonyms, resize_for_ovsam
from ovseg_ros.core.registry import ModelError, load_manifest, load_ovsam, ovsam_parts
from ovseg_ros.core.vocabulary import VocabularyError, VocabularyLimits, validate_labels


@pytest.fixture(scope="module")
def tiny():
    return build_ovsam_model("ovsam-test-tiny", seed=7)


def test_ensemble_is_the_released_geometric_mean():
    generator = torch.Generator().manual_seed(0)
    head, clip = torch.randn(5, 4, generator=generator) * 3, torch.randn(5, 4, generator=generator) * 3
    seen = torch.tensor([1.0, 0.0, 0.0, 1.0])  # the last column is the background (always "seen")
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    out = ensemble_logits(head, clip, seen, valid, alpha=0.1, beta=0.9).numpy()
    p_head, p_clip = head.softmax(-1).double().numpy(), clip.softmax(-1).double().numpy()
    for n in range(5):
        for k in range(4):
            weight = (0.1 if seen[k] else 0.9) if valid[n] else 0.0
            expected = (1 - weight) * math.log(p_head[n, k]) + weight * math.log(p_clip[n, k])
            assert out[n, k] == pytest.approx(expected, abs=1e-5)


def test_mask_boxes_are_tight_with_exclusive_ends():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 20, 30), dtype=bool)
    masks[0, 3:9, 5:17] = True
    masks[1, rng.integers(0, 20, 6), rng.integers(0, 30, 6)] = True
    masks[3, 19, 29] = True  # mask 2 stays empty
    boxes = mask_boxes(torch.from_numpy(masks)).numpy()
    for mask, box in zip(masks, boxes, strict=True):
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        np.testing.assert_array_equal(box, expected)


def test_each_box_pools_the_level_of_its_scale():
    strides = (4, 8, 16, 32)
    generator = torch.Generator().manual_seed(2)
    feats = tuple(torch.randn(1, 3, 256 // s, 256 // s, generator=generator) for s in strides)
    # sides 20, 60, 120, 200, 250 -> mmdet levels floor(log2(side / 56)) clamped to 0..3: 0, 0, 1, 1, 2
    sides = (20, 60, 120, 200, 250)
    boxes = torch.tensor([[2.0, 3.0, 2.0 + s, 3.0 + s] for s in sides])
    pooled = multilevel_roi_align(feats, boxes, strides, output_size=5)
    for i, side in enumerate(sides):
        level = min(3, max(0, math.floor(math.log2(side / 56 + 1e-6))))
        rois = torch.cat([torch.zeros(1, 1), boxes[i:i + 1]], dim=1)
        expected = roi_align(feats[level], rois, 5, spatial_scale=1 / strides[level], sampling_ratio=0,
                             aligned=True)
        torch.testing.assert_close(pooled[i:i + 1], expected)
    assert [min(3, max(0, math.floor(math.log2(s / 56 + 1e-6)))) for s in sides] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(("shape", "resized", "scale"), [
    ((480, 640), (768, 1024), (1.6, 1.6)),
    ((331, 197), (1024, 609), (609 / 197, 1024 / 331)),
    ((1024, 1024), (1024, 1024), (1.0, 1.0)),
    ((2000, 300), (1024, 154), (154 / 300, 1024 / 2000)),
])
def test_resize_is_mmcv_imrescale(shape, resized, scale):
    image = np.zeros((*shape, 3), dtype=np.uint8)
    out, factor = resize_for_ovsam(image)
    assert out.shape[:2] == resized
    np.testing.assert_allclose(factor, scale)


def test_class_embeddings_have_the_generators_layout(tiny):
    labels = ("person;man", "robot arm", "cup;mug;teacup")
    prototypes, seen = tiny.class_embeddings(labels)
    width = 3  # the most synonyms
    assert prototypes.shape == (tiny.config.text_dim, len(labels) + 1, width)
    norms = prototypes.norm(dim=0)
    torch.testing.assert_close(norms[:-1], torch.ones(len(labels), width))
    assert torch.count_nonzero(prototypes[:, -1]) == 0, "the background row is zeros"
    torch.testing.assert_close(prototypes[:, 0, 2], prototypes[:, 0, 0])  # padded with its first synonym
    torch.testing.assert_close(prototypes[:, 1, 1], prototypes[:, 1, 0])
    assert seen.tolist() == [1.0, 0.0, 0.0, 1.0]  # person is a COCO base class; cup is novel (48/17 split)
    assert released_synonyms(" Cup ; MUG ") == ["cup", "mug"]


def test_point_prompts_pool_the_predicted_box_by_default(tiny):
    cfg = tiny.config
    generator = torch.Generator().manual_seed(3)
    size = cfg.image_size
    features = OvSamFeatures(
        embedding=torch.randn(1, cfg.prompt_embed_dim, size // 16, size // 16, generator=generator),
        fpn=tuple(torch.randn(1, cfg.fpn_channels, size // s, size // s, generator=generator) for s in cfg.strides),
        last_stage=torch.randn(1, cfg.backbone_channels[-1], size // 32, size // 32, generator=generator),
        input_size=(768, 1024), scale=(1.6, 1.6))
    points = torch.tensor([[[400.0, 300.0]], [[100.0, 700.0]]])
    labels = torch.ones(2, 1, dtype=torch.long)
    vocabulary = ("person", "cup", "bottle")
    by_default = tiny.predict(features, vocabulary, points, labels)
    predicted = mask_boxes(by_default.low_res_masks.sigmoid()[:, 0] > 0.5) * 4
    torch.testing.assert_close(by_default.boxes, predicted)
    explicit = tiny.predict(features, vocabulary, points, labels, clip_boxes=predicted)
    torch.testing.assert_close(by_default.scores, explicit.scores)
    other = tiny.predict(features, vocabulary, points, labels, clip_boxes=torch.tensor([[0.0, 0, 512, 512]] * 2))
    assert not torch.allclose(other.clip_logits, by_default.clip_logits), "the CLIP branch pools the box it gets"
    assert by_default.probabilities.shape == (2, 3)
    masks, confidence = tiny.frame_masks(by_default.low_res_masks, features, (480, 640))
    assert masks.shape == (2, 480, 640) and masks.dtype == bool and confidence.shape == (2,)


def test_parts_load_strictly_and_wrong_files_are_named(tiny):
    network = tiny.network
    parts = seeded_parts(network, seed=11)
    load_ovsam_parts(network, parts)
    expected = dict(parts["clip2sam"])
    assert network.mask_decoder.label_token.weight.data_ptr() != expected["mask_decoder.label_token.weight"].data_ptr()
    torch.testing.assert_close(network.mask_decoder.label_token.weight, expected["mask_decoder.label_token.weight"])
    with pytest.raises(ValueError, match="needs the parts sam2clip"):
        load_ovsam_parts(network, {k: v for k, v in parts.items() if k != "sam2clip"})
    swapped = {**parts, "sam2clip": parts["clip2sam"]}
    with pytest.raises(ValueError, match="holds no 'neck_student"):
        load_ovsam_parts(network, swapped)
    extra = {**parts, "clip2sam": {**parts["clip2sam"], "mask_decoder.iou_token.weight": torch.zeros(1, 256)}}
    with pytest.raises(ValueError, match="unexpected.*iou_token"):
        load_ovsam_parts(network, extra)
    short = dict(parts["sam"])
    short.pop("prompt_encoder.not_a_point_embed.weight")
    with pytest.raises(ValueError, match="missing.*not_a_point_embed"):
        load_ovsam_parts(network, {**parts, "sam": short})


def test_full_layouts_match_the_released_key_counts():
    """The released files' key counts (dev/ovsam_side_by_side.py recorded them from the released modules)."""
    from ovseg_ros.core.modeling.ovsam import OvSamNetwork

    class NoClip(torch.nn.Module):
        pass

    for name in ("ovsam-rn50x16-coco", "ovsam-rn50x16-lvis"):
        network = OvSamNetwork(get_ovsam_config(name), NoClip())
        shapes = {part: listing for part, listing in part_shapes(network).items() if part != "clip"}
        assert len(shapes["sam2clip"]) == 86 and len(shapes["sam"]) == 17 and len(shapes["clip2sam"]) == 16 + 103
        assert shapes["sam2clip"]["neck_student.pos_embed"] == (1, 64, 64, 1280)
        assert shapes["sam2clip"]["neck_student.patch_embeds.3.projection.weight"] == (3072, 1280, 2, 2)
        roi = network.mask_decoder.roi_size
        assert roi == (12 if name.endswith("coco") else 7)
    assert set(OVSAM_CHECKPOINT_PREFIXES) == {"neck", "fpn_neck", "mask_decoder", "pe"}
    assert {"ovsam-rn50x16-coco", "ovsam-rn50x16-lvis", "ovsam-test-tiny"} <= set(ovsam_config_names())


def test_released_class_lists_are_vocabularies():
    coco, lvis = label_set("coco"), label_set("lvis")
    assert len(coco["labels"]) == 80 and len(coco["base_ids"]) == 48 and len(coco["novel_ids"]) == 17
    assert len(lvis["labels"]) == 1203
    labels = validate_labels(["@coco", "robot arm"])
    assert len(labels) == 81 and labels[0].startswith("person;") and labels[-1] == "robot arm"
    with pytest.raises(VocabularyError, match="exceed the limit of 1000"):
        validate_labels(["@lvis"])
    assert len(validate_labels(["@lvis"], VocabularyLimits(max_classes=1203))) == 1203
    with pytest.raises(VocabularyError, match="unknown class list '@ade'"):
        validate_labels(["@ade"])


def test_registry_refuses_missing_parts_naming_the_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("OVSEG_MODELS_DIR", str(tmp_path / "models"))
    manifest = load_manifest()
    for name in ("ovsam-coco", "ovsam-lvis"):
        parts = ovsam_parts(name)
        assert len(parts) == 4 and all(p in manifest for p in parts)
        assert all(manifest[p].url and manifest[p].license for p in parts)
        assert any("S-Lab" in manifest[p].license for p in parts)
        with pytest.raises(ModelError, match=f"ovseg-models fetch {name}.*S-Lab"):
            load_ovsam(name)
    with pytest.raises(ModelError, match="unknown prompt model 'ovsam-base'"):
        load_ovsam("ovsam-base")


def test_class_embeddings_are_the_template_mean_and_are_cached_on_disk(tiny, tmp_path):
    from ovseg_ros.core.templates import VILD14
    from ovseg_ros.core.text_cache import TextEmbeddingCache

    tiny.text_cache = TextEmbeddingCache(tiny.encode_text, tiny.model_id, tmp_path)
    labels = ("chair;seat", "door")
    prototypes, _ = tiny.class_embeddings(labels)
    assert tiny.text_cache.computed == 3  # one embedding per synonym
    for k, name in ((0, "chair"), (0, "seat"), (1, "door")):
        text = tiny.encode_text([template.format(name) for template in VILD14])
        expected = torch.nn.functional.normalize(torch.nn.functional.normalize(text, dim=-1).mean(0), dim=0)
        column = 1 if name == "seat" else 0
        torch.testing.assert_close(prototypes[:, k, column], expected, atol=1e-6, rtol=0)
    tiny.text_cache = TextEmbeddingCache(tiny.encode_text, tiny.model_id, tmp_path)  # a restarted node
    again, _ = tiny.class_embeddings(("door", "chair;seat"))
    assert tiny.text_cache.computed == 0
    torch.testing.assert_close(again[:, 0, 0], prototypes[:, 1, 0])
