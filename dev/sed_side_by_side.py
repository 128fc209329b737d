"""Dev-time only: run SED's released code beside ours on the same seeded weights and write the exactness fixtures.

Not part of the package, not run by the tests. It needs a checkout of github.com/xb534/SED (never committed
here) and a folder with the pure-Python packages its code imports that this project does not (timm 0.9.2, einops):

    git -C /work/.mirror/xb534+SED/repo archive HEAD | tar -x -C /tmp/ref/sed
    pip install --no-deps --target /tmp/sedref-site timm==0.9.2 einops
    .venv/bin/python dev/sed_side_by_side.py --sed /tmp/ref/sed --site /tmp/sedref-site

The released side runs in a child process whose ``open_clip`` is SED's vendored copy (2.10.1, with its dense
forward) and whose detectron2 is a set of stand-ins for what SED imports from it: the config node, the
``@configurable`` decorator, the registries and ``build_*`` functions, ``ShapeSpec``, ``ImageList``,
``sem_seg_postprocess`` and the test-time ``ResizeShortestEdge`` (PIL bilinear, detectron2's rounding), written
from detectron2's documented behaviour. None of SED's model code is replaced. Its pretrained-weight download is
skipped (``pretrained=None``): the seeded weights are loaded over the whole model with ``strict=True``. ``.cuda()``
is the identity (SED hard-codes it in its text embedding and fast-inference paths). For the reduced architecture
the vendored open_clip's ``convnext_base_w_320`` config is replaced by ours (a ConvNeXt-atto CLIP), so SED's own
code builds that smaller network from the same config keys.

Fixtures (tests/fixtures/sed/): sed.json (configs, seed recipe and digests, inputs' digests, classes) and sed.npz
(the released model's 192x192 decoder output on a stride-3 grid, its post-processed class probabilities at the
frame's size on a stride-4 grid, and its full label map, per case).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "sed"
SMALL = ("wall", "cat;kitty", "sky", "wooden table", "grass")
# 40 ADE20K classes: enough that fast inference's top-k rejects some with these random weights
LARGE = tuple(line.strip() for line in (ROOT / "config" / "vocabularies" / "names_150.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#"))[:40]
# (case name, architecture, fast inference, top-k, image names, classes); images from sed_fixtures
CASES = [
    ("tiny", "sed-test-tiny", False, 1, ("arc2017", "voc-portrait"), SMALL),
    ("tiny-fast", "sed-test-tiny", True, 1, ("arc2017", "voc-portrait"), LARGE),
    ("b", "sed-convnext-b", False, 1, ("arc2017",), SMALL),
    ("b-fast", "sed-convnext-b", True, 1, ("arc2017",), LARGE),
]
LOGIT_STRIDE, PROB_STRIDE, KEPT_CLASSES = 3, 8, 8
# Pixels where the released model's two best probabilities are closer than this are near-ties: float32 summation
# order (up to about 1e-7 here) may decide them. The fixture marks them; labels must agree everywhere else.
TIE_MARGIN = 1e-6


# ---------------------------------------------------------------------------------------------- released side
def _stand_in_detectron2() -> None:
    """Minimal objects for what SED imports from detectron2 and fvcore (none of them is model code)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch import nn

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        mod.__path__ = []
        sys.modules[name] = mod
        return mod

    class CfgNode(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as exc:
                raise AttributeError(key) from exc

        def __setattr__(self, key, value):
            self[key] = value

    def configurable(init):
        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            if args and isinstance(args[0], CfgNode):
                return init(self, **type(self).from_config(*args, **kwargs))
            return init(self, *args, **kwargs)
        return wrapped

    class Registry(dict):
        def register(self):
            def add(cls):
                self[cls.__name__] = cls
                return cls
            return add

        def get(self, name):
            return self[name]

    class ShapeSpec:
        def __init__(self, channels=None, height=None, width=None, stride=None):
            self.channels, self.height, self.width, self.stride = channels, height, width, stride

    class Backbone(nn.Module):
        pass

    backbones, heads, arches = Registry(), Registry(), Registry()

    def build_backbone(cfg, input_shape=None):
        return backbones.get(cfg.MODEL.BACKBONE.NAME)(cfg, input_shape or ShapeSpec(channels=3))

    def build_sem_seg_head(cfg, input_shape):
        return heads.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(cfg, input_shape)

    class ImageList:
        def __init__(self, tensor, image_sizes):
            self.tensor, self.image_sizes = tensor, image_sizes

        @staticmethod
        def from_tensors(tensors, size_divisibility=0, pad_value=0.0):
            sizes = [tuple(t.shape[-2:]) for t in tensors]
            max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
            if size_divisibility > 1:
                max_h = -(-max_h // size_divisibility) * size_divisibility
                max_w = -(-max_w // size_divisibility) * size_divisibility
            batch = torch.stack([F.pad(t, [0, max_w - t.shape[-1], 0, max_h - t.shape[-2]], value=pad_value)
                                 for t in tensors])
            return ImageList(batch, sizes)

    def sem_seg_postprocess(result, img_size, output_height, output_width):
        result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
        return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]

    class _NoOom:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def resize_shortest_edge(image: np.ndarray, short: int, max_size: int) -> np.ndarray:
        h, w = image.shape[:2]
        scale = short * 1.0 / min(h, w)
        newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
        if max(newh, neww) > max_size:
            scale = max_size * 1.0 / max(newh, neww)
            newh, neww = newh * scale, neww * scale
        neww, newh = int(neww + 0.5), int(newh + 0.5)
        return np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))

    module("detectron2")
    module("detectron2.config", configurable=configurable, CfgNode=CfgNode)
    module("detectron2.data", MetadataCatalog=None, resize_shortest_edge=resize_shortest_edge)
    module("detectron2.modeling", META_ARCH_REGISTRY=arches, BACKBONE_REGISTRY=backbones,
           SEM_SEG_HEADS_REGISTRY=heads, build_backbone=build_backbone, build_sem_seg_head=build_sem_seg_head,
           Backbone=Backbone, ShapeSpec=ShapeSpec)
    module("detectron2.modeling.backbone", Backbone=Backbone)
    module("detectron2.modeling.postprocessing", sem_seg_postprocess=sem_seg_postprocess)
    module("detectron2.structures", ImageList=ImageList)
    module("detectron2.utils")
    module("detectron2.utils.memory", _ignore_torch_cuda_oom=_NoOom)
    module("detectron2.utils.comm", get_local_rank=lambda: 0, synchronize=lambda: None)
    sys.modules["detectron2.utils"].comm = sys.modules["detectron2.utils.comm"]
    module("detectron2.layers", Conv2d=nn.Conv2d, ShapeSpec=ShapeSpec, get_norm=None)
    module("fvcore")
    module("fvcore.nn")
    module("fvcore.nn.weight_init")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # SED hard-codes .cuda(); this machine has no GPU


def _released_config(sed_root: Path, arch_yaml: str, fast: bool, top_k: int, class_json: str,
                     overrides: dict):
    import yaml

    CfgNode = sys.modules["detectron2.config"].CfgNode

    def node(data):
        if isinstance(data, dict):
            return CfgNode({k: node(v) for k, v in data.items()})
        return data

    def merge(into, data):
        for key, value in data.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = node(value)

    cfg = node({"MODEL": {"SEM_SEG_HEAD": {}, "BACKBONE": {}}, "INPUT": {"CROP": {}}, "DATASETS": {},
                "SOLVER": {}, "TEST": {}})
    sys.path.insert(0, str(sed_root))
    spec = importlib.util.spec_from_file_location("sed_config", sed_root / "sed" / "config.py")
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    config_module.add_sed_config(cfg)
    for name in ("config.yaml", arch_yaml):
        data = yaml.safe_load((sed_root / "configs" / name).read_text())
        data.pop("_BASE_", None)
        merge(cfg, data)
    cfg.TEST.FAST_INFERENCE, cfg.TEST.TOPK = fast, top_k
    for key, value in overrides.items():  # the reduced architecture's widths, by the released config keys
        cfg.MODEL.SEM_SEG_HEAD[key] = value
    cfg.MODEL.SEM_SEG_HEAD.TRAIN_CLASS_JSON = cfg.MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON = class_json
    return cfg


def released_worker(job_path: str) -> None:
    """Child process: build SED from its own code, load the seeded weights strictly, run the images."""
    job = pickle.loads(Path(job_path).read_bytes())
    sys.path[:0] = [job["site"], str(Path(job["sed"]) / "open_clip" / "src"), job["sed"]]
    _stand_in_detectron2()
    import numpy as np
    import open_clip
    import torch

    assert "sed/open_clip" in open_clip.__file__, open_clip.__file__
    create = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = lambda name, pretrained=None, **kw: create(name, pretrained=None, **kw)
    if job["clip_config"] is not None:  # the reduced architecture: SED builds 'convnext_base_w_320' by name
        open_clip.factory._MODEL_CONFIGS["convnext_base_w_320"] = job["clip_config"]
    for package in ("sed", "sed.modeling"):  # their __init__ imports the datasets and Swin; not needed here
        mod = types.ModuleType(package)
        mod.__path__ = [str(Path(job["sed"], *package.split(".")))]
        sys.modules[package] = mod
    from sed.modeling.backbone.clip import CLIP  # noqa: F401 - registers the backbone
    from sed.modeling.heads.sed_head import SEDHead  # noqa: F401 - registers the head
    from sed.sed_model import SED

    class_json = Path(tempfile.mkdtemp()) / "classes.json"
    class_json.write_text(json.dumps(job["classes"]))
    cfg = _released_config(Path(job["sed"]), job["yaml"], job["fast"], job["top_k"], str(class_json),
                           job["overrides"])
    torch.manual_seed(0)
    model = SED(cfg)
    weights = torch.load(job["weights"], map_location="cpu")
    missing = set(model.state_dict()) ^ set(weights)
    if missing:
        raise SystemExit(f"key layouts differ: {sorted(missing)[:20]}")
    model.load_state_dict(weights, strict=True)
    model.eval()
    # The text embeddings were computed in __init__ with SED's random CLIP; recompute them with the loaded one.
    predictor = model.sem_seg_head.predictor
    from sed.third_party import imagenet_templates

    embeddings = predictor.class_embeddings(predictor.test_class_texts, imagenet_templates.IMAGENET_TEMPLATES,
                                            predictor.clip_model)
    predictor.text_features_test = embeddings.permute(1, 0, 2).float()
    captured = {}
    model.sem_seg_head.register_forward_hook(lambda mod, args, out: captured.__setitem__("head", out[0].detach()))
    resize = sys.modules["detectron2.data"].resize_shortest_edge
    results = {}
    with torch.no_grad():
        for name, image in job["images"].items():
            resized = resize(image, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            out = model([{"image": tensor, "height": image.shape[0], "width": image.shape[1]}])[0]["sem_seg"]
            results[name] = {"head": captured["head"][0].numpy(), "sem_seg": out.numpy(),
                             "resized": resized.shape[:2],
                             "text": predictor.text_features_test.numpy()}
    Path(job["out"]).write_bytes(pickle.dumps(results))


# ------------------------------------------------------------------------------------------------- our side
def _load_recipe():
    spec = importlib.util.spec_from_file_location("seeded_sed", ROOT / "ovseg_ros" / "bench" / "seeded_sed.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sed", required=True, help="checkout of github.com/xb534/SED")
    parser.add_argument("--site", required=True, help="folder with timm 0.9.2 and einops (pip --target)")
    parser.add_argument("--cases", nargs="*", default=[c[0] for c in CASES])
    parser.add_argument("--out", default=str(FIXTURES))
    parser.add_argument("--released-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.released_worker:
        released_worker(args.released_worker)
        return 0
    import numpy as np
    import torch

    from ovseg_ros.bench.report import git_short_head
    from ovseg_ros.bench.sed_fixtures import exactness_inputs, fixture_arrays
    from ovseg_ros.core.clip_builders import build_clip
    from ovseg_ros.core.modeling.sed import build_sed, get_sed_config

    recipe = _load_recipe()
    images = exactness_inputs()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, arrays_path = out_dir / "sed.json", out_dir / "sed.npz"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"cases": {}}
    arrays = dict(np.load(arrays_path)) if arrays_path.is_file() else {}
    meta.update({"seed": recipe.DEFAULT_SEED, "kept_classes": KEPT_CLASSES, "tie_margin": TIE_MARGIN,
                 "logit_stride": LOGIT_STRIDE, "prob_stride": PROB_STRIDE,
                 "images": {name: hashlib.sha256(image.tobytes()).hexdigest()[:16] for name, image in images.items()},
                 "released": "github.com/xb534/SED " + git_short_head(args.sed, "(archive of db20d93)"),
                 "command": "dev/sed_side_by_side.py --sed SED --site SITE"})
    for case, arch, fast, top_k, names, classes in CASES:
        if case not in args.cases:
            continue
        config = get_sed_config(arch)
        ours = build_sed(config, build_clip)
        weights = recipe.seeded_state_dict(ours.state_dict())
        clip_config, overrides = None, {}
        if arch == "sed-test-tiny":
            overrides = {"HIDDEN_DIMS": config.hidden_dim, "DECODER_DIMS": list(config.decoder_dims),
                         "DECODER_GUIDANCE_DIMS": list(config.decoder_guidance_dims),
                         "DECODER_GUIDANCE_PROJ_DIMS": list(config.decoder_guidance_proj_dims),
                         "NUM_HEADS": config.num_heads, "POOLING_SIZES": list(config.pooling_size),
                         "KERNEL_SIZE": list(config.kernel_sizes)}
            clip_config = json.loads((ROOT / "ovseg_ros" / "model_configs" / f"{config.clip_arch}.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(weights, Path(tmp) / "weights.pt")
            job = {"site": args.site, "sed": args.sed, "weights": str(Path(tmp) / "weights.pt"),
                   "yaml": "convnextL_768.yaml" if "-l" in arch else "convnextB_768.yaml", "fast": fast,
                   "top_k": top_k, "classes": [name.replace(";", ", ") for name in classes],
                   "clip_config": clip_config, "overrides": overrides,
                   "images": {n: images[n] for n in names}, "out": str(Path(tmp) / "out.pkl")}
            (Path(tmp) / "job.pkl").write_bytes(pickle.dumps(job))
            env = {**os.environ, "PYTHONPATH": ""}
            subprocess.run([sys.executable, __file__, "--sed", args.sed, "--site", args.site,
                            "--released-worker", str(Path(tmp) / "job.pkl")], check=True, env=env, cwd=tmp)
            results = pickle.loads((Path(tmp) / "out.pkl").read_bytes())
        rejected = {n: [int(c) for c in np.nonzero(r["sem_seg"].reshape(len(classes), -1).max(axis=1) == 0)[0]]
                    for n, r in results.items()} if fast else {}
        meta["cases"][case] = {"arch": arch, "fast_inference": fast, "top_k": top_k, "images": list(names),
                               "classes": list(classes), "digest": recipe.state_dict_digest(weights),
                               "resized": {n: list(r["resized"]) for n, r in results.items()},
                               "rejected": rejected}
        for name, result in results.items():
            arrays.update(fixture_arrays(case, name, result["head"][:KEPT_CLASSES],
                                         result["sem_seg"][:KEPT_CLASSES], LOGIT_STRIDE, PROB_STRIDE))
            arrays[f"{case}/{name}/labels"] = result["sem_seg"].argmax(axis=0).astype(np.uint8)
            top_two = np.sort(result["sem_seg"], axis=0)[-2:]
            arrays[f"{case}/{name}/ties"] = np.packbits(top_two[1] - top_two[0] < TIE_MARGIN)
            arrays[f"{case}/text"] = result["text"][:, :4].astype(np.float32)  # 4 templates: a spot check
            print(case, name, "head range", float(result["head"].min()), float(result["head"].max()),
                  "resized", result["resized"])
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(arrays_path, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
