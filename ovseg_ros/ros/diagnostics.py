"""Counters and latency statistics of the node, published as diagnostic_msgs on /diagnostics."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue


class StreamStats:
    """Thread-safe frame counters, input/output rates over a sliding window, and latency percentiles."""

    def __init__(self, window_s: float = 10.0, max_samples: int = 600) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self.received = self.processed = self.dropped = self.rejected = 0
        self._inputs: collections.deque[float] = collections.deque(maxlen=max_samples)
        self._outputs: collections.deque[float] = collections.deque(maxlen=max_samples)
        self._latency_ms: collections.deque[float] = collections.deque(maxlen=max_samples)
        self.last_error = ""

    def on_received(self, replaced_unprocessed: bool) -> None:
        with self._lock:
            self.received += 1
            self.dropped += int(replaced_unprocessed)
            self._inputs.append(time.monotonic())

    def on_processed(self, received_at: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.processed += 1
            self._outputs.append(now)
            self._latency_ms.append((now - received_at) * 1000)

    def on_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected += 1
            self.last_error = reason

    def _rate(self, stamps: collections.deque, now: float) -> float:
        recent = [t for t in stamps if now - t <= self.window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            latency = list(self._latency_ms)
            return {
                "frames_received": self.received,
                "frames_processed": self.processed,
                "frames_dropped": self.dropped,
                "frames_rejected": self.rejected,
                "input_rate_hz": round(self._rate(self._inputs, now), 2),
                "output_rate_hz": round(self._rate(self._outputs, now), 2),
                "latency_p50_ms": round(float(np.percentile(latency, 50)), 1) if latency else 0.0,
                "latency_p95_ms": round(float(np.percentile(latency, 95)), 1) if latency else 0.0,
            }


def diagnostic_status(name: str, stats: dict, extra: dict[str, str], last_error: str) -> DiagnosticStatus:
    status = DiagnosticStatus()
    status.name = name
    status.hardware_id = extra.get("device", "")
    if stats["frames_received"] and not stats["frames_processed"]:
        status.level, status.message = DiagnosticStatus.WARN, "receiving frames but none processed"
    elif last_error:
        status.level, status.message = DiagnosticStatus.OK, f"running; last refused frame: {last_error[:120]}"
    else:
        status.level, status.message = DiagnosticStatus.OK, "running"
    status.values = [KeyValue(key=k, value=str(v)) for k, v in {**stats, **extra}.items()]
    return status


def camera_statuses(title: str, cameras: list[tuple[str, StreamStats, object]], extra: dict[str, str],
                    last_batch: int) -> list[DiagnosticStatus]:
    """One status per camera (name, statistics, DepthPairer or None) with the node-wide values in `extra`."""
    statuses = []
    for name, stats, depth in cameras:
        values = dict(extra)
        if name:
            values.update(camera=name, batched_cameras=str(len(cameras)), frames_in_last_tower_pass=str(last_batch))
        if depth is not None:
            values.update(depth_paired=str(depth.paired), depth_unpaired=str(depth.unpaired),
                          depth_pairing_rate=f"{depth.rate():.2f}")
        statuses.append(diagnostic_status(f"{title} ({name})" if name else title, stats.snapshot(), values,
                                          stats.last_error))
    return statuses


def diagnostic_array(stamp, statuses: list[DiagnosticStatus]) -> DiagnosticArray:
    msg = DiagnosticArray()
    msg.header.stamp = stamp
    msg.status = statuses
    return msg


class ReasonLog:
    """Says whether to log: a new reason at once, repeats of the same reason on a channel at most every
    `repeat_s` seconds (a camera sending the same bad frame at 30 Hz must not flood the log)."""

    def __init__(self, repeat_s: float = 5.0) -> None:
        self.repeat_s = repeat_s
        self._last: dict[str, tuple[str, float]] = {}  # channel -> (message, when)
        self._lock = threading.Lock()

    def is_new(self, channel: str, message: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last_message, last_time = self._last.get(channel, ("", -1e9))
            if message == last_message and now - last_time < self.repeat_s:
                return False
            self._last[channel] = (message, now)
        return True
