"""Accuracy benchmark on the synthetic world: dense mIoU (seen / held-out), prompt IoU and label accuracy.

    ovseg-bench accuracy [--scenes 100] [--clip ovseg-demo-clip] [--sam ovseg-demo-sam]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ..core.dense import DenseConfig, DenseSegmenter
from ..core.metrics import ConfusionMatrix
from ..core.registry import load_clip
from ..core.text_cache import TextEmbeddingCache
from ..core.vocabulary import Vocabulary
from ..synth.world import HELD_OUT, STUFF, generate_scene, object_class_names, world_vocabulary

EVAL_SEED_BASE = 900_000  # evaluation seeds never overlap training pools (those use seed * 1_000_003 + i)


def world_class_groups() -> dict[str, list[int]]:
    vocab = world_vocabulary()
    novel = {f"{colour} {shape}" for colour, shape in HELD_OUT}
    return {
        "seen": [vocab.index(n) for n in list(STUFF) + object_class_names("seen")],
        "held_out": [vocab.index(n) for n in novel],
        "stuff": [vocab.index(n) for n in STUFF],
        "objects_seen": [vocab.index(n) for n in object_class_names("seen")],
    }


def make_segmenter(clip: str, config: DenseConfig, device: str = "cpu") -> DenseSegmenter:
    encoder = load_clip(clip, device=device)
    return DenseSegmenter(encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id), config)


def evaluate_dense(clip: str | DenseSegmenter, scenes: int = 100, size: int | tuple[int, int] = 224,
                   config: DenseConfig | None = None, seed_base: int = EVAL_SEED_BASE) -> dict:
    """Dense mIoU over the whole world vocabulary on `scenes` evaluation scenes (half the objects novel)."""
    segmenter = clip if isinstance(clip, DenseSegmenter) else make_segmenter(clip, config or DenseConfig())
    vocab = world_vocabulary()
    prepared = segmenter.prepare(Vocabulary(tuple(vocab)))
    confusion = ConfusionMatrix(len(vocab))
    times = []
    for i in range(scenes):
        scene = generate_scene(seed_base + i, size=size, split="eval")
        start = time.perf_counter()
        result = segmenter.segment(scene.image, prepared)
        times.append(time.perf_counter() - start)
        confusion.add(scene.labels, result.labels)
    groups = world_class_groups()
    return {
        "dense_miou_seen": round(confusion.mean_iou(groups["seen"]), 4),
        "dense_miou_held_out": round(confusion.mean_iou(groups["held_out"]), 4),
        "dense_miou_stuff": round(confusion.mean_iou(groups["stuff"]), 4),
        "dense_miou_objects_seen": round(confusion.mean_iou(groups["objects_seen"]), 4),
        "pixel_accuracy": round(confusion.pixel_accuracy(), 4),
        "scenes": scenes,
        "median_ms": round(1000 * float(np.median(times)), 1),
        "variant": segmenter.config.variant,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dense accuracy on the synthetic benchmark")
    parser.add_argument("--clip", default="ovseg-demo-clip")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--variant", default="plain")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_dense(args.clip, args.scenes, config=DenseConfig(variant=args.variant)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
