"""Shared fixtures: an isolated ROS graph per test run, real node processes, an in-process client."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from ovseg_ros.runtime import Process, node_command, ros_environment

# One DDS domain per pytest run (and localhost-only discovery) so parallel runs never see each other.
_LOG_DIR = tempfile.mkdtemp(prefix="ovseg-test-logs-")
os.environ.update(ros_environment(domain_id=int(os.environ.get("OVSEG_TEST_DOMAIN", 20 + os.getpid() % 200)),
                                  log_dir=_LOG_DIR))

# Models for tests: the random-init small config starts fastest; accuracy tests use the trained demo weights.
TEST_CLIP = os.environ.get("OVSEG_TEST_CLIP", "ovseg-demo-vit")
TEST_SAM = os.environ.get("OVSEG_TEST_SAM", "ovseg-demo-sam")


@pytest.fixture(scope="session")
def ros():
    import rclpy

    if not rclpy.ok():
        rclpy.init()
    yield
    rclpy.try_shutdown()


def start_node(tmp_path: Path, name: str = "ovseg", namespace: str | None = None, params: dict | None = None,
               module: str = "ovseg_ros.node", **kwargs) -> Process:
    merged = {"clip_model": TEST_CLIP, "sam_model": "", **(params or {})}
    cmd = node_command(module, node_name=name, namespace=namespace, params=merged, **kwargs)
    return Process(cmd, dict(os.environ), tmp_path / f"{namespace or 'root'}-{name}.log")


@pytest.fixture
def make_client(ros):
    from ovseg_ros.client import OvsegClient

    clients = []

    def factory(namespace: str = "", **kwargs) -> OvsegClient:
        client = OvsegClient(namespace, name=f"test_client_{len(clients)}", **kwargs)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()
