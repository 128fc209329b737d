"""Message conversion without DDS: every field of the prompt topic's twin copied, outputs keep the source header,
prompt arrays grouped or refused, clouds laid out as declared."""

from __future__ import annotations

import numpy as np
import pytest
from geometry_msgs.msg import Point
from rclpy.qos import ReliabilityPolicy
from std_msgs.msg import Header

from ovseg_interfaces.msg import PromptQuery, PromptResult
from ovseg_interfaces.srv import SegmentPrompt
from ovseg_ros.core.geometry import CLOUD_DTYPE, Intrinsics, PairedDepth, Region3D
from ovseg_ros.core.prompt import PromptError
from ovseg_ros.core.vocabulary import Vocabulary
from ovseg_ros.ros import messages
from ovseg_ros.ros.image_conversions import image_to_array, rgb_to_image


def header(sec: int = 5, nanosec: int = 7, frame_id: str = "cam") -> Header:
    h = Header(frame_id=frame_id)
    h.stamp.sec, h.stamp.nanosec = sec, nanosec
    return h


def test_a_prompt_query_becomes_a_request_field_for_field():
    query = PromptQuery(request_id="r1", camera="front", header=header(), points=[Point(x=1.0, y=2.0)],
                        point_labels=[1], point_groups=[0], boxes=[1.0, 2.0, 3.0, 4.0], vocabulary=["mug"],
                        multimask=True, crop_fusion=True)
    request = messages.request_from_query(query)
    assert (request.stamp.sec, request.stamp.nanosec) == (5, 7)
    for name in ("camera", "points", "point_labels", "point_groups", "boxes", "vocabulary", "multimask",
                 "crop_fusion"):
        assert getattr(request, name) == getattr(query, name), name


def test_a_response_becomes_a_prompt_result_with_every_field():
    response = SegmentPrompt.Response(success=True, message="ok", camera="rear", header=header(), labels=["a"],
                                      label_scores=[0.5], mask_scores=[0.9], vocabulary_version=3, top_k=1,
                                      top_labels=["a"], top_scores=[0.5], depth_frame_id="d", has_3d=[True],
                                      centroids=[Point(x=1.0)])
    result = messages.result_from_response(response, "id-9")
    assert result.request_id == "id-9"
    shared = set(SegmentPrompt.Response.get_fields_and_field_types()) & set(PromptResult.get_fields_and_field_types())
    assert len(shared) == 16  # every field of the response has its twin in the result
    for name in shared:
        assert getattr(result, name) == getattr(response, name), name


def test_points_are_grouped_into_prompts_and_box_i_joins_prompt_i():
    request = SegmentPrompt.Request(points=[Point(x=1.0, y=1.0), Point(x=2.0, y=2.0), Point(x=3.0, y=3.0)],
                                    point_labels=[1, 0, 1], point_groups=[0, 0, 1], boxes=[0.0, 0.0, 5.0, 5.0])
    prompts = messages.prompts_from_request(request)
    assert len(prompts) == 2
    assert prompts[0].points.tolist() == [[1, 1], [2, 2]] and prompts[0].point_labels.tolist() == [1, 0]
    assert prompts[0].box.tolist() == [0, 0, 5, 5] and prompts[1].box is None


@pytest.mark.parametrize("fields, reason", [
    ({"points": [Point()], "point_labels": []}, "point_labels"),
    ({"points": [Point()], "point_labels": [1], "point_groups": [0, 1]}, "point_groups"),
    ({"boxes": [1.0, 2.0, 3.0]}, "4 per box"),
    ({}, "no prompts"),
    ({"points": [Point()], "point_labels": [1], "point_groups": [-1]}, ">= 0"),
])
def test_inconsistent_prompt_arrays_are_refused_with_the_reason(fields, reason):
    with pytest.raises(PromptError, match=reason):
        messages.prompts_from_request(SegmentPrompt.Request(**fields))


def test_a_request_image_is_decoded_and_kept_with_its_own_stamp_and_stamp_zero_means_newest():
    rgb = np.zeros((8, 10, 3), np.uint8)
    request = SegmentPrompt.Request(image=rgb_to_image(rgb, header(9, 1)), boxes=[0.0, 0.0, 4.0, 4.0])
    core = messages.prompt_request(request, max_pixels=1000)
    assert core.image.shape == (8, 10, 3) and core.image_key == (9, 1) and core.key is None
    by_stamp = messages.prompt_request(SegmentPrompt.Request(boxes=[0.0, 0.0, 4.0, 4.0]), max_pixels=1000)
    assert by_stamp.image is None and by_stamp.key is None
    stamped = SegmentPrompt.Request(boxes=[0.0, 0.0, 1.0, 1.0])
    stamped.stamp.sec = 4
    assert messages.prompt_request(stamped, 1000).key == (4, 0)


def test_segmentation_and_label_info_carry_the_source_header_and_the_vocabulary():
    labels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    msg = messages.segmentation_msg(header(), labels, 4, [1, 2], ["a", "b"], [0.5, 0.25], [0.1, 0.2], 3.0)
    assert msg.header == header() and msg.labels.header == header() and msg.labels.encoding == "mono16"
    assert np.array_equal(image_to_array(msg.labels), labels)
    info = messages.label_info_msg(Vocabulary(("sky", "red mug;mug")), 0.2, header().stamp)
    assert list(info.class_ids) == [0, 1] and info.class_names == ["sky", "red mug"]
    assert info.threshold == pytest.approx(0.2)


def test_cloud_bytes_follow_the_declared_fields_and_markers_start_with_deleteall():
    depth = PairedDepth(np.ones((2, 2), np.float32), Intrinsics(1.0, 1.0, 0.5, 0.5, 2, 2), "depth_frame", 0.0)
    cloud = np.zeros(3, CLOUD_DTYPE)
    cloud["x"], cloud["label"] = [1.0, 2.0, 3.0], [4, 5, 6]
    msg = messages.cloud_msg(header(), depth, cloud)
    assert msg.header.frame_id == "depth_frame" and msg.width == 3 and msg.point_step == CLOUD_DTYPE.itemsize
    back = np.frombuffer(bytes(msg.data), dtype=CLOUD_DTYPE)
    assert back["x"].tolist() == [1.0, 2.0, 3.0] and back["label"].tolist() == [4, 5, 6]
    assert [f.name for f in msg.fields] == list(CLOUD_DTYPE.names)
    regions = [Region3D(1, "mug", np.array([0.0, 0.0, 1.0]), np.array([0.1, 0.1, 0.1]))]
    markers = messages.markers_msg(header(), depth, regions, num_classes=2, boxes=True).markers
    assert markers[0].action == markers[0].DELETEALL
    assert [m.text for m in markers[1:]] == ["mug", ""] and markers[1].header.frame_id == "depth_frame"


def test_image_qos_follows_rep_2003_and_the_reliability_override():
    assert messages.image_qos("sensor_data", 1).reliability == ReliabilityPolicy.BEST_EFFORT
    assert messages.image_qos("default", 3).reliability == ReliabilityPolicy.RELIABLE
    assert messages.image_qos("sensor_data", 1, "reliable").reliability == ReliabilityPolicy.RELIABLE
    assert messages.image_qos("default", 1, "best_effort").reliability == ReliabilityPolicy.BEST_EFFORT
    assert messages.SERVICE_QOS.depth == 100


def test_example_requests_refuse_images_and_boxes_together_and_name_the_bad_image():
    from ovseg_interfaces.srv import SetVocabulary
    from ovseg_ros.core.vocabulary import VocabularyError
    from ovseg_ros.ros.image_conversions import ImageError, rgb_to_image
    from ovseg_ros.ros.messages import exemplar_requests

    good = rgb_to_image(np.zeros((16, 16, 3), np.uint8), Header())
    both = SetVocabulary.Request(exemplar_labels=["a"], exemplar_images=[good], exemplar_boxes=[0.0, 0.0, 9.0, 9.0])
    with pytest.raises(VocabularyError, match="not both"):
        exemplar_requests(both, 1_000_000)
    bad = rgb_to_image(np.zeros((16, 16, 3), np.uint8), Header())
    bad.encoding = "no-such-encoding"
    with pytest.raises(ImageError, match=r"exemplar_images\[1\]"):
        exemplar_requests(SetVocabulary.Request(exemplar_labels=["a", "b"], exemplar_images=[good, bad]), 1_000_000)
    assert len(exemplar_requests(SetVocabulary.Request(exemplar_labels=["a"], exemplar_images=[good]), 10**6)) == 1
