"""CLIP architecture name -> builder (as segment-anything's ``build_sam.py``), open_clip's factory underneath.

Every architecture is open_clip's ``CLIP`` class built by ``open_clip.create_model`` from a JSON config. A few of
the project's demo architectures then replace the ViT's single patchify convolution ``visual.conv1`` by a small
convolutional stem (Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021): a ViT trained
from scratch on a few thousand CPU-minutes does not learn silhouettes from 8x8 patches, small convnets do.
``visual.conv1`` is only ever called as a module mapping (B, 3, H, W) -> (B, width, H/p, W/p) -- in open_clip's
forward and in ``ClipDenseEncoder`` alike -- so the rest of the model and every dense variant are unchanged.

Importing this module has no side effects; ``register_open_clip_configs`` makes the JSONs known when called.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, width, H/8, W/8): stride-2 3x3 conv stages (BatchNorm, ReLU), then a 1x1 projection.

    ``stages`` lists the channels of each stride-2 stage; ``convs_per_stage`` > 1 adds stride-1 3x3 convs after
    each stride-2 one. H and W must be multiples of 2**len(stages) (the dense code already requires multiples of
    the patch size).
    """

    def __init__(self, width: int, stages: tuple[int, ...] = (32, 64, 128), convs_per_stage: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in stages:
            for k in range(convs_per_stage):
                layers += [nn.Conv2d(channels, out, 3, stride=2 if k == 0 else 1, padding=1, bias=False),
                           nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        self.layers = nn.Sequential(*layers)
        self.stride = 2 ** len(stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


# Architectures whose conv1 is a ConvStem: arch -> (stage channels, convs per stage). The stem's total stride is
# the JSON's patch_size, so the token grid, the position table and the dense code are those of a plain ViT.
CONV_STEMS: dict[str, tuple[tuple[int, ...], int]] = {
    "ovseg-demo-convvit": ((32, 64, 128), 1),  # 128 px, stride 8: 16x16 tokens
    "ovseg-demo-convvit-deep": ((32, 64, 128), 2),  # the same with two convs per stage
    "ovseg-demo-convvit-224": ((32, 64, 128, 128), 1),  # 224 px, stride 16: 14x14 tokens, objects kept at full size
}


def register_open_clip_configs() -> None:
    """Make the project's architecture JSONs (model_configs/*.json) known to open_clip's factory."""
    import open_clip

    known = set(open_clip.list_models())
    if any(path.stem not in known for path in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)


def _open_clip(arch: str, weights: Path | None) -> nn.Module:
    import open_clip

    return open_clip.create_model(arch, pretrained=str(weights) if weights else None, device="cpu")


def _conv_stem_clip(arch: str, weights: Path | None) -> nn.Module:
    import open_clip

    with _quiet_random_init_warning(weights is not None):  # weights are loaded below, after the stem swap
        model = open_clip.create_model(arch, device="cpu")
    stages, convs = CONV_STEMS[arch]
    patch = model.visual.patch_size[0]
    stem = ConvStem(model.visual.conv1.out_channels, stages, convs)
    if stem.stride != patch:
        raise ValueError(f"{arch}: conv stem stride {stem.stride} != patch size {patch}")
    model.visual.conv1 = stem
    if weights is not None:
        open_clip.load_checkpoint(model, str(weights), strict=True)
    return model


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip warns "Model initialized randomly" when it loads no weights itself; a log that says so about a
    model whose weights we load next would send a user hunting for a fault that is not there."""
    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def builder_for(arch: str) -> Callable[[str, Path | None], nn.Module]:
    """The function that builds `arch` (optionally loading `weights`): open_clip's factory, or it plus a stem."""
    return _conv_stem_clip if arch in CONV_STEMS else _open_clip


def build_clip(arch: str, weights: Path | None = None) -> nn.Module:
    """open_clip ``CLIP`` for `arch` with `weights` loaded (strictly) when given, random init otherwise."""
    register_open_clip_configs()
    return builder_for(arch)(arch, weights)
