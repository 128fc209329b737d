"""Spinning an rclpy executor so that stopping it cannot hang and one failing callback cannot end it.

`executor.spin()` has two failure modes found on this project's machines:
- `executor.shutdown()` called from another thread while `spin()` runs, then `destroy_node()`, hung (the spin
  thread at 100 % CPU, the caller blocked);
- an exception raised by any callback, or an `InvalidHandle` raised while the wait set is built because another
  thread destroyed an entity, ends `spin()` and with it the node.

`SpinLoop` spins with `spin_once(timeout)` and a stop flag the loop itself reads, logs what a turn raises and goes
on, and runs queued work (entity destruction) between turns, where no executor thread holds a wait set.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import rclpy

TURN_S = 0.1  # the longest a stop waits for the loop to notice it


class SpinLoop:
    """Spin `executor` until `stop()` (or the context ends) in the calling thread (`run`) or a thread (`start`)."""

    def __init__(self, executor, on_error: Callable[[str], None] | None = None, context=None) -> None:
        self.executor = executor
        self._on_error = on_error or (lambda message: None)
        self._context = context
        self._stop = threading.Event()
        self._between_turns: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._spinning_thread: int | None = None
        self._last_errors: dict[str, float] = {}

    def run(self) -> None:
        """Spin in this thread until stopped. Never raises for a callback's or a turn's error."""
        self._spinning_thread = threading.get_ident()
        try:
            while not self._stop.is_set() and rclpy.ok(context=self._context):
                self._drain()
                try:
                    self.executor.spin_once(timeout_sec=TURN_S)
                except Exception as exc:  # InvalidHandle, a callback's exception, a context shut down underneath
                    if self._stop.is_set() or not rclpy.ok(context=self._context):
                        break
                    self._report(exc)
        finally:
            self._drain()
            self._spinning_thread = None

    def start(self, name: str = "ovseg-spin") -> None:
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the loop to end and, if it runs in a thread, join it within `timeout`. True if it ended."""
        self._stop.set()
        try:
            self.executor.wake()
        except Exception:  # already shut down
            pass
        if self._thread is None or self._thread is threading.current_thread():
            return True
        self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended:
            self._thread = None
        return ended

    def between_turns(self, work: Callable[[], None]) -> None:
        """Run `work` in the spinning thread before its next wait (now, if called from it or if nothing spins)."""
        if self._spinning_thread is None or self._spinning_thread == threading.get_ident():
            self._call(work)
            return
        self._between_turns.put(work)
        try:
            self.executor.wake()
        except Exception:
            pass

    def _drain(self) -> None:
        while True:
            try:
                work = self._between_turns.get_nowait()
            except queue.Empty:
                return
            self._call(work)

    def _call(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:
            self._report(exc)

    def _report(self, exc: Exception) -> None:
        """Log each kind of error at most once every 10 s (a recurring one must not flood the log)."""
        key = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - self._last_errors.get(key, -1e9) >= 10.0:
            self._last_errors[key] = now
            self._on_error(f"a callback failed, the node goes on: {exc!r}")
