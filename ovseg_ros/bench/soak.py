"""Flood / soak: a camera-rate stream of 640x480 frames into a real node process for a long time, printing the
node's memory, latency and drop counters over time.

    ovseg-bench soak [--minutes 10] [--rate 30] [--clip ovseg-demo-clip] [--cameras 3] [--json soak.json]

With --cameras N one node serves N cameras (front, rear, left, right, cam4, ...), each streaming at --rate; the
counters printed are summed over the cameras (latency: the worst camera's) and the frames processed per camera
are listed.

The tests run the same flood for 60 s and check memory growth and counter consistency.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.cameras import default_camera_names
from ..runtime import Process, node_command, ros_environment


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class FloodReport:
    published: int = 0  # all cameras together
    publish_errors: int = 0
    samples: list[dict] = field(default_factory=list)  # time, rss, diagnostics (per camera under "cameras")
    outputs_received: int = 0
    final: dict = field(default_factory=dict)


def run_flood(proc: Process, clients, seconds: float, rate: float, width: int = 640, height: int = 480,
              sample_every: float = 5.0, printer=None) -> FloodReport:
    """Publish frames at `rate` per camera for `seconds` while sampling the node's RSS and its /diagnostics.

    `clients`: one OvsegClient, or one per camera of a multi-camera node (each publishing to its camera's
    topic). A sample holds the node's counters flat for one camera and per camera under "cameras"."""
    from diagnostic_msgs.msg import DiagnosticArray

    from ..client import stream_frames

    clients = list(clients) if isinstance(clients, (list, tuple)) else [clients]
    monitor = clients[0]
    report = FloodReport()
    monitor.subscribe("/diagnostics", DiagnosticArray, keep=5)

    def diagnostics() -> dict:
        latest = monitor.received["/diagnostics"]
        if not latest:
            return {}
        cameras = {}
        for status in latest[-1].status:
            values = {kv.key: kv.value for kv in status.values}
            cameras[values.get("camera", "")] = values
        return cameras[""] if len(clients) == 1 and "" in cameras else {"cameras": cameras}

    start = time.monotonic()
    with stream_frames(clients, rate, size=(height, width)) as counts:
        while time.monotonic() - start < seconds:
            time.sleep(min(sample_every, max(0.0, seconds - (time.monotonic() - start))))
            sample = {"t_s": round(time.monotonic() - start, 1), "rss_mb": round(rss_mb(proc.popen.pid), 1),
                      "published": counts.published, **diagnostics()}
            report.samples.append(sample)
            if printer:
                printer(sample)
    report.published, report.publish_errors = counts.published, counts.publish_errors
    time.sleep(3.0)  # let the last frame finish and one more diagnostics message arrive
    report.outputs_received = sum(len(client.received["segmentation"]) for client in clients)
    report.final = {"rss_mb": round(rss_mb(proc.popen.pid), 1), **diagnostics()}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--clip", default="ovseg-demo-clip")
    parser.add_argument("--sam", default="")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between printed samples")
    parser.add_argument("--cameras", type=int, default=1, help="N > 1: one node serving N cameras at --rate each")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    os.environ.update(ros_environment(domain_id=random.Random(os.getpid()).randint(30, 200),
                                      log_dir=tempfile.mkdtemp(prefix="ovseg-soak-")))
    from ..client import OvsegClient

    log = Path(tempfile.mkdtemp(prefix="ovseg-soak-")) / "node.log"
    names = default_camera_names(args.cameras)
    params = {"clip_model": args.clip, "sam_model": args.sam}
    if args.cameras > 1:
        params["cameras"] = names
    proc = Process(node_command("ovseg_ros.node", "ovseg", params=params), dict(os.environ), log)
    clients = [OvsegClient("", name=f"ovseg_soak_{i}", keep=50, camera=name) for i, name in enumerate(names)]
    try:
        if not clients[0].wait_ready(120):
            print(proc.output()[-3000:])
            return 1
        print(f"{'t_s':>7} {'rss_mb':>8} {'published':>9} {'received':>8} {'processed':>9} {'dropped':>7} "
              f"{'p50_ms':>7} {'p95_ms':>7} {'out_hz':>6}" + ("  processed per camera" if args.cameras > 1 else ""))

        def show(sample: dict) -> None:
            per_camera = list(sample.get("cameras", {"": sample}).values())

            def total(key: str) -> str:
                values = [float(c[key]) for c in per_camera if key in c]
                return f"{sum(values):g}" if values else "-"

            def worst(key: str) -> str:
                values = [float(c[key]) for c in per_camera if key in c]
                return f"{max(values):g}" if values else "-"

            extra = "  " + " ".join(c.get("frames_processed", "-") for c in per_camera) if args.cameras > 1 else ""
            print(f"{sample['t_s']:>7} {sample['rss_mb']:>8} {sample['published']:>9} "
                  f"{total('frames_received'):>8} {total('frames_processed'):>9} {total('frames_dropped'):>7} "
                  f"{worst('latency_p50_ms'):>7} {worst('latency_p95_ms'):>7} {total('output_rate_hz'):>6}{extra}",
                  flush=True)

        report = run_flood(proc, clients, args.minutes * 60, args.rate, sample_every=args.every, printer=show)
        first = report.samples[0]["rss_mb"] if report.samples else float("nan")
        print(f"RSS {first} -> {report.final['rss_mb']} MB (growth {report.final['rss_mb'] - first:+.1f} MB after "
              f"the first sample); published {report.published}, final counters {report.final}")
        if args.json:
            Path(args.json).write_text(json.dumps(report.__dict__, indent=1))
        return 0
    finally:
        for client in clients:
            client.close()
        proc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
