"""Starting ovseg processes the way launch_ros does: the environment, the command line, a clean stop.

Used by the demo, the tests and the benchmarks, so they all run the node exactly as a robot would.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def share_file(relative: str) -> Path:
    """A file of launch/ config/ models/: from the source checkout, else the installed share directory."""
    candidate = PACKAGE_DIR.parent / relative
    if candidate.exists():
        return candidate
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("ovseg_ros")) / relative
        if installed.exists():
            return installed
    except Exception:
        pass
    raise FileNotFoundError(f"{relative} not found in the checkout or the installed share directory")


def ros_environment(domain_id: int | None = None, log_dir: str | None = None,
                    base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an isolated local ROS graph: own domain, localhost discovery, large-image DDS profile."""
    env = dict(os.environ if base is None else base)
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(share_file("config/fastdds.xml")))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if log_dir is not None:
        env["ROS_LOG_DIR"] = log_dir
    elif "HOME" not in env and "ROS_LOG_DIR" not in env:
        env["ROS_LOG_DIR"] = "/tmp/ovseg_ros_logs"
    return env


def node_command(module: str, node_name: str | None = None, params: dict | None = None,
                 remaps: dict[str, str] | None = None, params_file: str | None = None,
                 namespace: str | None = None, log_level: str | None = None) -> list[str]:
    """python -m MODULE --ros-args ...: the same arguments launch_ros passes to a Node action."""
    cmd = [sys.executable, "-m", module, "--ros-args"]
    if node_name:
        cmd += ["-r", f"__node:={node_name}"]
    if namespace:
        cmd += ["-r", f"__ns:={namespace if namespace.startswith('/') else '/' + namespace}"]
    if params_file:
        cmd += ["--params-file", params_file]
    for key, value in (params or {}).items():
        cmd += ["-p", f"{key}:={format_param(value)}"]
    for old, new in (remaps or {}).items():
        cmd += ["-r", f"{old}:={new}"]
    if log_level:
        cmd += ["--log-level", log_level]
    return cmd


def format_param(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_param(v) if not isinstance(v, str) else f"'{v}'" for v in value) + "]"
    if isinstance(value, str):
        import yaml

        parsed = yaml.safe_load(value) if value else None
        return value if isinstance(parsed, str) and ":" not in value else f"'{value}'"
    return str(value)


PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM):
    """A `preexec_fn`: the child gets `signum` when its parent dies, even by SIGKILL (Linux prctl), so nothing
    this package starts outlives what started it. The kernel sends it when the *thread* that forked exits: start
    children from a thread that lives as long as they should."""
    try:  # resolved here, in the parent: between fork and exec the child only calls it (no loader locks)
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the process group is still killed on stop
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signum)
    return preexec


def kill_group(popen: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads one: `start_new_session`), grandchildren included."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def session_processes(session_id: int) -> list[int]:
    """PIDs of the live processes in a session (a child started with `start_new_session` leads one whose id is
    its pid): what a run left behind once its leader has exited. Linux /proc; empty elsewhere."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[3]) == session_id and fields[0] != "Z":  # after ") ": state, ppid, pgrp, session
            found.append(int(stat.parent.name))
    return found


def run_bounded(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(..., capture_output=True, text=True)` whose child dies with this process and whose whole
    process group is killed on timeout (plain `subprocess.run` kills only the child and leaves its children)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          preexec_fn=die_with_parent(signal.SIGKILL), **kwargs) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(popen)
            out, err = popen.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        except BaseException:
            kill_group(popen)
            raise
    result = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    result.pid = popen.pid  # the session it led: `session_processes(result.pid)` shows what outlived it
    return result


class Process:
    """A child process with its output in a log file, stopped by SIGINT like `ros2 launch` does.

    It leads its own process group and gets SIGTERM if this process dies, so a killed demo or test never
    leaves a node running."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: str | Path) -> None:
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.popen = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=die_with_parent(signal.SIGTERM))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT, then wait; SIGKILL to its whole group only if it hangs. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(self.popen)
        else:  # reap and make sure nothing of its group is left
            kill_group(self.popen)
        self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
