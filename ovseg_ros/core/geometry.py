"""Depth geometry for labelled 3D output: back-projection, semantic point clouds, robust 3D centroids.

ROS-free numpy; the node turns the results into PointCloud2 / MarkerArray messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


class DepthError(ValueError):
    """Depth that cannot be used with this frame; the message says why."""


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_k(cls, k, width: int, height: int) -> Intrinsics:
        fx, fy, cx, cy = float(k[0]), float(k[4]), float(k[2]), float(k[5])
        if not (np.isfinite([fx, fy, cx, cy]).all() and fx > 0 and fy > 0):
            raise DepthError(f"camera_info has an unusable focal length (fx={fx}, fy={fy})")
        if width <= 0 or height <= 0:
            raise DepthError(f"camera_info has an empty image size {width}x{height}")
        return cls(fx, fy, cx, cy, int(width), int(height))


def depth_to_metres(depth: np.ndarray, encoding: str) -> np.ndarray:
    """16UC1 (millimetres) or 32FC1 (metres) -> float32 metres; 0 and NaN stay invalid (NaN)."""
    if encoding in ("16UC1", "mono16"):
        metres = depth.astype(np.float32) / 1000.0
        metres[depth == 0] = np.nan
        return metres
    if encoding == "32FC1":
        metres = depth.astype(np.float32, copy=True)
        metres[~np.isfinite(metres) | (metres <= 0)] = np.nan
        return metres
    raise DepthError(f"depth encoding '{encoding}' is not supported; use 16UC1 (mm) or 32FC1 (m)")


def back_project(depth_m: np.ndarray, intrinsics: Intrinsics, max_range: float = np.inf,
                 stride: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid pixels (every `stride`-th row and column) -> (points (N, 3) in the optical frame, rows, cols)."""
    if depth_m.shape != (intrinsics.height, intrinsics.width):
        raise DepthError(f"depth is {depth_m.shape[1]}x{depth_m.shape[0]} but camera_info says "
                         f"{intrinsics.width}x{intrinsics.height}")
    rows, cols = np.mgrid[0:depth_m.shape[0]:stride, 0:depth_m.shape[1]:stride]
    z = depth_m[rows, cols]
    valid = np.isfinite(z) & (z > 0) & (z <= max_range)
    rows, cols, z = rows[valid], cols[valid], z[valid]
    x = (cols - intrinsics.cx) * z / intrinsics.fx
    y = (rows - intrinsics.cy) * z / intrinsics.fy
    return np.stack([x, y, z], axis=1).astype(np.float32), rows, cols


CLOUD_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4"), ("label", "<u2"),
                        ("score", "<f4")], align=False)


def pack_cloud(points: np.ndarray, colours_rgb: np.ndarray, labels: np.ndarray,
               scores: np.ndarray) -> np.ndarray:
    """Structured array with PointCloud2's usual fields; rgb packed as the float rviz expects."""
    cloud = np.empty(len(points), dtype=CLOUD_DTYPE)
    cloud["x"], cloud["y"], cloud["z"] = points[:, 0], points[:, 1], points[:, 2]
    rgb = (colours_rgb[:, 0].astype(np.uint32) << 16) | (colours_rgb[:, 1].astype(np.uint32) << 8) | \
        colours_rgb[:, 2].astype(np.uint32)
    cloud["rgb"] = rgb.view(np.float32)
    cloud["label"] = labels
    cloud["score"] = scores
    return cloud


def region_centroid(mask: np.ndarray, depth_m: np.ndarray, intrinsics: Intrinsics,
                    largest_component: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """Median 3D point (robust to depth noise and edge bleeding) and 5-95 percentile extent of a mask's valid
    depth; with largest_component, only its largest connected region. None if no valid depth under it."""
    mask = mask.astype(bool)
    if largest_component and mask.any():
        count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if count > 2:
            biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            mask = components == biggest
    rows, cols = np.nonzero(mask)
    z = depth_m[rows, cols]
    valid = np.isfinite(z) & (z > 0)
    if not valid.any():
        return None
    rows, cols, z = rows[valid], cols[valid], z[valid]
    # A mask that bleeds over the object's edge picks up background depth: keep the depth mode's neighbourhood.
    near = np.abs(z - np.median(z)) <= 0.1 * np.median(z)
    rows, cols, z = rows[near], cols[near], z[near]
    points = np.stack([(cols - intrinsics.cx) * z / intrinsics.fx, (rows - intrinsics.cy) * z / intrinsics.fy, z],
                      axis=1)
    centroid = np.median(points, axis=0)
    low, high = np.percentile(points, 5, axis=0), np.percentile(points, 95, axis=0)
    return centroid.astype(np.float64), (high - low).astype(np.float64)


@dataclass
class PairedDepth:
    """The depth image paired with one colour frame: aligned to it pixel for pixel."""

    depth_m: np.ndarray  # (H, W) float32 metres, NaN = invalid
    intrinsics: Intrinsics
    frame_id: str  # the depth camera's frame ("" = the colour frame's)
    offset_s: float  # depth stamp minus colour stamp

    def limited(self, max_range_m: float) -> PairedDepth:
        """A copy whose depth beyond `max_range_m` is invalid (every 3D output of a frame uses the same limit)."""
        depth = self.depth_m.copy()
        with np.errstate(invalid="ignore"):
            depth[depth > max_range_m] = np.nan
        return PairedDepth(depth, self.intrinsics, self.frame_id, self.offset_s)


@dataclass
class Region3D:
    """A class's (or a mask's) place in 3D: robust centroid and extent, in the depth camera's frame."""

    class_id: int
    name: str
    centroid: np.ndarray  # (3,) metres
    extent: np.ndarray  # (3,) metres, 5-95 percentile size


def labelled_cloud_points(depth: PairedDepth, rgb: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                          stride: int = 1) -> np.ndarray:
    """CLOUD_DTYPE points for every valid depth pixel (every `stride`-th in rows and columns)."""
    points, rows, cols = back_project(depth.depth_m, depth.intrinsics, np.inf, stride)
    return pack_cloud(points, rgb[rows, cols], labels[rows, cols], confidence[rows, cols])


def class_regions(depth: PairedDepth, labels: np.ndarray, class_ids: list[int], names: list[str]) -> list[Region3D]:
    """Each present class's largest region located in 3D (classes without valid depth under them are left out)."""
    regions = []
    for class_id in class_ids:
        found = region_centroid(labels == class_id, depth.depth_m, depth.intrinsics)
        if found is not None:
            regions.append(Region3D(class_id, names[class_id], *found))
    return regions
