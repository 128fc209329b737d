"""Bounds that keep a long-running node healthy: the text-embedding cache, the version counter, image headers."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import torch

from ovseg_ros.core.text_cache import TextEmbeddingCache
from ovseg_ros.core.vocabulary import MAX_VERSION, make_vocabulary, next_version
from ovseg_ros.ros.image_conversions import encoded_size


def test_the_text_cache_keeps_the_most_recently_used_names_only():
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return torch.nn.functional.normalize(torch.randn(len(prompts), 8), dim=-1)

    cache = TextEmbeddingCache(encode, "test", max_entries=5)
    first = cache.embed(("a", "b", "c"), ("{}",))
    cache.embed(("d", "e", "f", "g"), ("{}",))
    assert len(cache) == 5  # a and b dropped (least recently used); c still there
    assert cache.computed == 7
    again = cache.embed(("c",), ("{}",))
    assert cache.computed == 7 and torch.equal(again[0], first[2])  # served from memory
    cache.embed(("a",), ("{}",))
    assert cache.computed == 8 and len(cache) == 5


def test_the_vocabulary_version_wraps_to_one_never_zero():
    assert next_version(1) == 2 and next_version(MAX_VERSION - 1) == MAX_VERSION and next_version(MAX_VERSION) == 1
    last = make_vocabulary(["grass"], None)
    last = type(last)(labels=last.labels, templates=last.templates, version=MAX_VERSION)
    assert make_vocabulary(["sky"], None, previous=last).version == 1


def test_image_headers_give_the_declared_size_without_decoding():
    image = np.zeros((37, 53, 3), np.uint8)
    assert encoded_size(cv2.imencode(".png", image)[1].tobytes()) == (53, 37)
    assert encoded_size(cv2.imencode(".jpg", image)[1].tobytes()) == (53, 37)
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert encoded_size(progressive) == (53, 37)
    jpeg = bytearray(cv2.imencode(".jpg", image)[1].tobytes())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 50000)
    assert encoded_size(bytes(jpeg)) == (50000, 60000)
    for junk in (b"", b"\xff\xd8", b"GIF89a....", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", b"\xff\xd8\xff\xe0\x00\x01"):
        assert encoded_size(junk) is None
