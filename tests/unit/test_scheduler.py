"""The latest-frame scheduler without DDS: newest frame wins, one batch per round, rate limit, errors survive."""

from __future__ import annotations

import threading
import time

from ovseg_ros.ros.scheduler import LatestFrameScheduler
from ovseg_ros.runtime import wait_until


def test_the_newest_frame_of_each_camera_is_taken_and_replaced_ones_count_as_drops():
    batches = []
    scheduler = LatestFrameScheduler(["front", "rear"], batches.append)
    assert scheduler.offer("front", 1) is False
    assert scheduler.offer("front", 2) is True  # replaced before the worker took it: a drop
    assert scheduler.offer("rear", 10) is False
    scheduler.start()
    try:
        assert wait_until(lambda: batches, 5.0)
        assert [(camera, pending.item) for camera, pending in batches[0]] == [("front", 2), ("rear", 10)]
        assert scheduler.offer("front", 3) is False  # the slot was emptied by the take
        assert wait_until(lambda: len(batches) == 2, 5.0)
        assert [(camera, pending.item) for camera, pending in batches[1]] == [("front", 3)]
    finally:
        scheduler.stop()


def test_frames_arriving_while_a_batch_runs_are_coalesced_to_the_newest():
    release = threading.Event()
    seen = []

    def process(batch):
        seen.append([pending.item for _, pending in batch])
        release.wait(5.0)

    scheduler = LatestFrameScheduler([""], process)
    scheduler.start()
    try:
        scheduler.offer("", 0)
        assert wait_until(lambda: seen, 5.0)
        drops = [scheduler.offer("", i) for i in range(1, 6)]  # the worker is busy with frame 0
        assert drops == [False, True, True, True, True]
        release.set()
        assert wait_until(lambda: len(seen) == 2, 5.0)
        assert seen == [[0], [5]]
    finally:
        release.set()
        scheduler.stop()


def test_the_rate_limit_spaces_batches_and_is_read_every_round():
    starts = []
    rate = [20.0]
    scheduler = LatestFrameScheduler([""], lambda batch: starts.append(time.monotonic()), lambda: rate[0])
    scheduler.start()
    try:
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            scheduler.offer("", 0)
            time.sleep(0.005)
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert gaps and min(gaps) >= 0.045  # 20 Hz: never closer than 50 ms (minus timer slack)
        rate[0] = 0.0
        count = len(starts)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            scheduler.offer("", 0)
            time.sleep(0.005)
        assert len(starts) - count > 0.3 / 0.05 + 2  # unlimited now: more batches than 20 Hz would allow
    finally:
        scheduler.stop()


def test_an_exception_in_a_batch_is_reported_and_the_worker_goes_on():
    errors, done = [], []

    def process(batch):
        if batch[0][1].item == "bad":
            raise RuntimeError("boom")
        done.append(batch[0][1].item)

    scheduler = LatestFrameScheduler([""], process, on_error=errors.append)
    scheduler.start()
    try:
        scheduler.offer("", "bad")
        assert wait_until(lambda: errors, 5.0)
        scheduler.offer("", "good")
        assert wait_until(lambda: done == ["good"], 5.0)
        assert str(errors[0]) == "boom"
    finally:
        scheduler.stop()


def test_clear_forgets_pending_frames_and_stop_ends_the_worker():
    batches = []
    scheduler = LatestFrameScheduler(["a"], batches.append)
    scheduler.offer("a", 1)
    scheduler.clear()
    scheduler.start()
    time.sleep(0.2)
    assert batches == []
    scheduler.stop()
    assert not any(t.name == "ovseg-worker" and t.is_alive() for t in threading.enumerate())
