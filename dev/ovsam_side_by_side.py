"""Dev-time only: run Open-Vocabulary SAM's released code beside ours on the same seeded weights; write fixtures.

Not part of the package, not run by the tests. It needs a checkout of github.com/HarborYuan/ovsam (never
committed here) and a folder with the pure-Python OpenMMLab packages its code imports (mmengine 0.10.7, mmcv-lite
2.2.0, mmdet 3.3.0 and their pure-Python dependencies), e.g.:

    git -C /work/.mirror/HarborYuan+ovsam/repo archive HEAD | tar -x -C /tmp/ref/ovsam
    pip download --no-deps mmdet==3.3.0 mmengine==0.10.7 mmcv-lite   # unzip the wheels into SITE, then
    pip install --no-deps --target SITE addict yapf termcolor rich platformdirs markdown-it-py mdurl \
        pycocotools shapely terminaltables matplotlib kornia
    .venv/bin/python dev/ovsam_side_by_side.py --ovsam /tmp/ref/ovsam --site SITE

The released side runs in a child process: OV-SAM's own ``OVSAM`` detector, ``OpenCLIPBackbone`` (its vendored
open_clip), ``MultiLayerTransformerNeck``, ``SAMPromptEncoder`` and ``OVSAMHead``, mmdet's real ``FPN``,
``SingleRoIExtractor``, ``DetDataPreprocessor`` and ``DetDataSample``, and mmcv's real ``imrescale``. Stand-ins:
- ``mmcv.ops`` (mmcv-lite has no compiled ops): ``RoIAlign`` is torchvision's ``roi_align`` with
  ``aligned=True`` (mmcv's default, same sampling); every other op raises if called (none is, at inference);
- mmcv's version string reads 2.1.0 (mmdet 3.3.0 refuses mmcv-lite 2.2.0 by version only);
- the OpenAI weight download (``create_model_from_pretrained``): the vendored open_clip builds the architecture
  with QuickGELU (as OpenAI's weights are built) and loads the seeded CLIP state dict;
- SAM ViT-H's URL (``checkpoint_dict['vit_h']``) points at the seeded ``sam`` file;
- ``tools/gen_cls.py``'s classifier loop (its ``main`` needs the datasets' configs) is repeated here around the
  released ``OpenCLIPBackboneText``, ``split_label`` and ``VILD_PROMPT``, and saved where ``OVSAMHead`` reads it.
The FPN's weights load by its prefix as mmengine's ``Pretrained`` init would. The vocabulary's overlap with the
training classes is set as ``model.OVERLAPPING``, as the released ``tools/test.py`` does.

Fixtures (tests/fixtures/ovsam/): ovsam.json (cases, seeds and digests, inputs' digests, input sizes) and
ovsam.npz (per case, image and prompt mode: the 256 x 256 mask logits on a stride-4 grid, the head's, the CLIP
branch's and the ensembled class scores, the labels, the frame-size masks (bit-packed), and spot checks of the
image embedding and the class prototypes).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import pickle
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "ovsam"
sys.path.insert(0, str(ROOT))

# (case, architecture, released model name, neck width, head RoI size, images)
CASES = [
    ("tiny", "ovsam-test-tiny", "RN50", 128, 12, ("arc2017", "voc-portrait")),
    ("coco", "ovsam-rn50x16-coco", "RN50x16", 1280, 12, ("arc2017", "voc-portrait")),
    ("lvis", "ovsam-rn50x16-lvis", "RN50x16", 1280, 7, ("arc2017",)),
]


# ---------------------------------------------------------------------------------------------- released side
def _stand_in_mmcv_ops() -> None:
    import mmcv
    import torch
    import torchvision

    class RoIAlign(torch.nn.Module):
        """mmcv.ops.RoIAlign's signature over torchvision's kernel (the same bilinear sampling when aligned)."""

        def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode="avg", aligned=True,
                     use_torchvision=False):
            super().__init__()
            self.output_size = tuple(output_size) if isinstance(output_size, (tuple, list)) else \
                (output_size, output_size)
            self.spatial_scale, self.sampling_ratio, self.aligned = float(spatial_scale), int(sampling_ratio), aligned
            assert pool_mode == "avg" and aligned

        def forward(self, features, rois):
            return torchvision.ops.roi_align(features, rois, self.output_size, self.spatial_scale,
                                             self.sampling_ratio, self.aligned)

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is not part of this stand-in")
        return type(name, (), {"__init__": unavailable}) if name[:1].isupper() else unavailable

    def stub(name):
        module = types.ModuleType(name)
        module.__getattr__ = missing
        module.RoIAlign = RoIAlign
        module.__path__ = []
        return module

    class OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name.startswith("mmcv.ops.") else None

        def create_module(self, spec):
            return stub(spec.name)

        def exec_module(self, module):
            pass

    sys.modules["mmcv.ops"] = mmcv.ops = stub("mmcv.ops")
    sys.meta_path.insert(0, OpsFinder())
    mmcv.__version__ = "2.1.0"


def released_worker(job_path: str) -> None:
    job = pickle.loads(Path(job_path).read_bytes())
    sys.path[:0] = [job["site"], job["ovsam"]]
    os.environ["HOME"] = job["home"]  # OVSAMHead reads ~/.cache/embd/NAME.pth
    _stand_in_mmcv_ops()
    import ext.open_clip as vendored_open_clip
    import numpy as np
    import torch
    from ext.meta.sam_meta import checkpoint_dict

    clip_state = torch.load(job["parts"]["clip"], map_location="cpu")

    def from_pretrained(model_name, pretrained=None, return_transform=False, **kwargs):
        model = vendored_open_clip.create_model(model_name, force_quick_gelu=True)
        model.load_state_dict(clip_state, strict=True)
        return model

    vendored_open_clip.create_model_from_pretrained = from_pretrained
    checkpoint_dict["vit_h"] = job["parts"]["sam"]

    # tools/gen_cls.py's classifier, around the released text model, split_label and templates.
    from ext.templates import VILD_PROMPT
    from mmdet.datasets.transforms import Resize
    from mmdet.models import FPN, SingleRoIExtractor
    from mmdet.models.data_preprocessors import DetDataPreprocessor
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    from seg.models.backbones.openclip_backbone import OpenCLIPBackbone, OpenCLIPBackboneText
    from seg.models.detectors.ovsam import OVSAM
    from seg.models.heads.ovsam_head import OVSAMHead
    from seg.models.necks.sam_pe import SAMPromptEncoder
    from seg.models.necks.transformer_neck import MultiLayerTransformerNeck
    spec = importlib.util.spec_from_file_location("gen_cls", Path(job["ovsam"]) / "tools" / "gen_cls.py")
    gen_cls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cls)
    text_model = OpenCLIPBackboneText(job["model_name"], init_cfg=dict(type="clip_pretrain", checkpoint="openai"))
    descriptions, candidates = [], []
    for class_name in job["classes"]:
        labels = gen_cls.split_label(class_name)
        candidates.append(len(labels))
        descriptions += [template.format(label) for label in labels for template in VILD_PROMPT]
    with torch.no_grad():
        features = text_model(descriptions)
    features = features.reshape(sum(candidates), len(VILD_PROMPT), -1)
    features = features / features.norm(dim=-1, keepdim=True)
    features = features.mean(dim=1)
    features = features / features.norm(dim=-1, keepdim=True)
    classifier, start, widest = [], 0, max(candidates)
    for count in candidates:
        rows = features[start:start + count]
        if count < widest:
            rows = torch.cat([rows, rows[0].repeat(widest - count, 1)])
        classifier.append(rows)
        start += count
    embd = Path(job["home"]) / ".cache" / "embd"
    embd.mkdir(parents=True, exist_ok=True)
    torch.save(torch.stack(classifier), embd / "fixture.pth")

    channels = list(job["channels"])
    results = {}
    for mode in ("point", "box"):
        model = OVSAM(
            backbone=dict(type=OpenCLIPBackbone, model_name=job["model_name"], fix=True,
                          init_cfg=dict(type="clip_pretrain", checkpoint="openai")),
            neck=dict(type=MultiLayerTransformerNeck, input_size=(1024, 1024), in_channels=channels,
                      strides=[4, 8, 16, 32], layer_ids=(0, 1, 2, 3), embed_channels=job["neck_width"],
                      out_channels=256, fix=True,
                      init_cfg=dict(type="Pretrained", checkpoint=job["parts"]["sam2clip"], prefix="neck_student")),
            fpn_neck=dict(type=FPN, in_channels=channels, out_channels=256, num_outs=4),
            prompt_encoder=dict(type=SAMPromptEncoder, model_name="vit_h", fix=True,
                                init_cfg=dict(type="sam_pretrain", checkpoint="vit_h")),
            mask_decoder=dict(type=OVSAMHead, gen_box=True, model_name="vit_h", with_label_token=True, fix=False,
                              ov_classifier_name="fixture",
                              roi_extractor=dict(type=SingleRoIExtractor,
                                                 roi_layer=dict(type=sys.modules["mmcv.ops"].RoIAlign,
                                                                output_size=job["roi_size"], sampling_ratio=0),
                                                 out_channels=256, featmap_strides=[4, 8, 16, 32]),
                              init_cfg=dict(type="Pretrained", checkpoint=job["parts"]["clip2sam"],
                                            prefix="mask_decoder")),
            use_clip_feat=True, use_head_feat=True, use_gt_prompt=True, use_point=mode == "point",
            num_classes=len(job["classes"]))
        fpn_state = torch.load(job["parts"]["clip2sam"], map_location="cpu")
        model.fpn_neck.load_state_dict({k[len("fpn_neck."):]: v for k, v in fpn_state.items()
                                        if k.startswith("fpn_neck.")}, strict=True)
        model.OVERLAPPING = list(job["seen"])
        model.eval()
        if mode == "point":
            results["released_keys"] = {part: sorted(getattr(model, part).state_dict())
                                        for part in ("neck", "fpn_neck", "pe", "mask_decoder")}
        captured: dict[str, list] = {"logits": []}
        head_logit = model.mask_decoder.forward_logit

        def record_logit(embedding, _inner=head_logit, _captured=captured):
            out = _inner(embedding)
            _captured["logits"].append(out.detach().clone())
            return out

        model.mask_decoder.forward_logit = record_logit
        ensemble = model.open_voc_inference

        def record_ensemble(*args, _inner=ensemble, _captured=captured, **kwargs):
            out = _inner(*args, **kwargs)
            _captured["scores"] = out.detach().clone()
            return out

        model.open_voc_inference = record_ensemble
        model.mask_decoder.register_forward_hook(
            lambda mod, args, out, _c=captured: _c.__setitem__("low_res", out[0].detach().clone()))
        model.neck.register_forward_hook(lambda mod, args, out, _c=captured: _c.__setitem__("embedding", out.detach()))
        resize = Resize(scale=(1024, 1024), keep_ratio=True)  # the test pipeline's
        preprocessor = DetDataPreprocessor(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                                           bgr_to_rgb=True, pad_size_divisor=1024, pad_mask=False)
        for name, image in job["images"].items():
            bgr = np.ascontiguousarray(image[:, :, ::-1])  # LoadImageFromFile's cv2 decode
            loaded = resize({"img": bgr, "img_shape": bgr.shape[:2], "ori_shape": bgr.shape[:2]})
            resized, (w_scale, h_scale) = loaded["img"], loaded["scale_factor"]
            sample = DetDataSample(metainfo=dict(img_shape=resized.shape[:2], ori_shape=image.shape[:2],
                                                 scale_factor=(w_scale, h_scale)))
            prompts = job["prompts"][name]
            if mode == "point":
                sample.gt_instances = InstanceData(point_coords=torch.from_numpy(prompts["points"]),
                                                   bboxes=torch.from_numpy(prompts["point_boxes"]))
            else:
                sample.gt_instances = InstanceData(bboxes=torch.from_numpy(prompts["boxes"]))
            data = preprocessor({"inputs": [torch.from_numpy(resized.transpose(2, 0, 1).copy())],
                                 "data_samples": [sample]}, training=False)
            captured["logits"].clear()
            with torch.no_grad():
                out = model.predict(data["inputs"], data["data_samples"])[0].pred_instances
            head, clip = captured["logits"]
            results[(mode, name)] = {
                "scale": (w_scale, h_scale), "input_size": resized.shape[:2],
                "low_res": captured["low_res"].numpy(), "head": head[:, 0].numpy(), "clip": clip[:, 0].numpy(),
                "scores": captured["scores"][:, 0].numpy(), "labels": out.labels.numpy(),
                "masks": out.masks.numpy(), "embedding": captured["embedding"].numpy(),
                "prototypes": model.mask_decoder.cls_embed.numpy()}
    Path(job["out"]).write_bytes(pickle.dumps(results))


# ------------------------------------------------------------------------------------------------- our side
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ovsam", required=True, help="checkout of github.com/HarborYuan/ovsam")
    parser.add_argument("--site", required=True, help="folder with mmengine, mmcv-lite, mmdet and their deps")
    parser.add_argument("--cases", nargs="*", default=[c[0] for c in CASES])
    parser.add_argument("--out", default=str(FIXTURES))
    parser.add_argument("--released-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.released_worker:
        released_worker(args.released_worker)
        return 0
    import numpy as np
    import torch

    from ovseg_ros.bench.ovsam_fixtures import (
        EMBEDDING_STRIDE,
        LOW_RES_STRIDE,
        VOCABULARY,
        fixture_images,
        input_prompts,
    )
    from ovseg_ros.bench.report import git_short_head
    from ovseg_ros.bench.seeded_ovsam import DEFAULT_SEED, parts_digest, seeded_parts
    from ovseg_ros.core.ovsam import build_ovsam_model

    images = fixture_images()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, arrays_path = out_dir / "ovsam.json", out_dir / "ovsam.npz"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"cases": {}}
    arrays = dict(np.load(arrays_path)) if arrays_path.is_file() else {}
    meta.update({"seed": DEFAULT_SEED, "vocabulary": list(VOCABULARY), "low_res_stride": LOW_RES_STRIDE,
                 "embedding_stride": EMBEDDING_STRIDE,
                 "images": {n: hashlib.sha256(i.tobytes()).hexdigest()[:16] for n, i in images.items()},
                 "released": "github.com/HarborYuan/ovsam " + git_short_head(args.ovsam, "(archive of 137d2c2)"),
                 "command": "dev/ovsam_side_by_side.py --ovsam OVSAM --site SITE"})
    for case, arch, model_name, neck_width, roi_size, names in CASES:
        if case not in args.cases:
            continue
        ours = build_ovsam_model(arch, seed=DEFAULT_SEED)
        parts = seeded_parts(ours.network, DEFAULT_SEED)
        _, seen = ours.class_embeddings(VOCABULARY)
        released_classes = [label.replace(";", ",") for label in VOCABULARY]
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for part, state in parts.items():
                paths[part] = str(Path(tmp) / f"{part}.pth")
                torch.save(state, paths[part])
            prompts = {}
            for name in names:
                _, _, scale = ours.preprocess(images[name])
                prompts[name] = input_prompts(*images[name].shape[:2], scale)
            job = {"site": args.site, "ovsam": args.ovsam, "home": tmp, "parts": paths, "model_name": model_name,
                   "channels": list(ours.config.backbone_channels), "neck_width": neck_width,
                   "roi_size": roi_size, "classes": released_classes, "seen": [bool(s) for s in seen[:-1]],
                   "images": {n: images[n] for n in names}, "prompts": prompts, "out": str(Path(tmp) / "out.pkl")}
            (Path(tmp) / "job.pkl").write_bytes(pickle.dumps(job))
            env = {**os.environ, "PYTHONPATH": ""}
            subprocess.run([sys.executable, __file__, "--ovsam", args.ovsam, "--site", args.site,
                            "--released-worker", str(Path(tmp) / "job.pkl")], check=True, env=env, cwd=tmp)
            results = pickle.loads((Path(tmp) / "out.pkl").read_bytes())
        for part, keys in results["released_keys"].items():  # the released modules' names = ours
            ours_part = sorted(k for k in getattr(ours.network, part).state_dict())
            released_part = [k for k in keys if k not in ("cls_embed", "logit_scale")]
            if ours_part != released_part:
                raise SystemExit(f"{part}: key layouts differ: {sorted(set(ours_part) ^ set(released_part))[:10]}")
        meta["cases"][case] = {"arch": arch, "images": list(names), "digests": parts_digest(parts),
                               "seen": [int(s) for s in seen.tolist()], "inputs": {}}
        for name in names:
            features = ours.image_features(images[name])
            for mode in ("point", "box"):
                released = results[(mode, name)]
                p = prompts[name]
                if mode == "point":
                    prediction = ours.predict(features, VOCABULARY, torch.from_numpy(p["points"]),
                                              torch.ones(p["points"].shape[:2], dtype=torch.long),
                                              clip_boxes=torch.from_numpy(p["point_boxes"]))
                else:
                    prediction = ours.predict(features, VOCABULARY, boxes=torch.from_numpy(p["boxes"]))
                masks, _ = ours.frame_masks(prediction.low_res_masks, features, images[name].shape[:2])
                diffs = {
                    "low_res": float(np.abs(prediction.low_res_masks.numpy() - released["low_res"]).max()),
                    "head": float(np.abs(prediction.head_logits.numpy() - released["head"]).max()),
                    "clip": float(np.abs(prediction.clip_logits.numpy() - released["clip"]).max()),
                    "scores": float(np.abs(prediction.scores.numpy() - released["scores"]).max()),
                    "embedding": float(np.abs(features.embedding.numpy() - released["embedding"]).max()),
                    "labels_equal": bool((prediction.probabilities.argmax(-1).numpy() == released["labels"]).all()),
                    "mask_pixels_differing": int((masks != released["masks"]).sum())}
                print(case, name, mode, json.dumps(diffs), "input", released["input_size"], "scale",
                      released["scale"], "released labels", released["labels"].tolist(),
                      "mask share", float(released["masks"].mean()))
                key = f"{case}/{name}/{mode}"
                s, e = LOW_RES_STRIDE, EMBEDDING_STRIDE
                arrays[f"{key}/low_res"] = np.ascontiguousarray(released["low_res"][:, 0, s // 2::s, s // 2::s])
                for field in ("head", "clip", "scores"):
                    arrays[f"{key}/{field}"] = released[field].astype(np.float32)
                arrays[f"{key}/labels"] = released["labels"].astype(np.int64)
                arrays[f"{key}/masks"] = np.packbits(released["masks"])
                meta["cases"][case].setdefault("diffs", {})[f"{name}/{mode}"] = diffs
            meta["cases"][case]["inputs"][name] = {"size": list(released["input_size"]),
                                                   "scale": list(released["scale"])}
            arrays[f"{case}/{name}/embedding"] = np.ascontiguousarray(
                released["embedding"][0, :, e // 2::e, e // 2::e])
        arrays[f"{case}/prototypes"] = results[("box", names[0])]["prototypes"][:8].astype(np.float32)
        meta["cases"][case]["released_keys"] = {k: len(v) for k, v in results["released_keys"].items()}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(arrays_path, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
