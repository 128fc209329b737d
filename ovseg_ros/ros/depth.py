"""Depth pairing: each colour frame gets the aligned depth frame of its stamp (and the camera's intrinsics).

Colour frames are paired with the depth frame of the same stamp, or the nearest within a tolerance, from a small
bounded buffer. Unpaired frames still get their 2D outputs.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
from sensor_msgs.msg import CameraInfo, Image

from ..core.geometry import DepthError, Intrinsics, PairedDepth, depth_to_metres
from .image_conversions import ImageError, pixel_array


def stamp_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def depth_array(msg: Image) -> np.ndarray:
    dtypes = {"16UC1": np.uint16, "mono16": np.uint16, "32FC1": np.float32}
    if msg.encoding not in dtypes:
        raise DepthError(f"depth encoding '{msg.encoding}' is not supported; use 16UC1 (mm) or 32FC1 (m)")
    if msg.height == 0 or msg.width == 0:
        raise DepthError("depth image is empty")
    try:
        array = pixel_array(msg, dtypes[msg.encoding], 1)
    except ImageError as exc:
        raise DepthError(f"depth image: {exc}") from exc
    return depth_to_metres(array, msg.encoding)


class DepthPairer:
    """Keeps the last N depth frames and the latest CameraInfo; thread-safe."""

    def __init__(self, capacity: int = 10, tolerance_s: float = 0.02) -> None:
        self._depth: collections.deque[Image] = collections.deque(maxlen=capacity)
        self._info: CameraInfo | None = None
        self._lock = threading.Lock()
        self.tolerance_s = tolerance_s
        self.paired = 0
        self.unpaired = 0

    def add_depth(self, msg: Image) -> None:
        with self._lock:
            self._depth.append(msg)

    def add_info(self, msg: CameraInfo) -> None:
        with self._lock:
            self._info = msg

    def pair(self, stamp, image_shape: tuple[int, int]) -> PairedDepth:
        """The depth for a colour frame, or DepthError saying why there is none."""
        with self._lock:
            candidates = list(self._depth)
            info = self._info
        target = stamp_seconds(stamp)
        if not candidates:
            self.unpaired += 1
            raise DepthError("no depth frame received yet")
        best = min(candidates, key=lambda m: abs(stamp_seconds(m.header.stamp) - target))
        offset = stamp_seconds(best.header.stamp) - target
        if abs(offset) > self.tolerance_s:
            self.unpaired += 1
            raise DepthError(f"no depth frame within {self.tolerance_s * 1000:.0f} ms of the colour frame "
                             f"(nearest is {offset * 1000:+.0f} ms)")
        if info is None:
            self.unpaired += 1
            raise DepthError("no camera_info received for the depth camera")
        intrinsics = Intrinsics.from_k(info.k, info.width, info.height)
        depth_m = depth_array(best)
        if depth_m.shape != tuple(image_shape):
            self.unpaired += 1
            raise DepthError(f"depth {depth_m.shape[1]}x{depth_m.shape[0]} is not aligned with the colour image "
                             f"{image_shape[1]}x{image_shape[0]}: publish depth registered to the colour camera")
        if (intrinsics.height, intrinsics.width) != depth_m.shape:
            self.unpaired += 1
            raise DepthError(f"camera_info is {intrinsics.width}x{intrinsics.height} but depth is "
                             f"{depth_m.shape[1]}x{depth_m.shape[0]}")
        self.paired += 1
        return PairedDepth(depth_m, intrinsics, best.header.frame_id, offset)

    def rate(self) -> float:
        total = self.paired + self.unpaired
        return self.paired / total if total else 0.0
