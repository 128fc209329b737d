"""SED in the one pipeline a robot runs: built by the factory from settings and a checkpoint file, with
vocabulary swaps, prompts labelled by SED's own CLIP, tracked objects, category selection before the decoder,
and clear refusals. The reduced architecture (SED's modules on a ConvNeXt-atto CLIP) keeps this to seconds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ovseg_ros.bench.seeded_sed import seeded_state_dict
from ovseg_ros.core.clip_builders import build_clip
from ovseg_ros.core.modeling.sed import build_sed, checkpoint_state_dict, get_sed_config
from ovseg_ros.core.pipeline import FrameInput, PromptRequest, build_pipeline
from ovseg_ros.core.prompt import Prompt
from ovseg_ros.core.registry import ModelError, recorded_sha256
from ovseg_ros.core.settings import make_settings
from ovseg_ros.synth.world import generate_scene

VOCABULARY = ["grass", "water", "sky", "red circle", "blue square", "wall;brick wall"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The seeded weights in the released file's layout: detectron2's {"model": state_dict}."""
    network = build_sed(get_sed_config("sed-test-tiny"), build_clip)
    path = tmp_path_factory.mktemp("sed") / "model_final.pth"
    torch.save({"model": seeded_state_dict(network.state_dict()), "iteration": 80000}, path)
    return path


def settings_for(checkpoint, **changes):
    return make_settings({"preset": "sed-convnext-b", "dense_model": f"sed-test-tiny:{checkpoint}",
                          "vocabulary": VOCABULARY, "frame_cache_size": 2, **changes})


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    return build_pipeline(settings_for(checkpoint), cameras=[""])


def scene(seed: int) -> np.ndarray:
    return generate_scene(seed, size=(120, 160), split="eval").image


def test_the_factory_builds_sed_from_settings_and_frames_get_labels_objects_and_prompts(pipeline):
    assert pipeline.segmenter.encoder.model_id.startswith("sed-test-tiny@")
    assert pipeline.describe()["model"] == pipeline.segmenter.encoder.model_id
    image = scene(1)
    output = pipeline.process_batch([FrameInput("", image, (1, 0), "h1")])[0]
    assert not output.error, output.error
    result = output.result
    assert result.labels.shape == image.shape[:2] and set(np.unique(result.labels)) <= set(range(6))
    assert result.dense_features.shape == (24, 24, 64)  # SED's CLIP at 768 px, stride 32
    assert {"image_encoder", "decoder"} <= set(result.timings_ms)
    box = Prompt(box=np.array([20, 20, 100, 90], np.float32))
    point = Prompt(points=np.array([[60.0, 50.0]], np.float32), point_labels=np.array([1]))
    answer = pipeline.answer_prompts(PromptRequest([box, point], camera="", key=(1, 0)))
    assert len(answer.answers) == 2
    for prompt_result in answer.answers:
        assert prompt_result.labels and prompt_result.labels[0] in pipeline.vocabulary.display_names
    assert pipeline.set_vocabulary(["floor", "table", "cup"], []).success
    output = pipeline.process_batch([FrameInput("", scene(2), (2, 0), "h2")])[0]
    assert not output.error and output.vocabulary.labels == ("floor", "table", "cup")
    assert set(np.unique(output.result.labels)) <= {0, 1, 2}


def test_category_selection_runs_before_the_decoder(checkpoint):
    pipeline = build_pipeline(settings_for(checkpoint, selection_threshold=0.9, selection_patch_top_k=1,
                                           sam_model="", track_objects=False), cameras=[""], warm_up=False)
    segmenter = pipeline.segmenter
    seen = []
    original = segmenter.network.aggregator.forward
    segmenter.network.aggregator.forward = lambda dense, text, *args, **kw: (seen.append(text.shape[0]),
                                                                             original(dense, text, *args, **kw))[1]
    result = pipeline.process_batch([FrameInput("", scene(3), (1, 0))])[0].result
    assert seen == [len(result.selected_classes)] and len(result.selected_classes) < len(VOCABULARY)
    assert set(np.unique(result.labels)) <= set(result.selected_classes)


def test_per_class_chunks_and_fast_inference_are_consistent(pipeline):
    segmenter = pipeline.segmenter
    prepared = segmenter.prepare(pipeline.vocabulary)
    image = scene(4)
    with torch.inference_mode():
        _, dense, guidance, _ = segmenter.tower(image)
        whole = segmenter.decode(dense, guidance, prepared)
        chunked = segmenter.with_config(dataclasses.replace(segmenter.config, class_chunk=1)).decode(
            dense, guidance, prepared)
    assert torch.allclose(whole, chunked, atol=1e-5)
    fast = segmenter.with_config(dataclasses.replace(segmenter.config, fast_top_k=1))
    with torch.inference_mode():
        rejected = fast.decode(dense, guidance, prepared)
    kept = rejected.flatten(1).amax(dim=1) > 0
    assert kept.any()
    assert torch.all(rejected[~kept] == 0)


def test_bad_settings_and_checkpoints_are_refused_with_the_reason(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="window_stride"):
        settings_for(checkpoint, window_stride=112)
    with pytest.raises(ValueError, match="fast_top_k is SED"):
        make_settings({"fast_top_k": 8})
    state = checkpoint_state_dict(checkpoint)
    state.pop("sem_seg_head.predictor.transformer.head.bias")
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)  # a bare state dict is accepted too, but this one lacks a key
    with pytest.raises(ModelError, match="head.bias"):
        build_pipeline(settings_for(broken), cameras=[""], warm_up=False)
    with pytest.raises(ModelError, match="unknown SED architecture"):
        build_pipeline(settings_for(checkpoint, dense_model="sed-convnext-xl"), cameras=[""], warm_up=False)


def test_a_checkpoint_without_a_published_sha256_is_recorded_once_and_verified_after(tmp_path, monkeypatch):
    from ovseg_ros.core import registry

    models = tmp_path / "models"
    models.mkdir()
    (models / "manifest.yaml").write_text(
        "models:\n  sed-tiny:\n    kind: sed\n    arch: sed-test-tiny\n    file: tiny.pth\n    sha256: ''\n")
    weights = models / "tiny.pth"
    weights.write_bytes(b"not yet a checkpoint")
    monkeypatch.setenv("OVSEG_MODELS_DIR", str(models))
    arch, path, entry = registry.resolve("sed-tiny", "sed")
    assert recorded_sha256(path).is_file() and arch == "sed-test-tiny"
    registry.resolve("sed-tiny", "sed")  # verified against the record now
    weights.write_bytes(b"changed")
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.resolve("sed-tiny", "sed")


def test_the_manifest_names_the_released_checkpoints_and_their_drive_ids_parse():
    from ovseg_ros.core.registry import drive_file_id, load_manifest

    manifest = load_manifest()
    for name, file_id in (("sed-convnext-b", "1qx6zGZgSPkF6TObregRz4uzQqSRHrgUw"),
                          ("sed-convnext-l", "1zAXE0QXy47n0cVn7j_2cSR85eqxdDGg8")):
        entry = manifest[name]
        assert entry.kind == "sed" and entry.arch == name and entry.license.startswith("Apache-2.0")
        assert entry.size and drive_file_id(entry.url) == file_id
    assert drive_file_id("https://drive.google.com/uc?export=download&id=abc_12-3") == "abc_12-3"
    with pytest.raises(ModelError, match="not a Google Drive"):
        drive_file_id("https://drive.google.com/drive/folders")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-compile"])
def test_exported_and_compiled_towers_match_eager(checkpoint, backend, tmp_path):
    """The tower (SedTower: what TensorRT also gets) through another backend; the decoder stays in torch."""
    eager = build_pipeline(settings_for(checkpoint, sam_model="", track_objects=False), cameras=[""],
                           warm_up=False).segmenter
    other = build_pipeline(settings_for(checkpoint, sam_model="", track_objects=False, backend=backend,
                                        engine_cache_dir=str(tmp_path)), cameras=[""], warm_up=False).segmenter
    assert other.runner().name == backend
    prepared = eager.prepare(eager_vocabulary())
    image = scene(5)
    with torch.inference_mode():
        reference = eager.decode(*eager.tower(image)[1:3], prepared)
        result = other.decode(*other.tower(image)[1:3], prepared)
    assert (reference - result).abs().max() < 1e-4
    if backend == "onnxruntime":
        assert list(tmp_path.glob("*.onnx"))  # cached for the next start


def eager_vocabulary():
    from ovseg_ros.core.templates import IMAGENET80
    from ovseg_ros.core.vocabulary import Vocabulary

    return Vocabulary(tuple(VOCABULARY), IMAGENET80)


def test_the_sed_benchmark_prints_and_writes_its_figures(tmp_path, capsys):
    import json

    from ovseg_ros.bench.sed_speed import main

    out = tmp_path / "sed.json"
    assert main(["--arch", "sed-test-tiny", "--classes", "3", "--fast-top-k", "0", "1", "--precisions", "fp32",
                 "--runs", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "M parameters" in printed and "tower_ms" in printed
    figures = json.loads(out.read_text())
    assert [row["fast_top_k"] for row in figures["rows"]] == [0, 1]
    assert all(row["tower_ms"] > 0 and row["decoder_gflops"] > 0 for row in figures["rows"])
    assert figures["parameters"] > 1e6
