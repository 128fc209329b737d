"""A 30 Hz 640x480 flood for 60 s into a real node: bounded memory, no crash, consistent drop counters."""

from __future__ import annotations

from conftest import start_node

from ovseg_ros.bench.soak import run_flood


def test_flood_for_a_minute(tmp_path, make_client):
    proc = start_node(tmp_path, name="ovseg_flood", namespace="flood")
    client = make_client("/flood", keep=20)
    try:
        assert client.wait_ready(60), proc.output()
        report = run_flood(proc, client, seconds=60, rate=30, sample_every=5)
        assert proc.alive(), proc.output()[-3000:]
        print("flood samples:", report.samples, "final:", report.final)
        baseline = report.samples[1]["rss_mb"]  # after 10 s: allocator pools and caches are warm
        growth = report.final["rss_mb"] - baseline
        assert growth < 50, f"RSS grew {growth:.1f} MB: {report.samples}"
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
