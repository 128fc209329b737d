"""Latest-frame scheduling: callbacks only store each camera's newest frame; one worker takes the newest frame of
every camera and hands them to `process` as one batch. A frame replaced before the worker reaches it is dropped
(as semantic_inference and yolo_ros do): a robot wants the newest labels, never a growing backlog.

No ROS imports: tested without DDS (tests/unit/test_scheduler.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass
class Pending(Generic[Item]):
    item: Item
    received: float = field(default_factory=time.monotonic)  # when the callback stored it (latency statistics)


class LatestFrameScheduler(Generic[Item]):
    """One slot per camera and one worker thread calling `process([(camera, Pending), ...])`.

    `max_rate_hz()` is read before each batch (0 = as fast as possible), so a parameter change applies at once.
    Exceptions escaping `process` are passed to `on_error` and the worker goes on.
    """

    def __init__(self, cameras: list[str], process: Callable[[list[tuple[str, Pending[Item]]]], None],
                 max_rate_hz: Callable[[], float] = lambda: 0.0,
                 on_error: Callable[[Exception], None] = lambda exc: None) -> None:
        self.cameras = list(cameras)
        self._process = process
        self._max_rate_hz = max_rate_hz
        self._on_error = on_error
        self._slots: dict[str, Pending[Item] | None] = dict.fromkeys(self.cameras)
        self._cond = threading.Condition()
        self._running = False
        self._worker: threading.Thread | None = None
        self._last_started = 0.0

    def offer(self, camera: str, item: Item) -> bool:
        """Store `camera`'s newest frame; True if it replaced one the worker had not taken (a drop)."""
        with self._cond:
            replaced = self._slots[camera] is not None
            self._slots[camera] = Pending(item)
            self._cond.notify()
        return replaced

    def clear(self) -> None:
        """Forget frames not yet taken (deactivation: nothing stale is processed after re-activation)."""
        with self._cond:
            self._slots = dict.fromkeys(self.cameras)

    def start(self) -> None:
        with self._cond:
            if self._worker is not None:
                return
            self._running = True
        self._worker = threading.Thread(target=self._loop, name="ovseg-worker", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker after the batch it is running (if any)."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=timeout)
            self._worker = None

    def take(self, timeout: float | None = None) -> list[tuple[str, Pending[Item]]]:
        """Wait for at least one frame (or stop) and take the newest of every camera; [] if stopped/timed out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._running and all(slot is None for slot in self._slots.values()):
                remaining = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if remaining <= 0:
                    return []
                self._cond.wait(timeout=remaining)
            batch = [(camera, slot) for camera, slot in self._slots.items() if slot is not None]
            self._slots = dict.fromkeys(self.cameras)
        return batch

    def _pace(self) -> None:
        """Wait out the rate limit BEFORE taking frames, so the batch is the newest when it starts (and a stop
        ends the wait at once)."""
        rate = self._max_rate_hz()
        if rate <= 0:
            return
        due = self._last_started + 1.0 / rate
        with self._cond:
            while self._running and (remaining := due - time.monotonic()) > 0:
                self._cond.wait(timeout=remaining)

    def _loop(self) -> None:
        while self._running:
            self._pace()
            batch = self.take()
            if not batch or not self._running:
                continue
            self._last_started = time.monotonic()
            try:
                self._process(batch)
            except Exception as exc:  # the stream goes on whatever one batch does
                self._on_error(exc)
