"""segment_prompt over real DDS with the demo models: accuracy floors and every bad request refused."""

from __future__ import annotations

import numpy as np
import pytest
from geometry_msgs.msg import Point
from node_processes import TEST_SAM, start_node
from std_msgs.msg import Header

from ovseg_ros.core.metrics import mask_iou
from ovseg_ros.ros.image_conversions import image_to_array, rgb_to_image
from ovseg_ros.synth.world import HELD_OUT, generate_scene, world_vocabulary


@pytest.fixture(scope="module")
def node(tmp_path_factory, ros):
    from ovseg_interfaces.srv import SegmentPrompt
    from ovseg_ros.client import OvsegClient

    proc = start_node(tmp_path_factory.mktemp("prompt"), params={"sam_model": TEST_SAM, "frame_cache_size": 2,
                                                                  "clip_model": "ovseg-demo-clip"})
    client = OvsegClient("", name="test_prompt_client")
    prompt_client = client.node.create_client(SegmentPrompt, "segment_prompt")
    try:
        assert client.wait_ready(timeout=90) and prompt_client.wait_for_service(timeout_sec=30), proc.output()
        response = client.set_vocabulary(world_vocabulary())
        assert response.success, response.message
        yield proc, client, prompt_client
    finally:
        client.close()
        if proc.alive():
            proc.stop()


def request_for(scene_image=None, stamp=(0, 0)):
    from ovseg_interfaces.srv import SegmentPrompt

    request = SegmentPrompt.Request()
    if scene_image is not None:
        header = Header(frame_id="cam")
        header.stamp.sec, header.stamp.nanosec = stamp
        request.image = rgb_to_image(scene_image, header)
    else:
        request.stamp.sec, request.stamp.nanosec = stamp
    return request


def centre(mask):
    import cv2

    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return Point(x=float(x), y=float(y))


def test_point_multipoint_and_box_prompts_meet_the_floors(node):
    proc, client, prompt_client = node
    novel = {f"{c} {s}" for c, s in HELD_OUT}
    ious = {"point": [], "multi": [], "box": []}
    labels_ok = {"seen": [], "held_out": []}
    for index in range(24):  # ~70 labelled objects: enough that the label floor is not a few scenes' luck
        scene = generate_scene(700_000 + index, size=(240, 320), split="eval")
        stamp = (100 + index, 0)
        # 1) one prompt per object, a centre point each, sent with the image
        request = request_for(scene.image, stamp)
        request.points = [centre(m) for m in scene.instance_masks]
        request.point_labels = [1] * len(request.points)
        request.multimask = True
        response = client.call(prompt_client, request)
        assert response.success, response.message
        assert response.header.stamp.sec == stamp[0] and response.header.frame_id == "cam"
        assert len(response.masks) == len(scene.instance_masks) == len(response.labels)
        for mask_msg, truth in zip(response.masks, scene.instance_masks, strict=True):
            assert mask_msg.encoding == "mono8" and (mask_msg.height, mask_msg.width) == (240, 320)
            ious["point"].append(mask_iou(image_to_array(mask_msg) > 127, truth))
        # 2) the same (cached) frame by stamp: a foreground and a background point per object, then boxes
        request = request_for(None, stamp)
        points, point_labels, groups = [], [], []
        for group, truth in enumerate(scene.instance_masks):
            ys, xs = np.nonzero(truth)
            bys, bxs = np.nonzero(~truth)
            points += [Point(x=float(xs[len(xs) // 2]), y=float(ys[len(ys) // 2])),
                       Point(x=float(bxs[0]), y=float(bys[0]))]
            point_labels += [1, 0]
            groups += [group, group]
        request.points, request.point_labels, request.point_groups = points, point_labels, groups
        response = client.call(prompt_client, request)
        assert response.success, response.message
        ious["multi"] += [mask_iou(image_to_array(m) > 127, t)
                          for m, t in zip(response.masks, scene.instance_masks, strict=True)]
        request = request_for(None, stamp)
        request.boxes = [float(v) for box in scene.boxes for v in box]
        response = client.call(prompt_client, request)
        assert response.success, response.message
        assert response.top_k >= 1 and len(response.top_labels) == response.top_k * len(scene.boxes)
        for mask_msg, truth, name, label in zip(response.masks, scene.instance_masks, scene.instance_classes,
                                                response.labels, strict=True):
            ious["box"].append(mask_iou(image_to_array(mask_msg) > 127, truth))
            labels_ok["held_out" if name in novel else "seen"].append(label == name)
    summary = {k: float(np.mean(v)) for k, v in {**ious, **labels_ok}.items() if v}
    print("prompt floors:", summary)
    # Floors sit well below what `ovseg-bench accuracy` measures (README) so only a regression trips them.
    assert summary["point"] >= 0.70 and summary["multi"] >= 0.70 and summary["box"] >= 0.75, summary
    assert summary["seen"] + summary.get("held_out", 0.0) > 0, summary  # labels are far from random noise...
    assert np.mean(labels_ok["seen"] + labels_ok["held_out"]) >= 0.55, summary  # ...measured ~0.8 (README)
    assert proc.alive()


def bad_requests():
    ok_image = generate_scene(5, size=(120, 160), split="eval").image
    cases = {}
    r = request_for(ok_image, (7, 0))
    cases["zero prompts"] = (r, "no prompts")
    r = request_for(ok_image, (7, 0))
    r.points, r.point_labels = [Point(x=500.0, y=10.0)], [1]
    cases["point outside"] = (r, "outside")
    r = request_for(ok_image, (7, 0))
    r.points, r.point_labels = [Point(x=float("nan"), y=10.0)], [1]
    cases["NaN point"] = (r, "NaN")
    r = request_for(ok_image, (7, 0))
    r.boxes = [50.0, 10.0, 20.0, 40.0]
    cases["x2 < x1"] = (r, "x2<=x1")
    r = request_for(ok_image, (7, 0))
    r.points, r.point_labels = [Point(x=5.0, y=5.0), Point(x=6.0, y=6.0)], [1]
    cases["labels length"] = (r, "point_labels")
    r = request_for(ok_image, (7, 0))
    r.points, r.point_labels, r.point_groups = [Point(x=5.0, y=5.0)], [1], [0, 1]
    cases["groups length"] = (r, "point_groups")
    r = request_for(ok_image, (7, 0))
    r.boxes = [1.0, 2.0, 3.0]
    cases["box of three numbers"] = (r, "4 per box")
    r = request_for(ok_image, (7, 0))
    r.boxes = [1.0, 1.0, 20.0, 20.0] * 1000
    cases["1000 prompts"] = (r, "limit")
    r = request_for(None, (424242, 1))
    r.boxes = [1.0, 1.0, 20.0, 20.0]
    cases["evicted stamp"] = (r, "no cached frame")
    r = request_for(ok_image, (7, 0))
    r.image.encoding = "weird16"
    r.boxes = [1.0, 1.0, 20.0, 20.0]
    cases["bad encoding"] = (r, "unsupported encoding")
    r = request_for(ok_image, (7, 0))
    r.boxes, r.vocabulary = [1.0, 1.0, 20.0, 20.0], ["x" * 500]
    cases["bad vocabulary"] = (r, "limit")
    return cases


@pytest.mark.parametrize("case", list(bad_requests()))
def test_bad_prompt_requests_are_refused_and_the_node_keeps_serving(node, case):
    proc, client, prompt_client = node
    request, reason = bad_requests()[case]
    response = client.call(prompt_client, request)
    assert not response.success
    assert reason in response.message, response.message
    assert proc.alive()
    good = request_for(generate_scene(6, size=(120, 160), split="eval").image, (8, 0))
    good.boxes = [10.0, 10.0, 60.0, 60.0]
    assert client.call(prompt_client, good).success


def test_per_request_vocabulary_and_eviction(node):
    proc, client, prompt_client = node
    scene = generate_scene(9, size=(120, 160), split="eval")
    request = request_for(scene.image, (900, 0))
    request.boxes = [float(v) for v in scene.boxes[0]]
    request.vocabulary = [scene.instance_classes[0], "sky"]
    response = client.call(prompt_client, request)
    assert response.success and response.vocabulary_version == 0
    assert response.labels[0] in (scene.instance_classes[0], "sky")
    for stamp in ((901, 0), (902, 0)):  # frame_cache_size is 2: frame 900 falls out
        r = request_for(scene.image, stamp)
        r.boxes = request.boxes
        assert client.call(prompt_client, r).success
    r = request_for(None, (900, 0))
    r.boxes = request.boxes
    response = client.call(prompt_client, r)
    assert not response.success and "evicted" in response.message


def test_prompt_topic_pair(node):
    from ovseg_interfaces.msg import PromptQuery, PromptResult

    proc, client, prompt_client = node
    scene = generate_scene(12, size=(120, 160), split="eval")
    request = request_for(scene.image, (950, 0))
    request.boxes = [float(v) for v in scene.boxes[0]]
    assert client.call(prompt_client, request).success  # caches frame 950
    client.subscribe("prompt_result", PromptResult)
    publisher = client.node.create_publisher(PromptQuery, "/prompt", 10)
    query = PromptQuery(request_id="tool-1", boxes=request.boxes)
    query.header.stamp.sec = 950
    bad = PromptQuery(request_id="tool-2", boxes=[5.0, 5.0, 1.0, 1.0])
    for _ in range(20):
        publisher.publish(query)
        publisher.publish(bad)
        if client.wait_for("prompt_result", lambda m: m.request_id == "tool-2", 1.0):
            break
    good = client.wait_for("prompt_result", lambda m: m.request_id == "tool-1", 5.0)
    refused = client.wait_for("prompt_result", lambda m: m.request_id == "tool-2", 5.0)
    assert good is not None and good.success and len(good.masks) == 1 and good.header.stamp.sec == 950
    assert refused is not None and not refused.success and "x2<=x1" in refused.message


def test_sam_refinement_and_segment_everything_outputs(node):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    from ovseg_interfaces.msg import Segmentation

    proc, client, prompt_client = node
    service = client.node.create_client(SetParameters, "/ovseg/set_parameters")
    assert service.wait_for_service(timeout_sec=10)
    request = SetParameters.Request(parameters=[
        Parameter(name="refinement", value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="sam")),
        Parameter(name="segment_everything", value=ParameterValue(type=ParameterType.PARAMETER_BOOL,
                                                                  bool_value=True)),
    ])
    assert all(r.successful for r in client.call(service, request).results)
    client.subscribe("instances", Segmentation)
    scene = generate_scene(21, size=(240, 320), split="eval")
    header = Header(frame_id="cam")
    header.stamp.sec = 990
    for _ in range(10):
        client.publish_image(rgb_to_image(scene.image, header))
        if client.wait_for("instances", lambda m: m.header.stamp.sec == 990, 3.0) is not None:
            break
    instances = client.wait_for("instances", lambda m: m.header.stamp.sec == 990, 1.0)
    seg = client.wait_for("segmentation", lambda m: m.header.stamp.sec == 990, 1.0)
    assert instances is not None and seg is not None, proc.output()[-2000:]
    ids = image_to_array(instances.labels)
    assert ids.shape == (240, 320) and len(instances.class_names) == len(instances.class_ids) >= 1
    assert set(np.unique(ids)) <= {0, *instances.class_ids}
    assert all(name in world_vocabulary() for name in instances.class_names)
    request = SetParameters.Request(parameters=[
        Parameter(name="refinement", value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="none")),
        Parameter(name="segment_everything", value=ParameterValue(type=ParameterType.PARAMETER_BOOL,
                                                                  bool_value=False)),
    ])
    assert all(r.successful for r in client.call(service, request).results)
