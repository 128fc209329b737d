"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic Segmentation from Image
Labels", CVPR 2020, Sec. 3.3), the post-processing NACLIP's published numbers use.

Each pixel's class scores are replaced, several times, by an average of its neighbours' scores weighted by how
alike the pixels look. The neighbours are the 8 pixels at each dilation (NACLIP: 8 and 16; borders replicate).
The affinity to neighbour j of pixel i is softmax_j(mean over colour channels of -|I_i - I_j| / (0.1 sigma_i)),
with sigma_i the standard deviation of the channel over the 3x3 neighbourhoods of i at every dilation (centre
included). The weights are computed once per image; the refinement is linear in the scores, so it runs a chunk
of classes at a time and never holds more than (chunk, H, W) scores plus one (8 x dilations, H, W) weight map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_DILATIONS = (8, 16)
CLASS_BLOCK = 16  # classes refined together
ROW_BAND = 64  # output rows per pass over the 16 neighbours


def _offsets(dilations: tuple[int, ...], centre: bool) -> list[tuple[int, int]]:
    steps = (-1, 0, 1)
    return [(dy * d, dx * d) for d in dilations for dy in steps for dx in steps if centre or (dy, dx) != (0, 0)]


def _shifted(padded: torch.Tensor, pad: int, offset: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The value at (y + dy, x + dx) for every (y, x), borders replicated; padded is (..., H + 2 pad, W + 2 pad)."""
    dy, dx = offset
    return padded[..., pad + dy:pad + dy + size[0], pad + dx:pad + dx + size[1]]


class PamrAffinity:
    """The per-pixel neighbour weights of one image; `refine` applies them to any number of score maps."""

    def __init__(self, image: torch.Tensor, dilations: tuple[int, ...] = DEFAULT_DILATIONS) -> None:
        """image: (K, H, W) float (any per-channel scale: the affinity divides it out)."""
        if not dilations or min(dilations) < 1:
            raise ValueError(f"PAMR dilations must be positive integers, got {dilations}")
        self.dilations = tuple(int(d) for d in dilations)
        self.size = (int(image.shape[-2]), int(image.shape[-1]))
        self.pad = max(self.dilations)
        image = image.float()
        padded = F.pad(image[None], [self.pad] * 4, mode="replicate")[0]
        window = _offsets(self.dilations, True)  # 9 samples per dilation, the centre once per dilation
        mean = sum(_shifted(padded, self.pad, o, self.size) for o in window) / len(window)
        variance = sum((_shifted(padded, self.pad, o, self.size) - mean).square() for o in window)
        inverse = 1.0 / (1e-8 + 0.1 * (variance / (len(window) - 1)).sqrt())  # (K, H, W), unbiased sigma
        self.offsets = _offsets(self.dilations, False)
        logits = torch.stack([-((image - _shifted(padded, self.pad, o, self.size)).abs() * inverse).mean(dim=0)
                              for o in self.offsets])  # (P, H, W)
        self.weights = torch.softmax(logits, dim=0)

    def refine(self, scores: torch.Tensor, steps: int) -> torch.Tensor:
        """(C, H, W) scores -> the same after `steps` rounds of affinity-weighted neighbour averaging.

        Runs CLASS_BLOCK classes and ROW_BAND output rows at a time, so the 16 shifted reads of a step hit the
        cache: 2x faster than whole-image passes on a 640x480 frame (measured on the development machine)."""
        if tuple(scores.shape[-2:]) != self.size:
            raise ValueError(f"scores of size {tuple(scores.shape[-2:])} for an image of size {self.size}")
        weights = self.weights.to(scores.dtype)
        refined = torch.empty_like(scores)
        for start in range(0, scores.shape[0], CLASS_BLOCK):
            block = scores[start:start + CLASS_BLOCK]
            for _ in range(steps):
                block = self._step(block, weights)
            refined[start:start + CLASS_BLOCK] = block
        return refined

    def _step(self, scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        height, width = self.size
        pad = self.pad
        padded = F.pad(scores[None], [pad] * 4, mode="replicate")[0]
        out = torch.empty_like(scores)
        for top in range(0, height, ROW_BAND):
            bottom = min(height, top + ROW_BAND)
            band = out[:, top:bottom]
            for index, (dy, dx) in enumerate(self.offsets):
                source = padded[:, pad + dy + top:pad + dy + bottom, pad + dx:pad + dx + width]
                if index == 0:
                    torch.mul(source, weights[0, top:bottom], out=band)
                else:
                    band.addcmul_(source, weights[index, top:bottom])
        return out
