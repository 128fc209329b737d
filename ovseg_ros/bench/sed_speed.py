"""`ovseg-bench sed`: SED's cost per 640x480 frame on this machine, by stage, vocabulary size and precision.

    ovseg-bench sed [--arch sed-convnext-b] [--classes 20 150 847] [--fast-top-k 0 8]
                    [--precisions fp32 bf16] [--runs 3] [--json FILE]

Seeded random weights of the released architecture (the official checkpoint's weights give the same cost, not
the same classes: with random weights fast inference rejects far fewer classes than a trained model, so its
figures here are an upper bound). Stages: the tower (ConvNeXt CLIP at 768 px), the decoder (cost volume,
aggregation, three decoder stages), and the upsampling of the class maps to the frame with the argmax. Also the
parameter count and the GFLOPs of one pass (torch's FLOP counter; multiply-adds count 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from ..core.dense import DenseConfig
from ..core.sed import SedSegmenter, build_sed_encoder
from ..core.templates import IMAGENET80
from ..core.text_cache import TextEmbeddingCache
from ..core.vocabulary import Vocabulary
from .report import write_json
from .sed_fixtures import exactness_inputs
from .seeded_sed import seeded_state_dict


def ade_names(count: int) -> tuple[str, ...]:
    """The first `count` names of the 847-name benchmark vocabulary (config/vocabularies/names_847.txt)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config" / "vocabularies" / "names_847.txt"
    names = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return tuple(names[:count])


def gflops(segmenter: SedSegmenter, image, prepared) -> tuple[float, float]:
    """(tower, decoder) GFLOPs of one pass, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels, _ = segmenter.preprocess_sed(image)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as tower_count:
            dense, guidance, _ = segmenter.network.image_features(pixels)
        text = prepared.template_embeddings
        with FlopCounterMode(display=False) as decoder_count:
            segmenter.network.aggregator(dense, text, guidance, fast_top_k=segmenter.config.fast_top_k,
                                         class_chunk=segmenter.config.class_chunk)
    return tower_count.get_total_flops() / 1e9, decoder_count.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovseg-bench sed", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sed-convnext-b")
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 150, 847])
    parser.add_argument("--fast-top-k", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    encoder = build_sed_encoder(args.arch)
    encoder.network.load_state_dict(seeded_state_dict(encoder.network.state_dict()), strict=True)
    base = SedSegmenter(encoder, TextEmbeddingCache(encoder.encode_text, encoder.model_id), DenseConfig())
    image = exactness_inputs()["arc2017"]  # a real 480x640 photo
    parameters = sum(p.numel() for p in encoder.network.parameters())
    rows = []
    print(f"{args.arch}: {parameters / 1e6:.1f} M parameters; frame {image.shape[0]}x{image.shape[1]}; "
          f"median of {args.runs} runs")
    print(f"{'classes':>7} {'fast_k':>6} {'prec':>5} {'tower_ms':>9} {'decoder_ms':>10} {'upsample_ms':>11} "
          f"{'total_ms':>9} {'kept':>5} {'GFLOPs':>8}")
    for classes in args.classes:
        prepared = base.prepare(Vocabulary(ade_names(classes), IMAGENET80))
        for top_k in args.fast_top_k:
            for precision in args.precisions:
                segmenter = base.with_config(dataclasses.replace(base.config, fast_top_k=top_k,
                                                                 precision=precision))
                segmenter.segment(image, prepared)  # warm-up
                times: dict[str, list[float]] = {"tower": [], "decoder": [], "upsample": [], "total": []}
                kept = 0
                for _ in range(args.runs):
                    start = time.perf_counter()
                    result = segmenter.segment(image, prepared)
                    times["total"].append((time.perf_counter() - start) * 1000)
                    timing = result.timings_ms
                    times["tower"].append(timing["preprocess"] + timing["image_encoder"])
                    times["decoder"].append(timing["decoder"])
                    times["upsample"].append(timing["merge_upsample"] + timing.get("postprocess", 0.0))
                kept = classes
                if top_k:  # the classes fast inference kept to the end (with random weights: an upper bound)
                    with torch.inference_mode():
                        _, dense, guidance, _ = segmenter.tower(image)
                        probs = segmenter.decode(dense, guidance, prepared)
                    kept = int((probs.flatten(1).amax(dim=1) > 0).sum())
                tower_gflops, decoder_gflops = gflops(segmenter, image, prepared) if precision == "fp32" \
                    else (float("nan"), float("nan"))
                row = {"classes": classes, "fast_top_k": top_k, "precision": precision,
                       **{f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()},
                       "kept_classes": kept, "tower_gflops": round(tower_gflops, 1),
                       "decoder_gflops": round(decoder_gflops, 1)}
                rows.append(row)
                total_gflops = tower_gflops + decoder_gflops
                print(f"{classes:>7} {top_k:>6} {precision:>5} {row['tower_ms']:>9} {row['decoder_ms']:>10} "
                      f"{row['upsample_ms']:>11} {row['total_ms']:>9} {kept:>5} {total_gflops:>8.0f}")
    write_json(args.json, {"arch": args.arch, "parameters": parameters, "size": list(image.shape[:2]),
                           "runs": args.runs, "torch_threads": torch.get_num_threads(), "rows": rows})
    return 0
