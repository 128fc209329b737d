"""Seeded random weights for an SED network, for exactness fixtures against the released code.

Recipe (all that is needed to rebuild them bit for bit from a key -> shape listing): every tensor of the state
dict, by sorted key, drawn from one `torch.Generator` seeded with `seed`. Vectors named ``weight`` (the norms'
scales) 1 + 0.1 N(0, 1); ``gamma`` (layer scales) 0.5 + 0.1 N(0, 1); other vectors (biases) 0.02 N(0, 1);
``positional_embedding`` and ``token_embedding.weight`` 0.02 N(0, 1); ``text_projection`` N(0, 1 / rows);
``logit_scale`` log(100); BatchNorm's ``running_var`` 1 + 0.1 |N(0, 1)| and ``num_batches_tracked`` 0 (no draw);
every other tensor N(0, 1 / prod(shape[1:])). The decoder's logits then stay within
a few units: a sigmoid and an argmax are well conditioned.

Only torch is imported here: the dev-time script that runs SED's released code loads this file by path in a
process whose ``open_clip`` is SED's vendored copy.
"""

from __future__ import annotations

import hashlib
import math

import torch

DEFAULT_SEED = 2025


def _draw(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    if name == "num_batches_tracked":  # BatchNorm's counter: no draw
        return torch.zeros(shape, dtype=torch.long)
    noise = torch.randn(shape, generator=generator)
    if name == "running_var":  # BatchNorm statistics (OV-SAM's ResNet; SED has none)
        return 1.0 + 0.1 * noise.abs()
    if name == "logit_scale":
        return torch.full(shape, math.log(100.0))
    if key.endswith("positional_embedding") or key.endswith("token_embedding.weight"):
        return 0.02 * noise
    if key.endswith("text_projection"):
        return noise / math.sqrt(shape[0])
    if len(shape) <= 1:
        if name == "weight":
            return 1.0 + 0.1 * noise
        if name == "gamma":
            return 0.5 + 0.1 * noise
        return 0.02 * noise
    return noise / math.sqrt(math.prod(shape[1:]))


def seeded_state_dict(shapes: dict[str, torch.Size], seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """The recipe above for a key -> shape listing (a model's state dict, or its shapes)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key].shape if isinstance(shapes[key], torch.Tensor) else torch.Size(shapes[key])
        out[key] = _draw(key, shape, generator)
    return out


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's bytes by sorted key: fixtures record it, so a changed recipe fails loudly."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
