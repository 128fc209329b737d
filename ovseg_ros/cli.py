"""`ovseg segment`: the dense segmenter on image files, folders or videos, without ROS.

    ovseg segment IMAGE_OR_DIR_OR_VIDEO... --vocab "grass,sky,red circle" --out DIR

Writes, per input frame, a 16-bit label PNG (class id per pixel, 65535 unlabelled), an overlay PNG, and one
summary.json with the vocabulary, per-frame classes, areas, scores, timings and tracked objects (ids persist
across the frames of a video or folder, as the node's do across a camera's frames).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def iter_frames(inputs: list[str], video_stride: int = 1) -> Iterator[tuple[str, np.ndarray]]:
    """(name, RGB frame) for every image, every image in a folder, every `video_stride`-th video frame."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            yield from iter_frames([str(p) for p in files])
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            capture = cv2.VideoCapture(str(path))
            if not capture.isOpened():
                raise ValueError(f"cannot open video {path}")
            index = 0
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                if index % video_stride == 0:
                    yield f"{path.stem}_{index:06d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                index += 1
            capture.release()
        elif path.is_file():
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"cannot read image {path}")
            yield path.stem, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        else:
            raise ValueError(f"no such file or folder: {path}")


def count_frames(inputs: list[str], video_stride: int) -> int | None:
    total = 0
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            total += sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            capture = cv2.VideoCapture(str(path))
            frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            capture.release()
            total += (frames + video_stride - 1) // video_stride
        else:
            total += 1
    return total or None


def segment_in_batches(pipeline, frames: Iterator[tuple[str, np.ndarray]], batch: int) -> Iterator[tuple[str, object]]:
    """(name, FrameOutput) in input order; `batch` frames share each image-tower pass (a GPU runs a batch
    faster than its frames one by one). ValueError if a frame fails."""
    from .core.pipeline import FrameInput

    frames = iter(frames)
    while pending := list(itertools.islice(frames, batch)):
        outputs = pipeline.process_batch([FrameInput("", rgb, (index, 0)) for index, (_, rgb) in enumerate(pending)])
        for (name, _), output in zip(pending, outputs, strict=True):
            if output.error:
                raise ValueError(f"{name}: {output.error}")
            yield name, output


def segment_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .core.pipeline import build_pipeline
    from .core.settings import settings_from_args
    from .core.vocabulary import VocabularyError, make_vocabulary

    # The node's pipeline, built by the same factory: same settings, same outputs (SAM refinement is excluded).
    settings = settings_from_args(args, device=args.device, sam_model="", publish_overlay=True)
    try:
        vocabulary = make_vocabulary([v for v in args.vocab.split(",") if v.strip()],
                                     args.template or list(settings.prompt_templates))
    except VocabularyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .core.registry import ModelError

    try:
        pipeline = build_pipeline(settings, cameras=[""], vocabulary=vocabulary, warm_up=False)
    except ModelError as exc:  # a model not installed, or a file that is not the model: the reason, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    progress = tqdm(total=count_frames(args.inputs, args.video_stride), unit="frame", disable=args.quiet)
    for name, output in segment_in_batches(pipeline, iter_frames(args.inputs, args.video_stride), args.batch):
        progress.update()
        result, rgb = output.result, output.frame.image
        cv2.imwrite(str(out / f"{name}_labels.png"), result.labels)
        cv2.imwrite(str(out / f"{name}_overlay.png"), cv2.cvtColor(output.overlay, cv2.COLOR_RGB2BGR))
        frames.append({
            "name": name,
            "size": [int(rgb.shape[1]), int(rgb.shape[0])],
            "classes": [{"id": i, "name": n, "area": round(a, 5), "score": round(s, 4)}
                        for i, n, a, s in zip(result.class_ids, result.class_names, result.class_areas,
                                              result.class_scores, strict=True)],
            "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
            "objects": [{"id": o.id, "label": o.label, "score": round(o.score, 4),
                         "box": [round(float(v), 1) for v in o.box]} for o in output.objects or []],
        })
    progress.close()
    summary = {"model": pipeline.segmenter.encoder.model_id, "preset": args.preset,
               "vocabulary": list(vocabulary.labels), "templates": list(vocabulary.templates),
               "config": pipeline.segmenter.config.__dict__, "frames": frames}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(frames)} frames -> {out}/ (labels PNG, overlay PNG, summary.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .core.settings import add_setting_options

    parser = argparse.ArgumentParser(prog="ovseg", description="open-vocabulary segmentation without ROS")
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment images, folders of images, or videos")
    seg.add_argument("inputs", nargs="+")
    seg.add_argument("--vocab", required=True, help="comma-separated class names (';' separates synonyms)")
    seg.add_argument("--template", action="append",
                     help="prompt template with {} or a template set name, e.g. imagenet80 (repeatable)")
    seg.add_argument("--out", required=True)
    seg.add_argument("--device", default="cpu")
    add_setting_options(seg, exclude_choices={"sam"})
    seg.add_argument("--video-stride", type=int, default=1)
    seg.add_argument("--batch", type=int, default=1, help="frames per image-tower pass (1-8)")
    seg.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 8:
        parser.error("--batch must be between 1 and 8")
    try:
        return segment_command(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
