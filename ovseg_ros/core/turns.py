"""Turns on the model: vocabulary writes go ahead of the next frame.

On a CPU (and on a small GPU) a text-tower pass running beside an image-tower pass slows both, and a write that
waits for a free moment in a 20 Hz stream waits behind many frames. Frames take *routine* turns and writes
*urgent* ones: a routine turn does not start while an urgent one runs, waits, or ended less than `grace_s` ago
(the next of several queued writes is usually dispatched within that), but never waits longer than
`max_wait_s`, so a flood of writes slows frames and cannot stop them. An urgent turn waits only for the routine
turn that is running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class ModelTurns:
    def __init__(self, grace_s: float = 0.05, max_wait_s: float = 2.0) -> None:
        self.grace_s = grace_s
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._urgent = 0  # running or waiting
        self._routine = False
        self._urgent_ended = -1e9

    @contextmanager
    def urgent(self) -> Iterator[None]:
        with self._cond:
            self._urgent += 1
            while self._routine:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._urgent -= 1
                self._urgent_ended = time.monotonic()
                self._cond.notify_all()

    @contextmanager
    def routine(self) -> Iterator[float]:
        """Yields the seconds this turn waited for urgent work."""
        start = time.monotonic()
        deadline = start + self.max_wait_s
        with self._cond:
            while (now := time.monotonic()) < deadline:
                quiet_at = self._urgent_ended + self.grace_s
                if not self._urgent and now >= quiet_at:
                    break
                self._cond.wait(timeout=min(deadline, quiet_at if not self._urgent else deadline) - now)
            self._routine = True
        try:
            yield time.monotonic() - start
        finally:
            with self._cond:
                self._routine = False
                self._cond.notify_all()
