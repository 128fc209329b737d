"""Clean endings: run the demo N times in a row and count the runs that end by themselves, with exit code 0,
within the time limit, leaving no process behind.

    ovseg-bench demo-runs [--runs 20] [--frames 4] [--timeout 300] [--json demo_runs.json]

Each run is `python -m ovseg_ros.demo` in its own session, as `scripts/demo.sh` runs it; a run over the limit is
killed with its whole process group and counted as a hang. After each run the benchmark lists the processes
still in its session (a node or camera the demo failed to stop) and kills them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..runtime import run_bounded, session_processes
from .report import write_json


def one_run(index: int, frames: int, timeout: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ovseg_ros.demo", "--frames", str(frames), "--out", str(out / f"run{index:02d}")]
    start = time.monotonic()
    row = {"run": index, "exit_code": None, "hung": False, "left_behind": 0}
    try:
        result = run_bounded(cmd, timeout)
        row["exit_code"] = result.returncode
        time.sleep(0.5)  # a child that was signalled gets a moment to go
        left = session_processes(result.pid)
        row["left_behind"] = len(left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if result.returncode != 0:
            row["stderr_tail"] = result.stderr[-1500:]
    except subprocess.TimeoutExpired as expired:
        row["hung"] = True
        row["stderr_tail"] = (expired.stderr or "")[-1500:] if isinstance(expired.stderr, str) else ""
    row["wall_s"] = round(time.monotonic() - start, 1)
    row["clean"] = row["exit_code"] == 0 and not row["hung"] and row["left_behind"] == 0
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run counts as hung")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="ovseg-demo-runs-"))
    rows = []
    print(f"{'run':>4} {'clean':>5} {'exit':>4} {'hung':>5} {'left':>4} {'wall_s':>7}")
    for index in range(args.runs):
        row = one_run(index, args.frames, args.timeout, out)
        rows.append(row)
        print(f"{index:>4} {str(row['clean']):>5} {row['exit_code']!s:>4} {str(row['hung']):>5} "
              f"{row['left_behind']:>4} {row['wall_s']:>7}", flush=True)
        if not row["clean"]:
            print(row.get("stderr_tail", ""), flush=True)
    clean = sum(r["clean"] for r in rows)
    walls = sorted(r["wall_s"] for r in rows)
    print(f"{clean} of {args.runs} demo runs ended cleanly (median {walls[len(walls) // 2]} s, "
          f"longest {walls[-1]} s); outputs in {out}")
    write_json(args.json, {"runs": args.runs, "frames": args.frames, "timeout_s": args.timeout, "clean": clean,
                           "rows": rows})
    return 0 if clean == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
