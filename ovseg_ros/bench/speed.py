"""Speed benchmark: per-stage latency of the dense segmenter at 640x480, full vocabulary vs category selection.

    ovseg-bench speed [--clip ViT-B-16] [--sizes 20,150,847] [--runs 5] [--backend all] [--precision fp32,fp16]
                      [--device cuda] [--cameras 2] [--json out.json]
    ovseg-bench speed --preset naclip-vit-b16,sclip-vit-b16,clearclip-vit-b16 --sizes 150 --clip ViT-B-16

With --preset, each preset's inference settings (windows, PAMR, logit scale, ...) run on --clip's weights, and
the table splits the time after the tower (window merge + upsampling, PAMR, classification) from the tower's.

Random weights are fine for speed (the work does not depend on the values), except that category selection keeps
a weight-dependent number of classes: the table prints how many it kept. Also prints the machine's measured
float32 matmul throughput and the dense pass's FLOP count, so the distance to the compute bound is visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..core.backends import BACKENDS, BackendUnavailable
from ..core.dense import DenseConfig, DenseSegmenter
from ..core.registry import load_clip
from ..core.settings import dense_config, preset_defaults
from ..core.text_cache import TextEmbeddingCache
from ..core.vocabulary import Vocabulary
from ..runtime import share_file
from ..synth.world import generate_scene, world_vocabulary


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def matmul_gflops(size: int = 1024, runs: int = 10, dtype: torch.dtype = torch.float32,
                  device: str = "cpu") -> float:
    """Median GEMM throughput of this machine's device (the compute bound the dense pass is compared to)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times)) / 1e9


def dense_pass_flops(segmenter: DenseSegmenter, image: np.ndarray) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    pixels = segmenter.preprocess(image)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        segmenter.encode(pixels)
    return float(counter.get_total_flops())


def load_names(count: int) -> list[str]:
    if count <= len(world_vocabulary()):
        return world_vocabulary()[:count]
    source = "config/vocabularies/names_150.txt" if count <= 150 else "config/vocabularies/names_847.txt"
    names = [n.strip() for n in share_file(source).read_text().splitlines() if n.strip() and not n.startswith("#")]
    if len(names) < count:
        raise ValueError(f"{source} has {len(names)} names, fewer than {count}")
    return names[:count]


def time_segment(segmenter: DenseSegmenter, image: np.ndarray, prepared, runs: int) -> dict:
    segmenter.segment(image, prepared)  # warm-up
    stages: dict[str, list[float]] = {}
    totals, kept = [], []
    for _ in range(runs):
        start = time.perf_counter()
        result = segmenter.segment(image, prepared)
        totals.append((time.perf_counter() - start) * 1000)
        kept.append(len(result.selected_classes))
        for name, value in result.timings_ms.items():
            stages.setdefault(name, []).append(value)
    row = {name: round(float(np.median(values)), 1) for name, values in stages.items()}
    row["total_ms"] = round(float(np.median(totals)), 1)
    # Everything after the tower (selection, window merge, upsampling, PAMR, argmax, statistics), per frame.
    after = [t - stages["preprocess"][i] - stages["image_encoder"][i] for i, t in enumerate(totals)]
    row["after_tower_ms"] = round(float(np.median(after)), 1)
    row["after_tower_fraction"] = round(row["after_tower_ms"] / max(row["image_encoder"], 1e-6), 3)
    row["fps"] = round(1000.0 / row["total_ms"], 2)
    row["classes_kept"] = int(np.median(kept))
    return row


def depth_output_costs(image: np.ndarray, labels: np.ndarray, runs: int) -> list[dict]:
    """Per-frame cost of the 3D outputs (cloud + markers) at the image size, full and down-sampled."""
    from std_msgs.msg import Header

    from ..core.geometry import Intrinsics, PairedDepth, class_regions, labelled_cloud_points
    from ..ros.messages import cloud_msg, markers_msg

    height, width = labels.shape
    depth = np.full((height, width), 2.0, np.float32)
    depth[labels == labels[height // 2, width // 2]] = 1.0
    paired = PairedDepth(depth, Intrinsics(500.0, 500.0, width / 2, height / 2, width, height), "camera", 0.0)
    confidence = np.ones(labels.shape, np.float32)
    class_ids = [int(c) for c in np.unique(labels)]
    names = [f"class {i}" for i in range(int(labels.max()) + 1)]
    rows = []
    for stride in (1, 4):
        cloud_ms = median_ms(lambda s=stride: cloud_msg(
            Header(), paired, labelled_cloud_points(paired.limited(10.0), image, labels, confidence, s)), runs)
        points = len(np.arange(0, height, stride)) * len(np.arange(0, width, stride))
        rows.append({"output": f"labels_cloud stride {stride}", "points": points, "ms": cloud_ms})
    markers_ms = median_ms(lambda: markers_msg(Header(), paired, class_regions(paired, labels, class_ids, names),
                                               len(names), True), runs)
    rows.append({"output": f"labels_markers ({len(class_ids)} classes)", "points": 0, "ms": markers_ms})
    return rows


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="ViT-B-16", help="model (random init is fine for speed)")
    parser.add_argument("--sizes", default="20,150,847")
    parser.add_argument("--selection", type=float, default=0.5, help="category selection tau for the DCS rows")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--input-size", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--backend", default="torch",
                        help="comma-separated backends, or 'all' (those that can run here)")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--modes", default="full,dcs", help="full (every class) and/or dcs (category selection)")
    parser.add_argument("--preset", default="", help="comma-separated presets whose inference settings to time "
                        "(their own model is replaced by --clip); empty = plain whole-image settings")
    parser.add_argument("--depth", action="store_true", help="also time the 3D outputs (cloud, markers)")
    parser.add_argument("--cameras", type=int, default=1,
                        help="N > 1: also time N cameras' frames segmented one by one vs in one batch")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info()
    info["matmul_fp32_gflops"] = round(matmul_gflops(device=args.device), 1)
    encoder = load_clip(args.clip, device=args.device)
    cache = TextEmbeddingCache(encoder.encode_text, encoder.model_id)
    image = generate_scene(7, size=(args.height, args.width), split="eval").image
    base = DenseConfig(input_size=args.input_size)
    rows = []
    backends = list(BACKENDS) if args.backend == "all" else args.backend.split(",")
    settings = {name: dense_config(preset_defaults(name)) for name in args.preset.split(",") if name} or {"": base}
    first_preset, first_config = next(iter(settings.items()))
    flops = dense_pass_flops(DenseSegmenter(encoder, cache, first_config), image)  # every window's tower pass
    for (preset, preset_config), backend in itertools.product(settings.items(), backends):
        for precision in args.precision.split(","):
            for count in [int(v) for v in args.sizes.split(",")]:
                vocabulary = Vocabulary(tuple(load_names(count)), templates=("a photo of a {}.",))
                for mode in args.modes.split(","):
                    config = dataclasses.replace(preset_config, precision=precision,
                                                 selection_threshold=args.selection if mode == "dcs" else 0.0)
                    segmenter = DenseSegmenter(encoder, cache, config, backend=backend)
                    try:
                        segmenter.runner()
                        prepared = segmenter.prepare(vocabulary)
                        timed = time_segment(segmenter, image, prepared, args.runs)
                    except BackendUnavailable as exc:
                        print(f"[speed] backend {backend} skipped: {exc}")
                        break
                    except Exception as exc:  # one failing backend must not hide the others' figures
                        print(f"[speed] backend {backend} {precision} failed: {exc!r}")
                        break
                    rows.append({"preset": preset, "backend": backend, "precision": precision, "classes": count,
                                 "mode": mode, "windows": len(segmenter.windows(segmenter.model_input_shape(
                                     args.height, args.width))), **timed})
    reference = [r for r in rows if r["backend"] == backends[0] and r["precision"] == "fp32"
                 and r["preset"] == first_preset] or rows
    encoder_ms = float(np.median([r["image_encoder"] for r in reference]))
    achieved = flops / (encoder_ms / 1000) / 1e9
    report = {"machine": info, "model": encoder.model_id, "image": f"{args.width}x{args.height}",
              "model_input": "x".join(str(v) for v in DenseSegmenter(encoder, cache, first_config).model_input_shape(
                  args.height, args.width)),
              "dense_pass_gflop": round(flops / 1e9, 2), "dense_pass_gflops_achieved": round(achieved, 1),
              "fraction_of_matmul_bound": round(achieved / info["matmul_fp32_gflops"], 2), "rows": rows}
    print(f"machine: {info['cpu']} | {info['cores']} cores | torch {info['torch']} "
          f"({info['torch_threads']} threads) | fp32 matmul {info['matmul_fp32_gflops']} GFLOP/s")
    print(f"model {encoder.model_id}, {report['image']} -> model input {report['model_input']}; dense pass "
          f"{report['dense_pass_gflop']} GFLOP at {achieved:.1f} GFLOP/s "
          f"({report['fraction_of_matmul_bound']:.0%} of the matmul bound)")
    stages = ["preprocess", "image_encoder", "category_selection", "merge_upsample", "pamr", "classify",
              "postprocess"]
    print(f"{'preset':>17} {'backend':>13} {'prec':>4} {'classes':>7} {'mode':>4} {'kept':>5} {'win':>3} "
          + " ".join(f"{s[:14]:>14}" for s in stages) + f" {'total_ms':>9} {'after/tower':>11} {'fps':>6}")
    for row in rows:
        print(f"{row['preset'] or '-':>17} {row['backend']:>13} {row['precision']:>4} {row['classes']:>7} "
              f"{row['mode']:>4} {row['classes_kept']:>5} {row['windows']:>3} "
              + " ".join(f"{row.get(s, 0.0):>14.1f}" for s in stages)
              + f" {row['total_ms']:>9.1f} {row['after_tower_fraction']:>11.2f} {row['fps']:>6.2f}")
    for row in rows:
        if row["mode"] != "dcs":
            continue
        full = next((r for r in rows if r["mode"] == "full" and all(r[k] == row[k] for k in
                                                                    ("preset", "backend", "precision", "classes"))),
                    None)
        if full:
            print(f"{row['backend']} {row['precision']} {row['classes']} classes: DCS "
                  f"{full['total_ms'] / row['total_ms']:.2f}x faster than the full vocabulary")
    eager = next((r for r in rows if r["backend"] == "torch" and r["precision"] == "fp32"), None)
    if eager:
        for row in rows:
            if row["mode"] == eager["mode"] and row["classes"] == eager["classes"] and row is not eager:
                ratio = eager["image_encoder"] / row["image_encoder"]
                print(f"{row['backend']} {row['precision']}: image tower {ratio:.2f}x vs torch fp32 eager "
                      f"({row['image_encoder']} vs {eager['image_encoder']} ms)")
    if args.depth:
        segmenter = DenseSegmenter(encoder, cache, base)
        labels = segmenter.segment(image, segmenter.prepare(Vocabulary(tuple(world_vocabulary())))).labels
        report["depth_outputs"] = depth_output_costs(image, labels, args.runs)
        for row in report["depth_outputs"]:
            print(f"3D: {row['output']:32s} {row['points']:>7} points {row['ms']:>8.2f} ms")
    if args.cameras > 1:
        report["cameras"] = camera_batching(DenseSegmenter(encoder, cache, base, backend=backends[0]),
                                            args.cameras, (args.height, args.width), args.runs)
        row = report["cameras"]
        print(f"{row['cameras']} cameras ({backends[0]} fp32, {row['classes']} classes): one by one "
              f"{row['sequential_ms']} ms, one batch {row['batched_ms']} ms per set of frames "
              f"({row['speedup']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def camera_batching(segmenter: DenseSegmenter, cameras: int, size: tuple[int, int], runs: int) -> dict:
    """What a node serving several cameras gains from one batched tower pass over a pass per frame."""
    images = [generate_scene(100 + i, size=size, split="eval").image for i in range(cameras)]
    prepared = segmenter.prepare(Vocabulary(tuple(world_vocabulary())))
    segmenter.segment_batch(images, prepared)  # warm-up (and any export for the batch shape)
    sequential = median_ms(lambda: [segmenter.segment(image, prepared) for image in images], runs)
    batched = median_ms(lambda: segmenter.segment_batch(images, prepared), runs)
    return {"cameras": cameras, "classes": len(prepared.vocabulary), "sequential_ms": sequential,
            "batched_ms": batched, "speedup": round(sequential / batched, 2)}


if __name__ == "__main__":
    raise SystemExit(main())
