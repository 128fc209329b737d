"""`ovseg-bench ovsam`: Open-Vocabulary SAM's cost on a 640x480 frame on this machine, beside the training-free
prompt path's size.

    ovseg-bench ovsam [--arch ovsam-rn50x16-coco] [--precisions fp32 bf16] [--prompts 10] [--runs 2]
                      [--classes 20] [--json FILE]

Seeded random weights of the released layout (the official files cost the same). Figures:

A precision this CPU cannot run natively (bf16 without AVX-512 BF16 or AMX) is skipped with the reason, as the
node falls back to fp32 for it.

- the image pass (resize + pad to 1024, RN50x16 stages, SAM2CLIP neck, FPN), once per prompted frame;
- per prompt, for `--prompts` box prompts and as many point prompts answered in one call: SAM's prompt encoder,
  the CLIP2SAM decoder, both RoI classifiers and the ensemble (``decode``), and the masks brought to the frame;
- parameters and GFLOPs (torch's FLOP counter on the meta device; a multiply-add counts 2) of OV-SAM's image
  pass (parameters: everything but the text tower, which runs once per vocabulary) and of the training-free
  path's: SAM's image encoder (ViT-B as the robot config, ViT-H as OV-SAM's teacher), whose masks are labelled
  from the dense CLIP pass the frame already paid for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ..core.dense import precision_autocast
from ..core.ovsam import OvSamTower, build_ovsam_model
from ..core.pipeline import usable_precision
from .report import write_json
from .sed_fixtures import exactness_inputs
from .sed_speed import ade_names


def meta_gflops(build, shape: tuple[int, ...], counted=None) -> tuple[float, float]:
    """(parameters in millions, GFLOPs of one forward) of the module `build()` makes, without weights or compute;
    `counted(module)` picks the parameters to count (default: all)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build().eval()
        pixels = torch.empty(shape)
    parameters = sum(p.numel() for p in (counted(module) if counted else module.parameters())) / 1e6
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(pixels)
    return parameters, counter.get_total_flops() / 1e9


def sizes(arch: str) -> dict[str, dict[str, float]]:
    """Parameters and GFLOPs of OV-SAM's image pass and of SAM's image encoders."""
    import open_clip
    from segment_anything import sam_model_registry

    from ..core.modeling.ovsam import OvSamNetwork, get_ovsam_config

    cfg = get_ovsam_config(arch)

    class Pass(torch.nn.Module):  # OvSamTower's forward without the model around it
        def __init__(self) -> None:
            super().__init__()
            self.network = OvSamNetwork(cfg, open_clip.create_model(cfg.clip_arch, device="meta"))

        def forward(self, pixels):
            stages = self.network.backbone_stages(pixels)
            return self.network.neck(stages), *self.network.fpn_neck(stages)

    side = cfg.image_size
    out = {}
    def inference_parameters(module: Pass):  # what runs per frame and per prompt: not the text tower
        network = module.network
        text = {id(p) for p in network.clip.parameters()} - {id(p) for p in network.clip.visual.parameters()}
        return [p for p in network.parameters() if id(p) not in text]

    params, flops = meta_gflops(Pass, (1, 3, side, side), inference_parameters)
    out["ovsam_image_pass"] = {"parameters_m": round(params, 1), "gflops": round(flops, 1)}
    for name in ("vit_b", "vit_h"):
        params, flops = meta_gflops(lambda n=name: sam_model_registry[n]().image_encoder, (1, 3, 1024, 1024))
        out[f"sam_{name}_image_encoder"] = {"parameters_m": round(params, 1), "gflops": round(flops, 1)}
    return out


def prompts_for(height: int, width: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` boxes and `count` points spread over the frame (frame pixels)."""
    rng = np.random.default_rng(0)
    centres = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height], (count, 2))
    half = rng.uniform([0.05 * width, 0.05 * height], [0.15 * width, 0.15 * height], (count, 2))
    boxes = np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)
    return torch.from_numpy(boxes), torch.from_numpy(centres.astype(np.float32))[:, None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovseg-bench ovsam", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ovsam-rn50x16-coco")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    image = exactness_inputs()["arc2017"]  # a real 480x640 photo
    height, width = image.shape[:2]
    labels = ade_names(args.classes)
    size_rows = sizes(args.arch)
    rows = []
    print(f"{args.arch}: frame {height}x{width}, {args.prompts} box + {args.prompts} point prompts, "
          f"{args.classes} classes; median of {args.runs} runs; {torch.get_num_threads()} threads")
    print(f"{'prec':>5} {'image_pass_ms':>13} {'box_ms/prompt':>13} {'point_ms/prompt':>15} {'text_ms':>8}")
    skipped = {}
    for precision in args.precisions:
        usable, reason = usable_precision(precision, torch.device("cpu"))
        if usable != precision:  # what the node would do: bf16 without bf16 units runs emulated, slower
            skipped[precision] = reason
            print(f"{precision:>5} skipped: {reason}")
            continue
        model = build_ovsam_model(args.arch, precision=precision)
        start = time.perf_counter()
        model.class_embeddings(labels)  # once per vocabulary, cached
        text_ms = (time.perf_counter() - start) * 1000
        features = model.image_features(image)  # warm-up
        image_ms = []
        for _ in range(args.runs):
            start = time.perf_counter()
            features = model.image_features(image)
            image_ms.append((time.perf_counter() - start) * 1000)
        boxes, points = prompts_for(height, width, args.prompts)
        sx, sy = features.scale
        per_prompt = {}
        for kind in ("box", "point"):
            times = []
            for _ in range(args.runs + 1):
                start = time.perf_counter()
                with precision_autocast("cpu", precision):
                    if kind == "box":
                        prediction = model.predict(features, labels, boxes=boxes * torch.tensor([sx, sy, sx, sy]))
                    else:
                        prediction = model.predict(features, labels, points * torch.tensor([sx, sy]),
                                                   torch.ones(args.prompts, 1, dtype=torch.long))
                model.frame_masks(prediction.low_res_masks.float(), features, (height, width))
                times.append((time.perf_counter() - start) * 1000 / args.prompts)
            per_prompt[kind] = statistics.median(times[1:])
        row = {"precision": precision, "image_pass_ms": round(statistics.median(image_ms), 1),
               "box_ms_per_prompt": round(per_prompt["box"], 2), "point_ms_per_prompt": round(per_prompt["point"], 2),
               "text_ms": round(text_ms, 1)}
        rows.append(row)
        print(f"{precision:>5} {row['image_pass_ms']:>13} {row['box_ms_per_prompt']:>13} "
              f"{row['point_ms_per_prompt']:>15} {row['text_ms']:>8}")
        del model, features
    print("image pass sizes (1024 x 1024 input):")
    for name, figures in size_rows.items():
        print(f"  {name:<26} {figures['parameters_m']:>7.1f} M parameters {figures['gflops']:>8.1f} GFLOPs")
    write_json(args.json, {"arch": args.arch, "size": [height, width], "prompts": args.prompts,
                           "classes": args.classes, "runs": args.runs, "torch_threads": torch.get_num_threads(),
                           "rows": rows, "skipped": skipped, "sizes": size_rows,
                           "tower_outputs": list(OvSamTower.output_names)})
    return 0
