"""The interface package builds and round-trips; colcon builds both packages (the robot path); ruff is clean."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from rclpy.serialization import deserialize_message, serialize_message

from ovseg_ros.runtime import run_bounded

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def test_messages_round_trip():
    from ovseg_interfaces.msg import LabelInfo, Segmentation
    from ovseg_interfaces.srv import GetVocabulary, SetVocabulary

    info = LabelInfo(vocabulary_version=7, class_ids=[0, 1, 65535], class_names=["a", "b", "unlabelled"],
                     threshold=0.25)
    back = deserialize_message(serialize_message(info), LabelInfo)
    assert (back.vocabulary_version, list(back.class_ids), list(back.class_names)) == (7, [0, 1, 65535],
                                                                                      ["a", "b", "unlabelled"])
    assert back.threshold == pytest.approx(0.25)
    assert LabelInfo.UNLABELLED == 65535

    seg = Segmentation(vocabulary_version=3, class_ids=[2], class_names=["sky"], class_scores=[0.5],
                       class_areas=[0.25], inference_ms=12.5)
    seg.labels.height, seg.labels.width, seg.labels.encoding, seg.labels.step = 2, 2, "mono16", 4
    seg.labels.data = bytes(range(8))
    back = deserialize_message(serialize_message(seg), Segmentation)
    assert bytes(back.labels.data) == bytes(range(8)) and back.labels.encoding == "mono16"
    assert list(back.class_names) == ["sky"] and back.inference_ms == pytest.approx(12.5)

    request = SetVocabulary.Request(labels=["sofa;couch", "cat"], prompt_templates=["a {}."])
    back = deserialize_message(serialize_message(request), SetVocabulary.Request)
    assert list(back.labels) == ["sofa;couch", "cat"] and list(back.prompt_templates) == ["a {}."]
    response = SetVocabulary.Response(success=False, message="why", vocabulary_version=4)
    back = deserialize_message(serialize_message(response), SetVocabulary.Response)
    assert (back.success, back.message, back.vocabulary_version) == (False, "why", 4)
    got = GetVocabulary.Response(labels=["x"], prompt_templates=["{}"], vocabulary_version=9)
    back = deserialize_message(serialize_message(got), GetVocabulary.Response)
    assert list(back.labels) == ["x"] and back.vocabulary_version == 9


def _source_tree(dest: Path) -> Path:
    """The repository as a user would clone it into a workspace's src/ (no venv, no build output)."""
    ignore = shutil.ignore_patterns(".venv", "build", "install", "log", "__pycache__", "*.egg-info", ".git",
                                    ".pytest_cache", ".ruff_cache", "demo_output")
    target = dest / "src" / "ovseg_ros"
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("colcon", path=str(VENV_BIN)) is None, reason="colcon not installed")
def test_colcon_builds_both_packages(tmp_path):
    src = _source_tree(tmp_path)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", AMENT_PREFIX_PATH=str(VENV_BIN.parent))
    cmd = [str(VENV_BIN / "colcon"), "build", "--base-paths", str(src), str(src / "msg"),
           "--cmake-args", "-DBUILD_TESTING=OFF"]
    proc = run_bounded(cmd, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 packages finished" in proc.stdout
    install = tmp_path / "install"
    assert (install / "ovseg_ros" / "lib" / "ovseg_ros" / "ovseg_node").is_file()
    share = install / "ovseg_ros" / "share" / "ovseg_ros"
    for relative in ("launch/ovseg.launch.py", "config/ovseg.yaml", "config/fastdds.xml", "models/manifest.yaml",
                     "package.xml"):
        assert (share / relative).is_file(), relative
    assert (install / "ovseg_ros" / "share" / "ament_index" / "resource_index" / "packages" / "ovseg_ros").is_file()
    generated = list((install / "ovseg_interfaces").rglob("_segmentation.py"))
    assert generated, "no Python code generated for ovseg_interfaces"


def test_ruff_is_clean():
    ruff = VENV_BIN / "ruff"
    proc = run_bounded([str(ruff), "check", str(ROOT)], timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_model_manifest_cli_lists_and_verifies_without_network():
    cli = [sys.executable, "-m", "ovseg_ros.core.registry"]
    listed = run_bounded([*cli, "list"], timeout=60)
    assert listed.returncode == 0, listed.stderr
    for name in ("ovseg-demo-clip", "ovseg-demo-sam", "clip-vit-b16-openai", "sam-vit-b", "sam-vit-l", "sam-vit-h",
                 "mobile-sam"):
        assert name in listed.stdout
    assert "not installed" in listed.stdout  # official weights are not on this machine
    verified = run_bounded([*cli, "verify", "ovseg-demo-clip", "ovseg-demo-sam"], timeout=60)
    assert verified.returncode == 0 and verified.stdout.count("ok") == 2, verified.stdout
    refused = run_bounded([*cli, "fetch", "ovseg-demo-clip"], timeout=60)
    assert refused.returncode == 2 and "no download URL" in refused.stderr
    import yaml

    manifest = yaml.safe_load((ROOT / "models" / "manifest.yaml").read_text())["models"]
    for name, entry in manifest.items():
        # A checksum, except for files whose publisher gives none (SED's on Google Drive, OV-SAM's and the
        # RN50x16 CLIP it builds on, on the Hugging Face hub at a moving revision): recorded on first fetch
        unpublished = entry["sha256"] == "" and any(host in entry.get("url", "") for host in (
            "drive.google.com", "huggingface.co/HarborYuan/", "huggingface.co/timm/resnet50x16_clip.openai/"))
        assert (len(entry["sha256"]) == 64 or unpublished) and entry["license"], name
        assert entry.get("url", "").startswith("https://") or name.startswith("ovseg-demo"), name
