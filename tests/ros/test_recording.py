"""The node's outputs recorded to MCAP (rosbag2's layout) and read back by mcap_ros2, as Foxglove would."""

from __future__ import annotations

import numpy as np
from mcap_ros2.reader import read_ros2_messages
from node_processes import start_node
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from ovseg_interfaces.msg import LabelInfo, Segmentation
from ovseg_ros.recording import McapRecorder
from ovseg_ros.ros.image_conversions import image_to_array, rgb_to_image
from ovseg_ros.synth.world import generate_scene


def test_outputs_recorded_to_mcap_read_back_field_by_field(tmp_path, make_client):
    proc = start_node(tmp_path, name="ovseg_rec", namespace="rec")
    client = make_client("/rec")
    path = tmp_path / "ovseg.mcap"
    recorder = McapRecorder(client.node, path, {"/rec/segmentation": Segmentation, "/rec/overlay": Image,
                                                "/rec/label_info": LabelInfo})
    try:
        assert client.wait_ready(60), proc.output()
        response = client.set_vocabulary(["grass", "sky", "water", "red circle", "blue star"])
        assert response.success
        image = generate_scene(1, size=(240, 320), split="eval").image
        for sec in range(6000, 6004):
            header = Header(frame_id="cam")
            header.stamp.sec = sec
            for _ in range(10):
                client.publish_image(rgb_to_image(image, header))
                if client.wait_for("segmentation", lambda m, s=sec: m.header.stamp.sec == s, 2.0):
                    break
        assert client.wait_for("overlay", lambda m: m.header.stamp.sec == 6003, 5.0) is not None
    finally:
        recorder.close()
        assert proc.stop() == 0
    live = {m.header.stamp.sec: m for m in client.received["segmentation"] if m.header.stamp.sec >= 6000}
    decoded = {"/rec/segmentation": [], "/rec/overlay": [], "/rec/label_info": []}
    for message in read_ros2_messages(str(path)):
        decoded[message.channel.topic].append(message.ros_msg)
    assert recorder.counts["/rec/segmentation"] == len(decoded["/rec/segmentation"]) >= 4
    assert len(decoded["/rec/overlay"]) >= 4 and decoded["/rec/label_info"]
    for seg in decoded["/rec/segmentation"]:
        if seg.header.stamp.sec not in live:
            continue
        original = live[seg.header.stamp.sec]
        assert seg.vocabulary_version == original.vocabulary_version == response.vocabulary_version
        assert list(seg.class_names) == list(original.class_names)
        assert list(seg.class_ids) == list(original.class_ids)
        assert np.allclose(seg.class_areas, original.class_areas)
        assert (seg.labels.width, seg.labels.height, seg.labels.encoding) == (320, 240, "mono16")
        assert bytes(seg.labels.data) == bytes(original.labels.data)
        assert image_to_array(original.labels).shape == (240, 320)
    info = decoded["/rec/label_info"][-1]
    assert list(info.class_names) == ["grass", "sky", "water", "red circle", "blue star"]
