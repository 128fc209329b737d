"""Model turns: a vocabulary write goes ahead of the next frame, waits only for the frame that runs, and a
flood of writes delays frames by a bounded time (threads, no ROS)."""

from __future__ import annotations

import threading
import time

from ovseg_ros.core.turns import ModelTurns


def test_a_write_waits_only_for_the_running_frame_and_goes_before_the_next():
    turns = ModelTurns(grace_s=0.05, max_wait_s=5.0)
    order: list[str] = []
    frame_running = threading.Event()

    def frame(name: str, hold: float) -> None:
        with turns.routine():
            order.append(name)
            frame_running.set()
            time.sleep(hold)

    def write() -> None:
        with turns.urgent():
            order.append("write")
            time.sleep(0.05)

    first = threading.Thread(target=frame, args=("frame 1", 0.2))
    first.start()
    assert frame_running.wait(2)
    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.05)  # the write now waits for frame 1; frame 2 arrives behind it
    second = threading.Thread(target=frame, args=("frame 2", 0.0))
    second.start()
    for thread in (first, writer, second):
        thread.join(5)
    assert order == ["frame 1", "write", "frame 2"]


def test_writes_queued_back_to_back_all_go_before_the_next_frame():
    turns = ModelTurns(grace_s=0.1, max_wait_s=5.0)
    order: list[str] = []
    lock = threading.Lock()  # the node's writes are serialised (one callback group)

    def writes() -> None:
        for i in range(5):
            with lock, turns.urgent():
                order.append(f"write {i}")
            time.sleep(0.01)  # the gap while the executor dispatches the next request

    writer = threading.Thread(target=writes)
    writer.start()
    time.sleep(0.005)
    with turns.routine():
        order.append("frame")
    writer.join(5)
    assert order[-1] == "frame", order


def test_a_flood_of_writes_cannot_stop_frames():
    turns = ModelTurns(grace_s=0.05, max_wait_s=0.3)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            with turns.urgent():
                time.sleep(0.01)

    writer = threading.Thread(target=flood)
    writer.start()
    try:
        time.sleep(0.05)
        start = time.monotonic()
        with turns.routine() as waited:
            pass
        assert time.monotonic() - start < 2.0 and waited >= 0.25
    finally:
        stop.set()
        writer.join(5)
