"""Starting the node under test as a real process (as launch_ros would) with the test models."""

from __future__ import annotations

import os
from pathlib import Path

from ovseg_ros.runtime import Process, node_command

# Models for tests: the random-init small config starts fastest; accuracy tests use the trained demo weights.
TEST_CLIP = os.environ.get("OVSEG_TEST_CLIP", "ovseg-demo-vit")
TEST_SAM = os.environ.get("OVSEG_TEST_SAM", "ovseg-demo-sam")


def start_node(tmp_path: Path, name: str = "ovseg", namespace: str | None = None, params: dict | None = None,
               module: str = "ovseg_ros.node", **kwargs) -> Process:
    merged = {"clip_model": TEST_CLIP, "sam_model": "", **(params or {})}
    cmd = node_command(module, node_name=name, namespace=namespace, params=merged, **kwargs)
    return Process(cmd, dict(os.environ), tmp_path / f"{namespace or 'root'}-{name}.log")
