"""Several cameras served by one node and one model: camera names and their topics (no ROS imports, so the
launch file can check names cheaply).

A node with `cameras: [front, rear]` subscribes to `front/image` and `rear/image` (relative to its namespace),
publishes `front/labels`, `rear/labels`, ... and segments the newest frame of every camera in one batched pass of
the image tower. With no names it is the plain one-camera node (`image`, `labels`, ...).
"""

from __future__ import annotations

import re

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


def camera_topic(camera: str, base: str) -> str:
    """`base` under a camera's name ("front/labels"), or `base` itself for the one unnamed camera."""
    return f"{camera}/{base}" if camera else base
