"""Vocabulary changes in mid-stream never mix versions; a restart restores the persisted vocabulary."""

from __future__ import annotations

import threading
import time

import numpy as np
from conftest import start_node
from std_msgs.msg import Header

from ovseg_ros.image_conversions import image_to_array, rgb_to_image
from ovseg_ros.synth.world import generate_scene

VOCABULARIES = [
    ["grass", "sky", "red circle"],
    ["water", "sand", "blue star", "green heart", "yellow ring"],
    ["wall", "purple cross"],
    ["grass", "water", "sky", "wall", "sand", "orange crescent", "pink square"],
]


def test_mid_stream_changes_never_mix_versions(tmp_path, make_client):
    proc = start_node(tmp_path, name="ovseg_mix", namespace="mix")
    client = make_client("/mix")
    try:
        assert client.wait_ready(60), proc.output()
        frames = [generate_scene(i, size=(240, 320), split="eval").image for i in range(4)]
        stop = threading.Event()

        def stream() -> None:
            sec = 10_000
            while not stop.is_set():
                header = Header(frame_id="cam")
                header.stamp.sec = sec
                client.publish_image(rgb_to_image(frames[sec % 4], header))
                sec += 1
                time.sleep(0.05)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        versions = {}
        for labels in VOCABULARIES * 2:
            response = client.set_vocabulary(labels)
            assert response.success, response.message
            versions[response.vocabulary_version] = [name.split(";")[0] for name in labels]
            time.sleep(0.6)
        stop.set()
        thread.join()
        time.sleep(0.5)
        outputs = list(client.received["segmentation"])
        seen_versions = {seg.vocabulary_version for seg in outputs}
        assert len(seen_versions & set(versions)) >= 4, seen_versions
        for seg in outputs:
            if seg.vocabulary_version not in versions:
                continue  # the start-up vocabulary
            names = versions[seg.vocabulary_version]
            assert set(seg.class_names) <= set(names), (seg.vocabulary_version, seg.class_names)
            assert all(names[i] == n for i, n in zip(seg.class_ids, seg.class_names, strict=True))
            ids = np.unique(image_to_array(seg.labels))
            assert ids.max() < len(names) or ids.max() == 65535
        infos = [info.vocabulary_version for info in client.received["label_info"]]
        assert infos == sorted(infos)
    finally:
        assert proc.stop() == 0


def test_restart_restores_the_persisted_vocabulary(tmp_path, make_client):
    path = tmp_path / "vocabulary.json"
    params = {"vocabulary_file": str(path)}
    first = start_node(tmp_path, name="ovseg_persist", namespace="persist", params=params)
    client = make_client("/persist")
    assert client.wait_ready(60), first.output()
    response = client.set_vocabulary(["forklift", "pallet;skid", "person"], ["a photo of a {} in a warehouse."])
    assert response.success
    assert first.stop() == 0
    assert path.is_file()

    second = start_node(tmp_path, name="ovseg_persist", namespace="persist", params=params)
    try:
        client.get_client.wait_for_service(timeout_sec=60)
        restored = client.get_vocabulary()
        assert list(restored.labels) == ["forklift", "pallet;skid", "person"]
        assert list(restored.prompt_templates) == ["a photo of a {} in a warehouse."]
        assert restored.vocabulary_version == response.vocabulary_version
        assert "restored vocabulary" in second.output()
    finally:
        assert second.stop() == 0

    path.write_text("{not json")
    third = start_node(tmp_path, name="ovseg_persist", namespace="persist", params=params)
    try:
        client.get_client.wait_for_service(timeout_sec=60)
        assert client.wait_for("label_info", lambda m: True, timeout=10) is not None
        assert "cannot restore the vocabulary" in third.output()
        assert len(client.get_vocabulary().labels) == 8  # fell back to the parameter
    finally:
        assert third.stop() == 0
