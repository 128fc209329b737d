"""OV-SAM's image pass (``OvSamTower``: RN50 stages, SAM2CLIP neck, FPN) through the other backends equals eager
torch: ONNX Runtime (exported once, cached), torch.compile, and the torch.export program torch-tensorrt compiles
on a robot (TensorRT itself cannot be installed here). Prompts then decode the same masks and labels. And
`ovseg-bench ovsam` prints and writes its figures."""

from __future__ import annotations

import pytest
import torch

from ovseg_ros.bench.ovsam_fixtures import VOCABULARY, fixture_images
from ovseg_ros.core.backends import export_program
from ovseg_ros.core.ovsam import OvSamTower, build_ovsam_model

pytestmark = pytest.mark.slow  # each backend exports or compiles the 1024 x 1024 pass: about a minute apiece


@pytest.fixture(scope="module")
def reference():
    model = build_ovsam_model("ovsam-test-tiny", seed=5)
    image = fixture_images()["arc2017"]
    pixels, _, _ = model.preprocess(image)
    with torch.inference_mode():
        outputs = model.runner()(pixels)
    return model, image, pixels, outputs


def assert_outputs_close(outputs, expected) -> None:
    assert len(outputs) == len(expected) == len(OvSamTower.output_names)
    for name, ours, eager in zip(OvSamTower.output_names, outputs, expected, strict=True):
        assert ours.shape == eager.shape, name
        scale = max(1.0, float(eager.abs().max()))
        assert float((ours.float() - eager).abs().max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-compile"])
def test_backends_compute_the_eager_image_pass(reference, backend, tmp_path):
    eager_model, image, pixels, expected = reference
    model = build_ovsam_model("ovsam-test-tiny", seed=5, backend=backend, engine_cache_dir=str(tmp_path))
    assert model.runner().name == backend
    with torch.inference_mode():
        outputs = model.runner()(pixels)
    assert_outputs_close(outputs, expected)
    if backend == "onnxruntime":
        assert list(tmp_path.glob("*.onnx"))  # cached for the next start
    features, eager_features = model.image_features(image), eager_model.image_features(image)
    boxes = torch.tensor([[100.0, 80.0, 600.0, 500.0], [20.0, 300.0, 400.0, 760.0]])
    ours = model.predict(features, VOCABULARY, boxes=boxes)
    eager = eager_model.predict(eager_features, VOCABULARY, boxes=boxes)
    assert torch.equal(ours.probabilities.argmax(-1), eager.probabilities.argmax(-1))
    assert float((ours.low_res_masks - eager.low_res_masks).abs().max()) < 1e-3


def test_the_tensorrt_program_is_the_eager_image_pass(reference):
    """torch-tensorrt compiles this exported program (dynamic batch 1..8); here it runs as torch."""
    model, _, pixels, expected = reference
    program = export_program(OvSamTower(model).eval(), tuple(pixels.shape))
    with torch.no_grad():
        outputs = program.module()(pixels)
    assert_outputs_close(outputs, expected)


def test_the_ovsam_benchmark_prints_and_writes_its_figures(tmp_path, capsys):
    import json

    from ovseg_ros.bench.ovsam_speed import main

    out = tmp_path / "ovsam.json"
    assert main(["--arch", "ovsam-test-tiny", "--precisions", "fp32", "--runs", "1", "--prompts", "2",
                 "--classes", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "image_pass_ms" in printed and "GFLOPs" in printed
    figures = json.loads(out.read_text())
    (row,) = figures["rows"]
    assert row["image_pass_ms"] > 0 and row["box_ms_per_prompt"] > 0 and row["point_ms_per_prompt"] > 0
    sizes = figures["sizes"]
    assert sizes["ovsam_image_pass"]["gflops"] > 100 and sizes["sam_vit_h_image_encoder"]["parameters_m"] > 600
