"""Services under load: how long callers wait for `get_vocabulary` and `set_vocabulary` while a camera streams
into a real node process.

    ovseg-bench services [--preset demo] [--rate 20] [--callers 50] [--json services.json]

Four figures, each the time from the call to its answer, measured in the caller's process:
- one read at a time, `--reads` in a row (p50, p95, max);
- `--callers` readers calling at the same moment (the time until the last is answered);
- `--callers` writers calling at the same moment, each with its own vocabulary (the last answer, and the median);
- single reads made while that write burst is being worked through (a read must not queue behind writes).

Targets (issue 22): a read is answered within 100 ms at any load; the writes' last answer within a few frames'
time per write.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ..runtime import Process, node_command, ros_environment, wait_until
from .report import write_json


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed_burst(clients, make_request, timeout: float) -> list[float]:
    """Call every client at once; each answer's delay in ms (inf for one not answered within `timeout`). The
    futures are polled every millisecond: a done-callback added after the answer came would run late."""
    futures = [client.call_async(make_request(index)) for index, client in enumerate(clients)]
    start = time.monotonic()
    delays = [float("inf")] * len(futures)
    while time.monotonic() - start < timeout:
        now = (time.monotonic() - start) * 1000
        for index, future in enumerate(futures):
            if delays[index] == float("inf") and future.done():
                delays[index] = now
        if all(d != float("inf") for d in delays):
            break
        time.sleep(0.001)
    for future in futures:
        result = future.result() if future.done() else None
        if result is not None and hasattr(result, "success") and not result.success:
            raise RuntimeError(f"a call was refused: {result.message}")
    return delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--clip", default="", help="CLIP model (default: the preset's)")
    parser.add_argument("--rate", type=float, default=20.0, help="camera frames per second")
    parser.add_argument("--size", default="480x640", help="HxW of the streamed frames")
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--reads", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))
    log_dir = tempfile.mkdtemp(prefix="ovseg-services-")
    os.environ.update(ros_environment(domain_id=random.Random(os.getpid()).randint(30, 200), log_dir=log_dir))
    from ovseg_interfaces.srv import GetVocabulary, SetVocabulary

    from ..client import OvsegClient, stream_frames
    from ..ros.messages import SERVICE_QOS

    params = {"preset": args.preset, **({"clip_model": args.clip} if args.clip else {})}
    proc = Process(node_command("ovseg_ros.node", "ovseg", params=params), dict(os.environ),
                   Path(log_dir) / "node.log")
    client = OvsegClient("", name="ovseg_bench_services", keep=20)
    try:
        if not client.wait_ready(180):
            print(proc.output()[-3000:])
            return 1

        def callers(service_type, name: str, count: int):
            made = [client.node.create_client(service_type, name, qos_profile=SERVICE_QOS) for _ in range(count)]
            if not all(c.wait_for_service(timeout_sec=30) for c in made):
                raise RuntimeError(f"{name} not found")
            return made

        readers = callers(GetVocabulary, "get_vocabulary", args.callers)
        writers = callers(SetVocabulary, "set_vocabulary", args.callers)
        with stream_frames(client, args.rate, size=(height, width)) as counts:
            wait_until(lambda: bool(client.received["segmentation"]), 60)
            time.sleep(2.0)  # a steady stream: the worker is busy with frames from here on
            single = [timed_burst(readers[:1], lambda _: GetVocabulary.Request(), 10)[0] for _ in range(args.reads)]
            read_burst = timed_burst(readers, lambda _: GetVocabulary.Request(), 60)
            during: list[float] = []
            stop = threading.Event()

            def read_while_writing() -> None:
                while not stop.is_set():
                    during.append(timed_burst(readers[:1], lambda _: GetVocabulary.Request(), 10)[0])
                    stop.wait(0.05)

            reader = threading.Thread(target=read_while_writing, daemon=True)
            reader.start()
            write_burst = timed_burst(
                writers, lambda i: SetVocabulary.Request(labels=["grass", "sky", "water", f"thing {i}"]), 300)
            stop.set()
            reader.join(15)
            processed = len(client.received["segmentation"])
        report = {
            "preset": args.preset, "rate_hz": args.rate, "frame": f"{height}x{width}", "callers": args.callers,
            "frames_published": counts.published,
            "read_p50_ms": round(statistics.median(single), 1), "read_p95_ms": round(percentile(single, 0.95), 1),
            "read_max_ms": round(max(single), 1), "reads_unanswered": sum(v == float("inf") for v in single),
            "readers_burst_last_ms": round(max(read_burst), 1),
            "readers_answered": sum(v != float("inf") for v in read_burst),
            "writers_burst_median_ms": round(statistics.median(write_burst), 1),
            "writers_burst_last_ms": round(max(write_burst), 1),
            "writers_answered": sum(v != float("inf") for v in write_burst),
            "reads_during_writes": len(during),
            "read_during_writes_p50_ms": round(statistics.median(during), 1) if during else None,
            "read_during_writes_max_ms": round(max(during), 1) if during else None,
            "segmentations_received_last": processed,
        }
        print(f"services while a {height}x{width} camera streams at {args.rate:g} Hz into preset {args.preset!r}")
        print(f"  one read at a time ({args.reads}): p50 {report['read_p50_ms']} ms, p95 {report['read_p95_ms']} "
              f"ms, max {report['read_max_ms']} ms, {report['reads_unanswered']} unanswered within 10 s")
        print(f"  {args.callers} readers at once: {report['readers_answered']} answered, the last after "
              f"{report['readers_burst_last_ms']} ms")
        print(f"  {args.callers} writers at once: {report['writers_answered']} answered, median "
              f"{report['writers_burst_median_ms']} ms, the last after {report['writers_burst_last_ms']} ms")
        print(f"  reads during the write burst ({len(during)}): p50 {report['read_during_writes_p50_ms']} ms, max "
              f"{report['read_during_writes_max_ms']} ms")
        write_json(args.json, report)
        return 0
    finally:
        client.close()
        proc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
