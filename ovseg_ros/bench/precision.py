"""`ovseg-bench precision`: bf16 against fp32 on the demo world: label agreement and time per frame.

    ovseg-bench precision [--scenes 20] [--height 480] [--width 640] [--preset demo] [--json FILE]

Both precisions run the same frames in one process, alternating, so the machine's speed drifts equally for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

from ..core.pipeline import build_segmenter
from ..core.settings import add_setting_options, settings_from_args
from ..core.vocabulary import make_vocabulary
from ..synth.world import generate_scene, world_vocabulary
from .report import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovseg-bench precision", description=__doc__.split("\n")[0])
    add_setting_options(parser)
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    settings = settings_from_args(args, precision="fp32")
    fp32 = build_segmenter(settings)
    bf16 = fp32.with_config(dataclasses.replace(fp32.config, precision="bf16"))
    prepared = fp32.prepare(make_vocabulary(list(world_vocabulary()), templates=list(settings.prompt_templates)))
    agreement, seconds = [], {"fp32": [], "bf16": []}
    for index in range(args.scenes + 1):  # the first scene warms both up and is not timed
        image = generate_scene(9000 + index, size=(args.height, args.width), split="eval").image
        labels = {}
        for name, segmenter in (("fp32", fp32), ("bf16", bf16)):
            start = time.perf_counter()
            labels[name] = segmenter.segment(image, prepared).labels
            if index:
                seconds[name].append(time.perf_counter() - start)
        if index:
            agreement.append(float((labels["fp32"] == labels["bf16"]).mean()))
    figures = {"preset": settings.preset, "clip": fp32.encoder.model_id, "scenes": args.scenes,
               "size": [args.height, args.width], "labels_equal_mean": round(float(np.mean(agreement)), 5),
               "labels_equal_min": round(min(agreement), 5),
               "fp32_ms": round(statistics.median(seconds["fp32"]) * 1000, 1),
               "bf16_ms": round(statistics.median(seconds["bf16"]) * 1000, 1)}
    for key, value in figures.items():
        print(f"{key:<20} {value}")
    write_json(args.json, figures)
    return 0
