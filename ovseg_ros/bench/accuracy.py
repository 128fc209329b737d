"""Accuracy benchmark on the synthetic world: dense mIoU (seen / held-out), prompt IoU and label accuracy.

    ovseg-bench accuracy [--scenes 100] [--preset demo] [--clip ovseg-demo-clip] [--sam ovseg-demo-sam]
                         [--variant naclip] [--pamr-steps 10] ...   (every dense node parameter is an option)
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from ..core.metrics import ConfusionMatrix, mask_iou
from ..core.pipeline import FrameInput, SegmentationPipeline, build_pipeline
from ..core.settings import Settings, add_setting_options, make_settings, settings_from_args
from ..core.vocabulary import UNLABELLED, Vocabulary
from ..synth.world import HELD_OUT, STUFF, generate_scene, object_class_names, world_vocabulary
from .report import print_against_targets, write_json

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


def world_pipeline(settings: Settings | str, distractors: int = 0) -> SegmentationPipeline:
    """The pipeline the node builds for `settings` (or for a CLIP model name with the plain settings: no
    category selection, no SAM), labelling the synthetic world's vocabulary plus `distractors` foreign names."""
    if isinstance(settings, str):
        settings = make_settings({"clip_model": settings, "sam_model": "", "selection_threshold": 0.0})
    vocabulary = Vocabulary(tuple(world_vocabulary() + distractor_names(distractors)))
    return build_pipeline(settings, cameras=[""], vocabulary=vocabulary, warm_up=False)


def distractor_names(count: int) -> list[str]:
    """Names outside the synthetic world, appended to its vocabulary to test large-vocabulary behaviour."""
    from .speed import load_names

    world = set(world_vocabulary())
    return [n for n in load_names(847) if n not in world][:count]


def evaluate_dense(pipeline: SegmentationPipeline | str, scenes: int = 100, size: int | tuple[int, int] = 224,
                   seed_base: int = EVAL_SEED_BASE) -> dict:
    """Dense mIoU over the world vocabulary on `scenes` evaluation scenes (half the objects novel), each frame
    through `pipeline.process_batch` exactly as the node runs it (SAM refinement included when set). A pixel
    labelled with a name outside the world (a distractor) counts as wrong."""
    pipeline = world_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    vocab = world_vocabulary()
    confusion = ConfusionMatrix(len(vocab))
    times, kept = [], []
    for i in range(scenes):
        scene = generate_scene(seed_base + i, size=size, split="eval")
        start = time.perf_counter()
        output = pipeline.process_batch([FrameInput("", scene.image, (i, 1))])[0]
        if output.error:
            raise RuntimeError(output.error)
        result = output.result
        times.append(time.perf_counter() - start)
        kept.append(len(result.selected_classes))
        predicted = result.labels.copy()
        predicted[(predicted >= len(vocab)) & (predicted != UNLABELLED)] = UNLABELLED  # a distractor: wrong
        confusion.add(scene.labels, predicted)
    groups = world_class_groups()
    return {
        "dense_miou_seen": round(confusion.mean_iou(groups["seen"]), 4),
        "dense_miou_held_out": round(confusion.mean_iou(groups["held_out"]), 4),
        "dense_miou_stuff": round(confusion.mean_iou(groups["stuff"]), 4),
        "dense_miou_objects_seen": round(confusion.mean_iou(groups["objects_seen"]), 4),
        "pixel_accuracy": round(confusion.pixel_accuracy(), 4),
        "scenes": scenes,
        "median_ms": round(1000 * float(np.median(times)), 1),
        "variant": pipeline.settings.dense_variant,
        "vocabulary_size": len(pipeline.vocabulary),
        "median_classes_kept": int(np.median(kept)),
    }


def centre_point(mask: np.ndarray) -> np.ndarray:
    """The interior point farthest from the mask's border (what an operator would click)."""
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([[x, y]], dtype=np.float32)


def evaluate_prompts(pipeline: SegmentationPipeline, scenes: int = 100, size: int | tuple[int, int] = 224,
                     seed_base: int = EVAL_SEED_BASE) -> dict:
    """Mask IoU for a centre point, a random interior point plus one background point, and a box; label accuracy
    (top-1 over the whole world vocabulary) for seen and held-out compositions, from the box prompts."""
    from ..core.prompt import Prompt

    segmenter, prompter = pipeline.segmenter, pipeline.prompters[""]
    prepared = segmenter.prepare(Vocabulary(tuple(world_vocabulary())))
    novel = {f"{colour} {shape}" for colour, shape in HELD_OUT}
    ious: dict[str, list[float]] = {"point": [], "multi_point": [], "box": []}
    correct: dict[str, list[bool]] = {"seen": [], "held_out": []}
    rng = np.random.default_rng(seed_base)
    for i in range(scenes):
        scene = generate_scene(seed_base + i, size=size, split="eval")
        if not scene.instance_masks:
            continue
        result = segmenter.segment(scene.image, prepared)
        prompter.add_frame((i, 0), scene.image, result.dense_features)
        prompts = {"point": [], "multi_point": [], "box": []}
        for mask, box in zip(scene.instance_masks, scene.boxes, strict=True):
            prompts["point"].append(Prompt(points=centre_point(mask), point_labels=np.ones(1, np.int64)))
            ys, xs = np.nonzero(mask)
            pick = rng.integers(len(xs))
            bys, bxs = np.nonzero(~mask)
            back = rng.integers(len(bxs))
            points = np.array([[xs[pick], ys[pick]], [bxs[back], bys[back]]], dtype=np.float32)
            prompts["multi_point"].append(Prompt(points=points, point_labels=np.array([1, 0])))
            prompts["box"].append(Prompt(box=np.asarray(box, np.float32)))
        for kind, group in prompts.items():
            _, answers = prompter.query((i, 0), group, prepared, multimask=kind == "point")
            for answer, mask, name in zip(answers, scene.instance_masks, scene.instance_classes, strict=True):
                ious[kind].append(mask_iou(answer.mask, mask))
                if kind == "box":
                    correct["held_out" if name in novel else "seen"].append(answer.labels[0] == name)
    return {
        "prompt_iou_point": round(float(np.mean(ious["point"])), 4),
        "prompt_iou_multi_point": round(float(np.mean(ious["multi_point"])), 4),
        "prompt_iou_box": round(float(np.mean(ious["box"])), 4),
        "label_accuracy_seen": round(float(np.mean(correct["seen"])), 4) if correct["seen"] else float("nan"),
        "label_accuracy_held_out": round(float(np.mean(correct["held_out"])), 4)
        if correct["held_out"] else float("nan"),
        "prompts_per_kind": len(ious["box"]),
    }


TARGETS = {"dense_miou_seen": 0.60, "dense_miou_held_out": 0.45, "prompt_iou_point": 0.80, "prompt_iou_box": 0.85,
           "label_accuracy_seen": 0.85, "label_accuracy_held_out": 0.60}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="accuracy on the synthetic benchmark (dense and prompts)")
    add_setting_options(parser)
    parser.add_argument("--sam", default="ovseg-demo-sam", help="empty: skip the prompt metrics")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--distractors", type=int, default=0, help="extra names that never occur (max 778)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    settings = settings_from_args(args, sam_model=args.sam)
    if settings.refinement == "sam" and not args.sam:
        parser.error("--refinement sam needs --sam")
    pipeline = world_pipeline(settings, args.distractors)
    results = {"clip": pipeline.segmenter.encoder.model_id, "preset": args.preset,
               **evaluate_dense(pipeline, args.scenes)}
    if pipeline.has_prompts:
        results.update(sam=args.sam, **evaluate_prompts(pipeline, args.scenes))
    print_against_targets({k: v for k, v in results.items() if isinstance(v, float)}, TARGETS)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
