"""Fixtures of the ROS-level tests: an isolated ROS graph per test run and in-process clients (node processes:
node_processes.py)."""

from __future__ import annotations

import os
import tempfile

import pytest

from ovseg_ros.runtime import ros_environment

# One DDS domain per pytest run (and localhost-only discovery) so parallel runs never see each other.
_LOG_DIR = tempfile.mkdtemp(prefix="ovseg-test-logs-")
os.environ.update(ros_environment(domain_id=int(os.environ.get("OVSEG_TEST_DOMAIN", 20 + os.getpid() % 200)),
                                  log_dir=_LOG_DIR))

@pytest.fixture(scope="session")
def ros():
    import rclpy

    if not rclpy.ok():
        rclpy.init()
    yield
    rclpy.try_shutdown()


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
