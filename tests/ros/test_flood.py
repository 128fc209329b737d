"""A 30 Hz 640x480 flood for 60 s into a real node: bounded memory, no crash, consistent drop counters."""

from __future__ import annotations

import pytest
from node_processes import start_node

from ovseg_ros.bench.soak import run_flood

pytestmark = pytest.mark.slow  # minute-long multi-process runs; -m "not slow" skips them

MAX_LATE_GROWTH_MB = 40


def late_growth(report, seconds: float) -> float:
    """How far RSS rose in the second half of the flood above the highest it reached in the first half (after
    5 s of warm-up). glibc's arenas and torch's caches step up by tens of MB at unpredictable moments and then
    stay (a 3-minute soak here plateaus by 45 s), so a first-to-last difference flags those steps; a leak keeps
    climbing through the second half."""
    first = [s["rss_mb"] for s in report.samples if 5 <= s["t_s"] <= seconds / 2]
    second = [s["rss_mb"] for s in report.samples if s["t_s"] > seconds / 2] + [report.final["rss_mb"]]
    return max(second) - max(first)


def rss_curve(report) -> list[tuple[float, float]]:
    return [(s["t_s"], s["rss_mb"]) for s in report.samples] + [("final", report.final["rss_mb"])]


def test_flood_for_a_minute(tmp_path, make_client):
    proc = start_node(tmp_path, name="ovseg_flood", namespace="flood")
    client = make_client("/flood", keep=20)
    try:
        assert client.wait_ready(60), proc.output()
        report = run_flood(proc, client, seconds=60, rate=30, sample_every=5)
        assert proc.alive(), proc.output()[-3000:]
        print("flood samples:", report.samples, "final:", report.final)
        growth = late_growth(report, 60)
        assert growth < MAX_LATE_GROWTH_MB, f"RSS grew {growth:.1f} MB: {rss_curve(report)}"
        final = report.final
        received, processed = int(final["frames_received"]), int(final["frames_processed"])
        dropped, rejected = int(final["frames_dropped"]), int(final["frames_rejected"])
        assert report.published >= 30 * 60 * 0.9, report.published  # the flood really ran at ~30 Hz
        assert 0 < received <= report.published
        assert rejected == 0
        # Every received frame is processed, dropped (replaced while the worker was busy) or still pending.
        assert received - 1 <= processed + dropped <= received
        assert processed > 0 and dropped > 0
        assert report.outputs_received <= processed
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


def test_three_cameras_flooding_one_node_are_served_fairly(tmp_path, make_client):
    """Three 640x480 cameras at 15 Hz each into one node for 30 s: bounded memory, consistent counters per
    camera, and no camera starved by the others (each batch takes the newest frame of every camera)."""
    cameras = ["front", "left", "rear"]
    proc = start_node(tmp_path, name="ovseg_flood3", namespace="flood3", params={"cameras": cameras})
    clients = [make_client("/flood3", keep=20, camera=name) for name in cameras]
    try:
        assert clients[0].wait_ready(60), proc.output()
        report = run_flood(proc, clients, seconds=30, rate=15, sample_every=5)
        assert proc.alive(), proc.output()[-3000:]
        print("flood samples:", report.samples, "final:", report.final)
        growth = late_growth(report, 30)
        assert growth < MAX_LATE_GROWTH_MB, f"RSS grew {growth:.1f} MB: {rss_curve(report)}"
        assert report.published >= 3 * 15 * 30 * 0.9, report.published
        per_camera = report.final["cameras"]
        assert set(per_camera) == set(cameras)
        processed = {}
        for name, counters in per_camera.items():
            received, done = int(counters["frames_received"]), int(counters["frames_processed"])
            dropped, rejected = int(counters["frames_dropped"]), int(counters["frames_rejected"])
            assert rejected == 0 and 0 < received <= 15 * 30 * 1.1
            assert received - 1 <= done + dropped <= received, (name, counters)
            processed[name] = done
        assert min(processed.values()) >= 0.8 * max(processed.values()), processed  # fair share
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]
