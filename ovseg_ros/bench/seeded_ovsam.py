"""Seeded random weights for an OV-SAM network, as the four files the released model is loaded from.

Each part is a state dict with the released file's key names -- ``clip`` (open_clip's CLIP), ``sam``
(``prompt_encoder.*`` of SAM's checkpoint), ``sam2clip`` (``neck_student.*``) and ``clip2sam`` (``fpn_neck.*``,
``mask_decoder.*``) -- drawn by ``seeded_sed.seeded_state_dict``'s recipe with the seed ``seed + PART_OFFSETS[part]``.
The dev-time script that runs the released code (``dev/ovsam_side_by_side.py``) writes these files and loads them
into both implementations.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .seeded_sed import seeded_state_dict, state_dict_digest

DEFAULT_SEED = 2026
PART_OFFSETS = {"clip": 0, "sam": 1, "sam2clip": 2, "clip2sam": 3}


def part_shapes(network) -> dict[str, dict[str, torch.Size]]:
    """The released files' key -> shape listings for `network`'s layout."""
    def shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Size]:
        return {prefix + k: v.shape for k, v in module.state_dict().items()}

    return {"clip": shapes(network.clip), "sam": shapes(network.pe, "prompt_encoder."),
            "sam2clip": shapes(network.neck, "neck_student."),
            "clip2sam": {**shapes(network.fpn_neck, "fpn_neck."), **shapes(network.mask_decoder, "mask_decoder.")}}


def seeded_parts(network, seed: int = DEFAULT_SEED) -> dict[str, dict[str, torch.Tensor]]:
    return {part: seeded_state_dict(listing, seed + PART_OFFSETS[part])
            for part, listing in part_shapes(network).items()}


def load_seeded(network, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    from ..core.modeling.ovsam import load_ovsam_parts

    load_ovsam_parts(network, parts)


def write_seeded_parts(network, folder: str | Path, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Write the seeded parts as .pth files (the released code reads them by prefix); returns part -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, state in seeded_parts(network, seed).items():
        paths[part] = folder / f"{part}.pth"
        torch.save(state, paths[part])
    return paths


def parts_digest(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    return {part: state_dict_digest(state) for part, state in parts.items()}
