"""sensor_msgs/Image <-> numpy with strict validation (cv_bridge from PyPI is broken; robots may have it).

Every failure raises ImageError with a message that says what was wrong, so the node can log it and go on.
"""

from __future__ import annotations

import array as pyarray
import struct

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image

MAX_PIXELS = 7680 * 4320  # 8K: larger frames are refused rather than risking memory on a robot

# encoding -> (channels, numpy dtype, cv2 conversion to RGB or None)
_DECODERS: dict[str, tuple[int, np.dtype, int | None]] = {
    "rgb8": (3, np.dtype(np.uint8), None),
    "bgr8": (3, np.dtype(np.uint8), cv2.COLOR_BGR2RGB),
    "rgba8": (4, np.dtype(np.uint8), cv2.COLOR_RGBA2RGB),
    "bgra8": (4, np.dtype(np.uint8), cv2.COLOR_BGRA2RGB),
    "mono8": (1, np.dtype(np.uint8), cv2.COLOR_GRAY2RGB),
    "mono16": (1, np.dtype(np.uint16), cv2.COLOR_GRAY2RGB),
    "yuv422_yuy2": (2, np.dtype(np.uint8), cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": (2, np.dtype(np.uint8), cv2.COLOR_YUV2RGB_YUY2),
    "uyvy": (2, np.dtype(np.uint8), cv2.COLOR_YUV2RGB_UYVY),
    "yuv422": (2, np.dtype(np.uint8), cv2.COLOR_YUV2RGB_UYVY),  # ROS' "yuv422" is UYVY byte order
}
SUPPORTED_ENCODINGS = tuple(_DECODERS)


class ImageError(ValueError):
    """An image message that cannot be used; the message says why."""


def image_to_rgb(msg: Image, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any supported encoding to a contiguous (H, W, 3) uint8 RGB array."""
    encoding = msg.encoding.lower()
    if encoding not in _DECODERS:
        raise ImageError(f"unsupported encoding '{msg.encoding}'; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    channels, dtype, conversion = _DECODERS[encoding]
    height, width = int(msg.height), int(msg.width)
    if height == 0 or width == 0:
        raise ImageError(f"empty image ({width}x{height})")
    if height * width > max_pixels:
        raise ImageError(f"image {width}x{height} exceeds the limit of {max_pixels} pixels")
    if encoding in ("yuv422_yuy2", "yuyv", "uyvy", "yuv422") and width % 2:
        raise ImageError(f"{encoding} needs an even width, got {width}")
    pixels = pixel_array(msg, dtype, channels)
    if dtype == np.uint16:  # mono16: scale the used range to 8 bit (a depth or IR camera's full range is rare)
        peak = int(pixels.max()) or 1
        pixels = (pixels.astype(np.float32) * (255.0 / peak)).astype(np.uint8)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return np.ascontiguousarray(cv2.cvtColor(pixels, conversion))


def compressed_to_rgb(msg: CompressedImage, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    fmt = msg.format.lower()
    if not any(kind in fmt for kind in ("jpeg", "jpg", "png")):
        raise ImageError(f"unsupported compressed format '{msg.format}'; supported: jpeg, png")
    if len(msg.data) == 0:
        raise ImageError("compressed image has no data")
    raw = as_uint8_buffer(msg.data)
    size = encoded_size(raw.tobytes()[:MAX_HEADER_BYTES])
    if size is None:
        raise ImageError(f"no image size in the {msg.format} header ({len(msg.data)} bytes): corrupt or not "
                         "a PNG/JPEG stream")
    if size[0] * size[1] > max_pixels:  # refused before decoding: a small file can declare a huge image
        raise ImageError(f"{msg.format} image declares {size[0]}x{size[1]}, which exceeds the limit of {max_pixels} "
                         "pixels")
    decoded = cv2.imdecode(raw, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ImageError(f"could not decode the {msg.format} data ({len(msg.data)} bytes): corrupt or truncated")
    if decoded.shape[0] * decoded.shape[1] > max_pixels:
        raise ImageError(f"decoded image {decoded.shape[1]}x{decoded.shape[0]} exceeds {max_pixels} pixels")
    return np.ascontiguousarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))


MAX_HEADER_BYTES = 1 << 20  # JPEG metadata (EXIF, ICC) before the frame header rarely exceeds a few tens of KB
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 (not DHT, JPG, DAC)


def encoded_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a PNG or JPEG stream declares in its header, without decoding; None if not found."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_FRAME_MARKERS:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        if length < 2:
            return None
        pos += 2 + length
    return None


def rgb_to_image(array: np.ndarray, header, encoding: str = "rgb8") -> Image:
    """(H, W, 3) uint8 RGB -> rgb8 (or bgr8) Image with the given header."""
    if encoding == "bgr8":
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    return _array_to_image(array, header, encoding)


def mono16_to_image(array: np.ndarray, header) -> Image:
    return _array_to_image(array.astype(np.uint16, copy=False), header, "mono16")


def float_to_image(array: np.ndarray, header) -> Image:
    """(H, W) float -> 32FC1 Image (the depth-image encoding rviz and image_view display)."""
    return _array_to_image(array.astype(np.float32, copy=False), header, "32FC1")


def mono8_to_image(array: np.ndarray, header) -> Image:
    return _array_to_image(array.astype(np.uint8, copy=False), header, "mono8")


def _array_to_image(array: np.ndarray, header, encoding: str) -> Image:
    array = np.ascontiguousarray(array)
    msg = Image()
    msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(not np.little_endian)
    msg.step = int(array.strides[0])
    msg.data = to_byte_array(array)
    return msg


def to_byte_array(array: np.ndarray) -> pyarray.array:
    """uint8[] fields accept array('B') without rclpy's per-element type check (which costs ~0.1 s per MB)."""
    out = pyarray.array("B")
    out.frombytes(np.ascontiguousarray(array).tobytes())
    return out


def as_uint8_buffer(data) -> np.ndarray:
    """A zero-copy uint8 view of a message's data field (array('B'), bytes or list)."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8)


def pixel_array(msg: Image, dtype, channels: int) -> np.ndarray:
    """The message's pixels as (H, W[, C]) of dtype, honouring step padding and byte order; ImageError if the
    step or the data length do not fit."""
    dtype = np.dtype(dtype)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageError(f"step {step} is smaller than width*bytes_per_pixel = {row_bytes} for {msg.encoding}")
    if len(msg.data) != step * height:
        raise ImageError(f"data length {len(msg.data)} does not match step*height = {step}*{height} = "
                         f"{step * height}")
    pixels = as_uint8_buffer(msg.data).reshape(height, step)[:, :row_bytes].copy().view(dtype)
    if dtype.itemsize > 1 and bool(msg.is_bigendian) == np.little_endian:
        pixels = pixels.byteswap()
    return pixels.reshape(height, width, channels) if channels > 1 else pixels.reshape(height, width)


def image_to_array(msg: Image) -> np.ndarray:
    """Raw view of mono8/mono16/rgb8/32FC1 images as numpy (for consumers of our own outputs: labels, masks,
    confidence)."""
    dtypes = {"mono8": (np.uint8, 1), "mono16": (np.uint16, 1), "rgb8": (np.uint8, 3), "bgr8": (np.uint8, 3),
              "32FC1": (np.float32, 1)}
    if msg.encoding not in dtypes:
        raise ImageError(f"image_to_array handles {', '.join(dtypes)}, not {msg.encoding}")
    return pixel_array(msg, *dtypes[msg.encoding])
