"""Processes the demo and the tests start die with their parent, even when it is killed, and a bounded run kills
its whole process tree on timeout (plain subprocess.run leaves grandchildren running)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ovseg_ros.runtime import run_bounded, session_processes, wait_until

SLEEPER = "import time\nwhile True: time.sleep(0.1)"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read()
    return stat.split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not yet reaped


def test_a_child_dies_when_its_parent_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import sys, time\n"
        "from ovseg_ros.runtime import Process\n"
        f"child = Process([sys.executable, '-c', {SLEEPER!r}], {{}}, {str(tmp_path / 'child.log')!r})\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.popen.pid))\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.kill()  # SIGKILL: the parent runs no clean-up at all
        parent.wait(10)
        assert wait_until(lambda: not alive(child), 10), "the child outlived its killed parent"
    finally:
        parent.kill()


def test_a_bounded_run_kills_its_grandchildren_on_timeout(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        f"g = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}])\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "time.sleep(60)\n")
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded([sys.executable, "-c", code], timeout=3)
    assert time.monotonic() - start < 20
    grandchild = int(pid_file.read_text())
    assert wait_until(lambda: not alive(grandchild), 10), "the grandchild outlived the timed-out run"


def test_session_processes_lists_what_a_finished_run_left_behind():
    """How `ovseg-bench demo-runs` counts leftovers: a run whose grandchild outlives it is seen, a clean one not."""
    code = ("import subprocess, sys\n"
            f"g = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], stdout=subprocess.DEVNULL,\n"
            "                     stderr=subprocess.DEVNULL)\n"
            "print(g.pid)\n")
    result = run_bounded([sys.executable, "-c", code], timeout=30)
    left = int(result.stdout.strip())
    try:
        assert session_processes(result.pid) == [left]
    finally:
        os.kill(left, 9)
    assert wait_until(lambda: not session_processes(result.pid), 10)
    clean = run_bounded([sys.executable, "-c", "print('done')"], timeout=30)
    assert session_processes(clean.pid) == []
