"""A seeded random CLIP ViT-B/16 in OpenAI's layout, for exactness fixtures and side-by-side benchmarks.

The real OpenAI weights cannot be fetched on the development machines, so the papers' code and ours are compared on
these instead. One state dict serves both sides: open_clip's `ViT-B-16-quickgelu` keys are OpenAI's, so the
papers' `clip.load(path)` and our `clip_model: ViT-B-16-quickgelu:/path` load the same tensors strictly.

Recipe (all that is needed to rebuild it bit for bit): every tensor, by sorted key, drawn from one
`torch.Generator` seeded with `seed`; LayerNorm weights 1 + 0.1 N(0, 1), biases 0.02 N(0, 1), matrices
N(0, 1 / fan_in), position tables 0.02 N(0, 1), `logit_scale` log(100); the queries and keys of the image tower's
last block multiplied by `peak` (peaked attention, so a difference in any last-block method shows); then every
tensor rounded to float16 and back, as OpenAI's released weights are float16.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

ARCH = "ViT-B-16-quickgelu"
DEFAULT_SEED = 2024
DEFAULT_PEAK = 3.0


def _template_state_dict() -> dict[str, torch.Tensor]:
    import open_clip

    from ..core.clip_builders import _quiet_random_init_warning

    # Only the keys and shapes are used: open_clip's own init must neither warn nor move the caller's RNG.
    with torch.random.fork_rng(), _quiet_random_init_warning(True):
        return open_clip.create_model(ARCH, device="cpu").state_dict()


def _draw(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    name = key.rsplit(".", 1)[-1]
    layer_norm = ".ln_" in key or key.startswith("ln_")
    if key == "logit_scale":
        return torch.full(shape, math.log(100.0))
    if layer_norm and name == "weight":
        return 1.0 + 0.1 * noise
    if name == "bias" or key.endswith("_bias"):
        return 0.02 * noise
    if key.endswith("positional_embedding") or key == "token_embedding.weight":
        return 0.02 * noise
    if key == "visual.class_embedding":
        return noise / math.sqrt(shape[0])
    if key in ("visual.proj", "text_projection"):  # (width, embed): x @ proj
        return noise / math.sqrt(shape[0])
    fan_in = math.prod(shape[1:])  # nn.Linear (out, in) and Conv2d (out, in, kh, kw)
    return noise / math.sqrt(fan_in)


def seeded_state_dict(seed: int = DEFAULT_SEED, peak: float = DEFAULT_PEAK) -> dict[str, torch.Tensor]:
    """The recipe above, as a float32 state dict with open_clip's (= OpenAI's) key names."""
    template = _template_state_dict()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(template):
        out[key] = _draw(key, template[key].shape, generator)
    blocks = sorted({int(k.split(".")[3]) for k in out if k.startswith("visual.transformer.resblocks.")})
    last = f"visual.transformer.resblocks.{blocks[-1]}.attn.in_proj_weight"
    width = out[last].shape[1]
    out[last][: 2 * width] *= peak
    return {key: value.half().float().contiguous() for key, value in out.items()}


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's bytes by sorted key: fixtures record it, so a changed recipe fails loudly."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_seeded_weights(directory: str | Path, seed: int = DEFAULT_SEED, peak: float = DEFAULT_PEAK) -> Path:
    """Write the weights as safetensors (our loader) and .pt (the papers' clip.load) under `directory`;
    returns the safetensors path (the .pt sits beside it). Reuses files already there."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"seeded-{ARCH}-{seed}-{peak:g}.safetensors"
    if not path.exists() or not path.with_suffix(".pt").exists():
        state = seeded_state_dict(seed, peak)
        save_file(state, str(path))
        torch.save(state, path.with_suffix(".pt"))
    return path
