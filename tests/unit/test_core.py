"""The ROS-free core with real open_clip models: dense variants, selection, caches, limits, determinism."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

from ovseg_ros.core.clip_dense import DENSE_VARIANTS
from ovseg_ros.core.dense import DenseConfig, DenseSegmenter, RunningArgmax
from ovseg_ros.core.registry import load_clip
from ovseg_ros.core.text_cache import TextEmbeddingCache
from ovseg_ros.core.vocabulary import Vocabulary, VocabularyError, make_vocabulary
from ovseg_ros.synth.world import generate_scene


@pytest.fixture(scope="module")
def small():
    encoder = load_clip("ovseg-demo-vit")
    return encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id)


@pytest.fixture(scope="module")
def vit_b16():
    torch.set_num_threads(2)
    return load_clip("ViT-B-16")


@pytest.mark.parametrize("variant", DENSE_VARIANTS)
def test_every_variant_runs_on_a_vit_b16_shaped_model(vit_b16, variant):
    images = vit_b16.normalise(torch.rand(1, 3, 224, 288))  # non-native width: position table interpolated
    with torch.inference_mode():
        global_emb, dense = vit_b16.dense_features(images, variant)
    assert global_emb.shape == (1, 512) and dense.shape == (1, 14, 18, 512)
    assert torch.allclose(dense.norm(dim=-1), torch.ones(1, 14, 18), atol=1e-4)
    assert torch.isfinite(dense).all()


def test_variants_differ_but_share_the_class_token(small):
    encoder, _ = small
    images = encoder.normalise(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        outputs = {v: encoder.dense_features(images, v) for v in DENSE_VARIANTS}
    for variant in DENSE_VARIANTS[1:]:
        assert torch.allclose(outputs[variant][0], outputs["plain"][0], atol=1e-5)  # CLS: the standard block
        assert not torch.allclose(outputs[variant][1], outputs["plain"][1], atol=1e-3)


def test_same_input_same_output(small):
    encoder, cache = small
    segmenter = DenseSegmenter(encoder, cache, DenseConfig(selection_threshold=0.5, tag_validation_top_k=2))
    prepared = segmenter.prepare(Vocabulary(("grass", "sky", "red circle", "blue star")))
    image = generate_scene(3, size=(240, 320), split="eval").image
    first = segmenter.segment(image, prepared)
    second = segmenter.segment(image.copy(), prepared)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.confidence, second.confidence)


@pytest.mark.parametrize("window_stride", [0, 64])
def test_a_batch_of_frames_gives_what_each_frame_gives_alone(window_stride):
    """One tower pass for several cameras' frames must not change any frame's answer (sizes may differ)."""
    encoder = load_clip("ovseg-demo-clip")
    segmenter = DenseSegmenter(encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id),
                               DenseConfig(selection_threshold=0.3, input_size=160 if window_stride else 0,
                                           window_stride=window_stride))
    prepared = segmenter.prepare(Vocabulary(("grass", "water", "sky", "wall", "sand", "red circle", "blue star")))
    images = [generate_scene(seed, size=size, split="eval").image
              for seed, size in ((1, (240, 320)), (2, (240, 320)), (3, (200, 200)))]
    batched = segmenter.segment_batch(images, prepared)
    for image, together in zip(images, batched, strict=True):
        alone = segmenter.segment(image, prepared)
        assert together.labels.shape == image.shape[:2]
        assert np.mean(together.labels == alone.labels) > 0.999
        assert np.allclose(together.confidence, alone.confidence, atol=1e-4)
        assert torch.allclose(together.dense_features, alone.dense_features, atol=1e-4)
        assert together.selected_classes == alone.selected_classes
    assert not np.array_equal(batched[0].labels, batched[1].labels)  # each frame got its own answer


def test_chunked_upsampling_equals_the_direct_softmax():
    logits = torch.randn(1, 37, 6, 8, generator=torch.Generator().manual_seed(1)) * 5
    full = torch.nn.functional.interpolate(logits, size=(30, 40), mode="bilinear", align_corners=False)[0]
    argmax = RunningArgmax()
    for start in range(0, 37, 5):  # the segmenter's chunks of classes, upsampled one chunk at a time
        part = torch.nn.functional.interpolate(logits[:, start:start + 5], size=(30, 40), mode="bilinear",
                                               align_corners=False)[0]
        argmax.add(start, part)
    index, confidence = argmax.result()
    probs = torch.softmax(full, dim=0)
    assert np.array_equal(index, probs.argmax(0).numpy())
    assert np.allclose(confidence, probs.max(0).values.numpy(), atol=1e-5)


def test_thousand_classes_stay_within_bounded_memory(small):
    encoder, cache = small
    names = tuple(f"object number {i}" for i in range(1000))
    segmenter = DenseSegmenter(encoder, cache, DenseConfig())
    prepared = segmenter.prepare(Vocabulary(names, templates=("a photo of a {}.",)))
    image = generate_scene(4, size=(480, 640), split="eval").image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = segmenter.segment(image, prepared)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.labels.shape == (480, 640) and result.labels.max() < 1000
    # Holding all 1000 upsampled class maps would take 1000*480*640*4 B = 1.2 GB (twice that with the softmax).
    assert grown_mb < 600, f"peak memory grew by {grown_mb:.0f} MB"


def test_known_vocabulary_is_not_embedded_again(small, tmp_path):
    encoder, _ = small
    cache = TextEmbeddingCache(encoder.encode_text, encoder.model_id, cache_dir=tmp_path)
    vocab = Vocabulary(("sofa;couch", "chair", "lamp"))
    first = cache.embed_vocabulary(vocab)
    assert cache.computed == 3
    again = cache.embed_vocabulary(Vocabulary(("lamp", "chair", "sofa;couch")))
    assert cache.computed == 3 and torch.allclose(again[2], first[0])
    fresh = TextEmbeddingCache(encoder.encode_text, encoder.model_id, cache_dir=tmp_path)  # a restarted node
    assert torch.allclose(fresh.embed_vocabulary(vocab), first) and fresh.computed == 0
    synonym = cache.embed(("sofa",), vocab.templates)
    assert not torch.allclose(synonym[0], first[0])  # the synonym ensemble differs from one name alone


def test_category_selection_off_keeps_everything_on_keeps_fewer(small):
    encoder, cache = small
    names = tuple(f"thing {i}" for i in range(50))
    image = generate_scene(5, size=224, split="eval").image
    off = DenseSegmenter(encoder, cache, DenseConfig(selection_threshold=0.0))
    on = DenseSegmenter(encoder, cache, DenseConfig(selection_threshold=0.9, selection_patch_top_k=1))
    prepared = off.prepare(Vocabulary(names))
    assert len(off.segment(image, prepared).selected_classes) == 50
    kept = on.segment(image, prepared).selected_classes
    assert 1 <= len(kept) < 50


@pytest.mark.parametrize(
    "labels, message",
    [([], "empty"), ("cat", "list"), (["a", "b", "c"], "characters"), (["x" * 129], "limit"),
     (["cat", "Cat"], "repeats"), (["ok", 3], "not a string"), (["bad\x00name"], "control")],
)
def test_vocabulary_validation_says_why(labels, message):
    with pytest.raises(VocabularyError, match=message):
        make_vocabulary(labels)


def test_config_rejects_bad_values():
    for kwargs in ({"variant": "nope"}, {"score_threshold": 2.0}, {"selection_threshold": -1},
                   {"refinement": "crf"}, {"input_size": -5}):
        with pytest.raises(ValueError):
            DenseConfig(**kwargs)


def test_overlay_legend_lists_the_largest_classes_and_counts_the_rest():
    """Many classes on a small image: the legend shows what fits, largest first, and says how many it left out."""
    from ovseg_ros.core.overlay import blend

    labels = np.full((120, 160), 29, np.uint16)
    for k in range(29):  # 30 classes in vertical stripes; the last id, 29, fills the most
        labels[:, 4 * k:4 * k + 4] = k
    names = [f"class {k}" for k in range(30)]
    ids = list(range(30))
    areas = [float(np.mean(labels == k)) for k in ids]
    image = np.full((120, 160, 3), 90, np.uint8)
    with_legend = blend(image, labels, 30, alpha=0.0, names=names, class_ids=ids, class_areas=areas)
    without = blend(image, labels, 30, alpha=0.0)
    changed_rows = np.nonzero((with_legend != without).any(axis=(1, 2)))[0]
    assert changed_rows.max() < 120  # every legend row inside the image
    # the first swatch is the largest class's colour (class 29), not the first id's
    from ovseg_ros.core.overlay import palette

    assert tuple(with_legend[10, 9]) == tuple(int(c) for c in palette(30)[29])
    assert changed_rows.max() > 60  # it used the height, ending with a "+N more" row


def test_object_names_are_written_just_above_each_box():
    from ovseg_ros.core.overlay import draw_object_names

    image = np.full((200, 300, 3), 90, np.uint8)
    draw_object_names(image, [(7, "red mug", np.array([150.0, 120.0, 200.0, 170.0]))])
    rows, cols = np.nonzero((image != 90).any(axis=2))
    assert rows.max() < 120 and rows.min() > 90  # the text sits above the box's top edge
    assert cols.min() >= 150  # starting at the box's left edge
