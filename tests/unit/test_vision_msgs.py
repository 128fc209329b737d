"""The vision_msgs built for the tests is upstream's: every type's RIHS01 hash (which covers field names, types
and nested types) equals the one rosidl gives upstream vision_msgs 4.1.1's own definitions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

RECORDED = json.loads((Path(__file__).parents[1] / "interfaces/vision_msgs/upstream_hashes.json").read_text())


def share() -> Path:
    """vision_msgs' share/ directory: the ament index's where it is set up, else the venv's."""
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("vision_msgs")) / "msg"
    except (OSError, LookupError):  # no AMENT_PREFIX_PATH in a plain venv: the bootstrap installs into it
        return Path(sys.prefix) / "share/vision_msgs/msg"


def installed_hash(kind: str) -> str:
    return json.loads((share() / f"{kind}.json").read_text())["type_hashes"][0]["hash_string"]


@pytest.mark.parametrize("kind", sorted(RECORDED["hashes"]))
def test_type_hash_equals_upstream(kind):
    assert installed_hash(kind) == RECORDED["hashes"][kind]


def test_every_upstream_type_is_there():
    assert {p.stem for p in share().glob("*.msg")} == set(RECORDED["hashes"])
