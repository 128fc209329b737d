"""Several cameras served by one node and one model: names, topics and per-camera state.

A node with `cameras: [front, rear]` subscribes to `front/image` and `rear/image` (relative to its namespace),
publishes `front/labels`, `rear/labels`, ... and segments the newest frame of every camera in one batched pass of
the image tower. With no names it is the plain one-camera node (`image`, `labels`, ...).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from .depth_output import DepthPairer, PairedDepth
from .diagnostics import StreamStats

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*$")


class CameraNameError(ValueError):
    pass


CAMERA_NAMES = ("front", "rear", "left", "right")


def default_camera_names(count: int) -> list[str]:
    """[""] (one unnamed camera) for count 1; front, rear, left, right, cam4, ... for a node serving several
    (the demo and the soak benchmark)."""
    if count <= 1:
        return [""]
    return [CAMERA_NAMES[i] if i < len(CAMERA_NAMES) else f"cam{i}" for i in range(count)]


def normalise_camera_name(text: str) -> str:
    """" front/ " -> "front": how a camera name is written in parameters, launch arguments and requests."""
    return text.strip().strip("/")


def parse_camera_names(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """`cameras` parameter -> camera names. Accepts a string array or one comma-separated string (what
    `-p cameras:=front,rear` gives); empty means one camera on the node's own topics."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [name for name in map(normalise_camera_name, items) if name]
    for name in names:
        if not _NAME.match(name):
            raise CameraNameError(f"camera name {name!r} is not a valid relative ROS name (letters, digits, "
                                  f"underscores, '/' between tokens, starting with a letter)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CameraNameError(f"camera names must be unique; repeated: {', '.join(duplicates)}")
    return names or [""]


@dataclass
class Frame:
    msg: object  # sensor_msgs Image or CompressedImage
    received: float = field(default_factory=time.monotonic)


@dataclass
class Camera:
    """One camera's subscription slot, outputs, statistics and prompt cache; the model is shared."""

    name: str  # "" = the node's own topics
    stats: StreamStats = field(default_factory=StreamStats)
    slot: Frame | None = None  # the newest unprocessed frame
    subscription: object = None
    publishers: dict[str, object] = field(default_factory=dict)
    prompter: object = None  # PromptSegmenter over the shared SAM, or None
    depth: DepthPairer | None = None
    headers: dict[tuple[int, int], object] = field(default_factory=dict)  # cached frame stamp -> header
    depth_frames: dict[tuple[int, int], PairedDepth] = field(default_factory=dict)

    def topic(self, base: str) -> str:
        return f"{self.name}/{base}" if self.name else base

    @property
    def log_prefix(self) -> str:
        """What a log line about this camera starts with ("" for the one unnamed camera)."""
        return f"[{self.name}] " if self.name else ""

    def remember(self, key: tuple[int, int], header, paired: PairedDepth | None, size: int) -> None:
        """Keep the header (and depth) of a cached frame for as long as the prompt cache keeps the frame."""
        self.headers[key] = header
        if paired is not None:
            self.depth_frames[key] = paired
        for cache in (self.headers, self.depth_frames):
            while len(cache) > size:
                cache.pop(next(iter(cache)))
