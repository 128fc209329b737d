"""Backends: torch.export (what torch-tensorrt compiles) and ONNX Runtime match eager; the artefact cache."""

from __future__ import annotations

import pytest
import torch

from ovseg_ros.core.backends import BackendUnavailable, DenseTower, export_program, make_runner
from ovseg_ros.core.registry import load_clip

TOLERANCE = 1e-4  # max abs difference of L2-normalised embeddings (float32 reassociation only)


@pytest.fixture(scope="module", params=["demo", "vit-b16"])
def encoder(request):
    if request.param == "demo":
        return load_clip("ovseg-demo-clip")
    return load_clip("ViT-B-16")


def pixels_for(encoder, width_patches: int = 3) -> torch.Tensor:
    ph, pw = encoder.patch_size
    height, width = encoder.native_size[0], encoder.native_size[1] + width_patches * pw  # non-native: interpolation
    generator = torch.Generator().manual_seed(0)
    return encoder.normalise(torch.rand(1, 3, height, width, generator=generator))


def test_torch_export_matches_eager_with_a_dynamic_batch(encoder):
    pixels = pixels_for(encoder)
    tower = DenseTower(encoder, "plain").eval()
    with torch.inference_mode():
        reference = tower(pixels)
    program = export_program(tower, tuple(pixels.shape))
    for batch in (1, 3):
        with torch.inference_mode():
            global_emb, dense = program.module()(pixels.repeat(batch, 1, 1, 1))
        assert dense.shape[0] == batch
        assert (global_emb[-1] - reference[0][0]).abs().max() < TOLERANCE
        assert (dense[-1] - reference[1][0]).abs().max() < TOLERANCE


def test_onnxruntime_matches_eager_and_reuses_its_cache(encoder, tmp_path):
    pixels = pixels_for(encoder)
    reference = make_runner(encoder, "plain", "torch")(pixels)
    runner = make_runner(encoder, "plain", "onnxruntime", cache_dir=tmp_path)
    global_emb, dense = runner(pixels)
    assert (global_emb - reference[0]).abs().max() < TOLERANCE
    assert (dense - reference[1]).abs().max() < TOLERANCE
    assert runner.export_seconds  # built once
    batch = torch.cat([pixels, pixels.flip(-1), pixels])  # several cameras' frames: the same artefact
    batch_global, batch_dense = runner(batch)
    assert batch_dense.shape[0] == 3 and len(runner.export_seconds) == 1
    assert (batch_dense[2] - reference[1][0]).abs().max() < TOLERANCE
    assert (batch_global[0] - reference[0][0]).abs().max() < TOLERANCE
    again = make_runner(encoder, "plain", "onnxruntime", cache_dir=tmp_path)
    again(pixels)
    assert not again.export_seconds  # loaded from the cache, not exported again
    for artefact in tmp_path.glob("*.onnx"):
        artefact.write_bytes(b"corrupt")
    rebuilt = make_runner(encoder, "plain", "onnxruntime", cache_dir=tmp_path)
    assert (rebuilt(pixels)[1] - reference[1]).abs().max() < TOLERANCE
    assert rebuilt.export_seconds  # a corrupt entry is rebuilt, never a crash


def test_tensorrt_needs_cuda_and_auto_picks_the_fastest(tmp_path):
    encoder = load_clip("ovseg-demo-vit")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        make_runner(encoder, "plain", "tensorrt")
    auto = make_runner(encoder, "plain", "auto", cache_dir=tmp_path)
    pixels = pixels_for(encoder)
    reference = make_runner(encoder, "plain", "torch")(pixels)
    assert (auto(pixels)[1] - reference[1]).abs().max() < TOLERANCE
    assert set(auto.timings_ms) == {"onnxruntime", "torch"}  # both timed on the first frame
    assert auto.chosen.name == min(auto.timings_ms, key=auto.timings_ms.get)
    with pytest.raises(ValueError, match="unknown backend"):
        make_runner(encoder, "plain", "tflite")


def test_node_with_the_auto_backend(tmp_path, make_client):
    from diagnostic_msgs.msg import DiagnosticArray
    from node_processes import start_node
    from std_msgs.msg import Header

    from ovseg_ros.ros.image_conversions import rgb_to_image
    from ovseg_ros.synth.world import generate_scene

    proc = start_node(tmp_path, name="ovseg_auto", namespace="auto",
                      params={"backend": "auto", "engine_cache_dir": str(tmp_path / "engines")})
    client = make_client("/auto")
    client.subscribe("/diagnostics", DiagnosticArray)
    try:
        assert client.wait_ready(90), proc.output()
        header = Header(frame_id="cam")
        header.stamp.sec = 42
        image = rgb_to_image(generate_scene(1, size=(120, 160)).image, header)
        for _ in range(20):
            client.publish_image(image)
            if client.wait_for("segmentation", lambda m: m.header.stamp.sec == 42, 2.0):
                break
        assert client.wait_for("segmentation", lambda m: m.header.stamp.sec == 42, 1.0) is not None, proc.output()
        status = client.wait_for("/diagnostics", lambda m: any(
            kv.key == "backend" and kv.value.startswith("auto -> ") for kv in m.status[0].values), 10.0)
        assert status is not None
    finally:
        assert proc.stop() == 0


def test_speed_harness_prints_and_writes_every_available_backend(tmp_path, capsys):
    """`ovseg-bench speed --backend all`: a row per backend that can run here, the machine, the camera batch."""
    import json

    from ovseg_ros.bench.speed import main

    out = tmp_path / "speed.json"
    assert main(["--clip", "ovseg-demo-vit", "--sizes", "5", "--runs", "1", "--backend", "all", "--modes", "full",
                 "--width", "160", "--height", "120", "--cameras", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    ran = {row["backend"] for row in report["rows"]}
    assert {"torch", "onnxruntime"} <= ran
    if not torch.cuda.is_available():
        assert "tensorrt" not in ran and "backend tensorrt skipped" in printed
    assert report["machine"]["cores"] and report["machine"]["matmul_fp32_gflops"] > 0
    assert all(row["fps"] > 0 and row["image_encoder"] > 0 for row in report["rows"])
    assert report["cameras"]["cameras"] == 2 and report["cameras"]["batched_ms"] > 0
    assert "2 cameras" in printed


def test_speed_harness_times_each_presets_stages_after_the_tower(tmp_path):
    """`ovseg-bench speed --preset a,b`: each preset's settings on the given model, with merge, PAMR and the
    after-tower share per row."""
    import json

    from ovseg_ros.bench.speed import main

    out = tmp_path / "speed.json"
    assert main(["--clip", "ovseg-demo-vit", "--preset", "naclip-vit-b16,clearclip-vit-b16", "--sizes", "5",
                 "--runs", "1", "--modes", "full,dcs", "--width", "160", "--height", "120", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["mode"]) for r in rows] == [("naclip-vit-b16", "full"), ("naclip-vit-b16", "dcs"),
                                                        ("clearclip-vit-b16", "full"), ("clearclip-vit-b16", "dcs")]
    naclip, clearclip = rows[0], rows[2]
    assert naclip["windows"] == 6 and naclip["pamr"] > 0 and naclip["merge_upsample"] > 0  # 160x120 -> 448x336
    assert clearclip["windows"] == 2 and "pamr" not in clearclip  # 597x448: two 448 windows, no PAMR
    assert all(0 < r["after_tower_ms"] < r["total_ms"] and r["after_tower_fraction"] > 0 for r in rows)
