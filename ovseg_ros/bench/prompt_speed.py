"""Prompt benchmark: 10 box prompts on one 640x480 frame, labels from the shared CLIP pass (mask pooling of the
frame's dense features) vs the image-crop baseline (CLIP on each mask's crop), and per-prompt latency once the
frame's SAM embedding is cached.

    ovseg-bench prompt [--clip ovseg-demo-clip] [--sam ovseg-demo-sam] [--prompts 10] [--runs 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..core.pipeline import build_pipeline
from ..core.prompt import Prompt
from ..core.settings import make_settings
from ..core.vocabulary import Vocabulary
from ..synth.world import generate_scene, world_vocabulary
from .report import write_json
from .speed import machine_info, median_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="ovseg-demo-clip")
    parser.add_argument("--sam", default="ovseg-demo-sam")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = build_pipeline(make_settings({"clip_model": args.clip, "sam_model": args.sam, "frame_cache_size": 2,
                                             "selection_threshold": 0.0}), cameras=[""], warm_up=False)
    dense, prompter = pipeline.segmenter, pipeline.prompters[""]
    prepared = dense.prepare(Vocabulary(tuple(world_vocabulary())))
    scene = generate_scene(11, size=(480, 640), split="eval", min_objects=5, max_objects=5)
    rng = np.random.default_rng(0)
    boxes = [scene.boxes[i % len(scene.boxes)] + rng.uniform(-3, 3, 4) for i in range(args.prompts)]
    prompts = [Prompt(box=np.clip(b, 0, [639, 479, 640, 480]).astype(np.float32)) for b in boxes]

    result = dense.segment(scene.image, prepared)  # the node's dense pass for this frame

    def shared_new_frame() -> None:  # the frame arrives, its dense features are reused, SAM runs lazily
        prompter.add_frame((1, 0), scene.image, result.dense_features)
        prompter.query((1, 0), prompts, prepared)

    def crop_new_frame() -> None:  # SAM, then CLIP on each crop
        prompter.add_frame((2, 0), scene.image, result.dense_features)
        frame, answers = prompter.query((2, 0), prompts, prepared)
        prompter.classify_crops(frame.image, np.stack([a.mask for a in answers]), prepared)

    shared_new_frame()
    crop_new_frame()
    shared_ms = median_ms(shared_new_frame, args.runs)
    crop_ms = median_ms(crop_new_frame, args.runs)
    frame = prompter.frame((1, 0))
    masks = np.stack([a.mask for a in prompter.query((1, 0), prompts, prepared)[1]])
    recognise_shared = median_ms(lambda: prompter.classify_masks(frame, masks, prepared), args.runs)
    recognise_crop = median_ms(lambda: prompter.classify_crops(frame.image, masks, prepared), args.runs)
    cached_all = median_ms(lambda: prompter.query((1, 0), prompts, prepared), args.runs)
    cached_one = median_ms(lambda: prompter.query((1, 0), prompts[:1], prepared), args.runs)
    report = {
        "machine": machine_info(), "clip": dense.encoder.model_id, "sam": args.sam, "prompts": args.prompts,
        "new_frame_shared_ms": shared_ms, "new_frame_crop_baseline_ms": crop_ms,
        "speedup_new_frame": round(crop_ms / shared_ms, 2),
        "recognition_shared_ms": recognise_shared, "recognition_crop_ms": recognise_crop,
        "speedup_recognition": round(recognise_crop / max(recognise_shared, 0.01), 1),
        "cached_frame_all_prompts_ms": cached_all, "cached_frame_per_prompt_ms": round(cached_all / args.prompts, 1),
        "cached_frame_single_prompt_ms": cached_one,
    }
    print(f"{args.prompts} box prompts, 640x480, CLIP {report['clip']}, SAM {args.sam} "
          f"({report['machine']['cpu']}, {report['machine']['torch_threads']} threads), medians of {args.runs}:")
    print(f"  new frame, labels from the shared dense pass : {shared_ms:8.1f} ms")
    print(f"  new frame, image-crop baseline (CLIP per crop): {crop_ms:8.1f} ms  -> {report['speedup_new_frame']}x")
    print(f"  recognition only: mask pooling {recognise_shared} ms vs crops {recognise_crop} ms "
          f"-> {report['speedup_recognition']}x")
    print(f"  cached frame: {cached_all} ms for {args.prompts} prompts ({report['cached_frame_per_prompt_ms']} ms "
          f"per prompt), {cached_one} ms for a single prompt")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
