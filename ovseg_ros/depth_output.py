"""Depth pairing and the 3D outputs (semantic PointCloud2, MarkerArray) of the node.

Colour frames are paired with the depth frame of the same stamp, or the nearest within a tolerance, from a small
bounded buffer. Unpaired frames still get their 2D outputs.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np
from geometry_msgs.msg import Point
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from visualization_msgs.msg import Marker, MarkerArray

from .core.geometry import (
    CLOUD_DTYPE,
    DepthError,
    Intrinsics,
    back_project,
    depth_to_metres,
    pack_cloud,
    region_centroid,
)
from .core.overlay import palette
from .image_conversions import ImageError, pixel_array

try:
    from sensor_msgs_py import point_cloud2
except ImportError:  # not on PyPI: the numpy packing below produces the same bytes
    point_cloud2 = None


@dataclass
class PairedDepth:
    depth_m: np.ndarray
    intrinsics: Intrinsics
    frame_id: str
    offset_s: float


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


def cloud_fields() -> list[PointField]:
    kinds = {"<f4": PointField.FLOAT32, "<u2": PointField.UINT16}
    return [PointField(name=name, offset=CLOUD_DTYPE.fields[name][1], datatype=kinds[CLOUD_DTYPE.fields[name][0].str],
                       count=1) for name in CLOUD_DTYPE.names]


def labelled_cloud(header, depth: PairedDepth, rgb: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                   max_range: float, stride: int) -> PointCloud2:
    """x, y, z, rgb, label, score for every valid depth pixel (every `stride`-th), in the depth frame."""
    points, rows, cols = back_project(depth.depth_m, depth.intrinsics, max_range, stride)
    cloud = pack_cloud(points, rgb[rows, cols], labels[rows, cols], confidence[rows, cols])
    if point_cloud2 is not None:  # robots: the ROS library (same layout), if it takes a structured array
        try:
            msg = point_cloud2.create_cloud(header, cloud_fields(), cloud)
            msg.header.frame_id = depth.frame_id or header.frame_id
            return msg
        except Exception:
            pass
    msg = PointCloud2()
    msg.header = header
    msg.header.frame_id = depth.frame_id or header.frame_id
    msg.height, msg.width = 1, len(cloud)
    msg.fields = cloud_fields()
    msg.is_bigendian = False
    msg.point_step = CLOUD_DTYPE.itemsize
    msg.row_step = msg.point_step * len(cloud)
    msg.is_dense = True
    from .image_conversions import to_byte_array

    msg.data = to_byte_array(cloud.view(np.uint8))
    return msg


def class_markers(header, depth: PairedDepth, labels: np.ndarray, class_ids: list[int], names: list[str],
                  num_classes: int, boxes: bool, namespace: str = "ovseg") -> MarkerArray:
    """DELETEALL first (classes that vanished or a changed vocabulary leave nothing behind), then per present
    class a text marker at the 3D median of its largest region and, optionally, its extent as a box."""
    frame_id = depth.frame_id or header.frame_id
    clear = Marker(action=Marker.DELETEALL, ns=namespace)
    clear.header.frame_id = frame_id
    markers = [clear]
    colours = palette(max(num_classes, 1))
    for class_id in class_ids:
        found = region_centroid(labels == class_id, depth.depth_m, depth.intrinsics)
        if found is None:
            continue
        centroid, extent = found
        colour = colours[class_id] / 255.0
        text = Marker(type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, ns=namespace, id=2 * class_id)
        text.header = header
        text.header.frame_id = frame_id
        text.pose.position = Point(x=float(centroid[0]), y=float(centroid[1]), z=float(centroid[2]))
        text.pose.orientation.w = 1.0
        text.scale.z = 0.1
        text.color.r, text.color.g, text.color.b, text.color.a = float(colour[0]), float(colour[1]), \
            float(colour[2]), 1.0
        text.text = names[class_id]
        markers.append(text)
        if boxes:
            box = Marker(type=Marker.CUBE, action=Marker.ADD, ns=namespace, id=2 * class_id + 1)
            box.header = text.header
            box.pose = text.pose
            box.scale.x, box.scale.y, box.scale.z = (max(float(v), 0.01) for v in extent)
            box.color = text.color
            box.color.a = 0.25
            markers.append(box)
    return MarkerArray(markers=markers)
