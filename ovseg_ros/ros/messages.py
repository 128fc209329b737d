"""Every conversion between ROS messages and the core, in one place: frames in, outputs out, prompt requests and
answers, the topic twin of the prompt service, and the QoS profiles of the node and its clients."""

from __future__ import annotations

import numpy as np
from geometry_msgs.msg import Point, Vector3
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField
from visualization_msgs.msg import Marker, MarkerArray

from ovseg_interfaces.msg import LabelInfo, PromptQuery, PromptResult, Segmentation, TrackedObject, TrackedObjects
from ovseg_interfaces.srv import FindObjects, SegmentPrompt, SetVocabulary

from ..core.geometry import CLOUD_DTYPE, PairedDepth, Region3D
from ..core.overlay import palette
from ..core.pipeline import (
    ExemplarRequest,
    FoundObjects,
    FrameOutput,
    ObjectView,
    PromptOutcome,
    PromptRequest,
    frame_key,
)
from ..core.prompt import MAX_PROMPTS, Prompt, PromptError
from ..core.vocabulary import MAX_EXEMPLARS, Vocabulary, VocabularyError
from . import vision_messages
from .image_conversions import (
    ImageError,
    compressed_to_rgb,
    float_to_image,
    image_to_rgb,
    mono8_to_image,
    mono16_to_image,
    rgb_to_image,
    to_byte_array,
)

try:
    from sensor_msgs_py import point_cloud2
except ImportError:  # not on PyPI: the numpy packing below produces the same bytes
    point_cloud2 = None

# ---------------------------------------------------------------------- QoS
# Services answer every caller: requests queue (reliable, up to 100 waiting) while one is served; rclpy's default
# keeps 10, and a burst beyond that goes unanswered. Clients use it too, so a tool's own burst is not dropped
# before it leaves.
SERVICE_QOS = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
# label_info: the last vocabulary stays available to subscribers that join later.
LATCHED_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                         reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_DEPTH = 2  # per-camera outputs: a slow subscriber gets the newest, never a backlog


def image_qos(profile: str, depth: int, reliability: str = "") -> QoSProfile:
    """Camera subscription QoS: REP-2003's sensor-data profile (or the default one), reliability overridable."""
    qos = QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
    if profile == "sensor_data":
        qos.reliability = qos_profile_sensor_data.reliability
        qos.durability = qos_profile_sensor_data.durability
    if reliability:
        qos.reliability = ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return qos


# ---------------------------------------------------------------------- frames in
def decode_frame(msg: Image | CompressedImage, max_pixels: int) -> np.ndarray:
    """A camera frame -> (H, W, 3) uint8 RGB; ImageError says why it cannot be used."""
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb(msg, max_pixels=max_pixels)
    return image_to_rgb(msg, max_pixels=max_pixels)


# ---------------------------------------------------------------------- outputs
def frame_messages(output: FrameOutput) -> dict[str, object]:
    """Every message of one processed frame, by output topic (relative to its camera), each with the source
    header: labels, segmentation, and where the pipeline produced them overlay, labels_cloud, labels_markers,
    instances."""
    header, result = output.frame.header, output.result
    seg = segmentation_msg(header, result.labels, result.vocabulary_version, result.class_ids, result.class_names,
                           result.class_scores, result.class_areas, result.inference_ms)
    out: dict[str, object] = {"labels": seg.labels, "segmentation": seg}
    if output.overlay is not None:
        out["overlay"] = rgb_to_image(output.overlay, header)
    if output.settings.publish_confidence:
        out["confidence"] = float_to_image(result.confidence, header)
    if output.cloud is not None:
        out["labels_cloud"] = cloud_msg(header, output.depth, output.cloud)
    if output.regions is not None:
        out["labels_markers"] = markers_msg(header, output.depth, output.regions, len(output.vocabulary),
                                            output.settings.marker_boxes)
    if output.objects is not None:
        frame_id = output.depth.frame_id or header.frame_id if output.depth is not None else ""
        out["objects"] = objects_msg(header, output.vocabulary.version, output.objects, frame_id,
                                     output.settings.objects_embeddings)
        out["object_ids"] = mono16_to_image(output.object_ids, header)
        if output.depth is not None and output.settings.publish_markers:
            out["objects_markers"] = object_markers(header, output.depth, output.objects)
        if vision_messages.AVAILABLE:
            out["detections"] = vision_messages.detections_2d(header, output.objects)
            if output.depth is not None:
                out["detections_3d"] = vision_messages.detections_3d(header, output.objects, frame_id)
    if output.instances is not None:  # instance ids as class ids; the names are their labels
        answers = output.instance_answers
        out["instances"] = segmentation_msg(header, output.instances, output.vocabulary.version,
                                            [i + 1 for i in range(len(answers))], [a.labels[0] for a in answers],
                                            [a.label_scores[0] for a in answers],
                                            [float(a.mask.mean()) for a in answers])
    return out


def segmentation_msg(header, labels: np.ndarray, version: int, ids, names, scores, areas,
                     inference_ms: float = 0.0) -> Segmentation:
    """A Segmentation message whose mono16 label image carries the source header."""
    msg = Segmentation()
    msg.header = header
    msg.vocabulary_version = version
    msg.labels = mono16_to_image(labels, header)
    msg.class_ids, msg.class_names = list(ids), list(names)
    msg.class_scores, msg.class_areas = [float(s) for s in scores], [float(a) for a in areas]
    msg.inference_ms = float(inference_ms)
    return msg


def label_info_msg(vocabulary: Vocabulary, threshold: float, stamp) -> LabelInfo:
    msg = LabelInfo()
    msg.header.stamp = stamp
    msg.vocabulary_version = vocabulary.version
    msg.class_ids = list(range(len(vocabulary)))
    msg.class_names = vocabulary.display_names
    msg.threshold = float(threshold)
    return msg


def cloud_fields() -> list[PointField]:
    kinds = {"<f4": PointField.FLOAT32, "<u2": PointField.UINT16}
    return [PointField(name=name, offset=CLOUD_DTYPE.fields[name][1], datatype=kinds[CLOUD_DTYPE.fields[name][0].str],
                       count=1) for name in CLOUD_DTYPE.names]


def cloud_msg(header, depth: PairedDepth, cloud: np.ndarray) -> PointCloud2:
    """CLOUD_DTYPE points (x, y, z, rgb, label, score) as a PointCloud2 in the depth camera's frame."""
    if point_cloud2 is not None:  # robots: the ROS library (same layout), if it takes a structured array
        try:
            msg = point_cloud2.create_cloud(header, cloud_fields(), cloud)
            msg.header.frame_id = depth.frame_id or header.frame_id
            return msg
        except Exception:
            pass
    msg = PointCloud2()
    msg.header = header
    msg.header.frame_id = depth.frame_id or header.frame_id
    msg.height, msg.width = 1, len(cloud)
    msg.fields = cloud_fields()
    msg.is_bigendian = False
    msg.point_step = CLOUD_DTYPE.itemsize
    msg.row_step = msg.point_step * len(cloud)
    msg.is_dense = True
    msg.data = to_byte_array(cloud.view(np.uint8))
    return msg


def markers_msg(header, depth: PairedDepth, regions: list[Region3D], num_classes: int, boxes: bool,
                namespace: str = "ovseg") -> MarkerArray:
    """DELETEALL first (classes that vanished or a changed vocabulary leave nothing behind), then per class a
    text marker at its region's 3D centroid and, optionally, its extent as a translucent box."""
    frame_id = depth.frame_id or header.frame_id
    clear = Marker(action=Marker.DELETEALL, ns=namespace)
    clear.header.frame_id = frame_id
    markers = [clear]
    colours = palette(max(num_classes, 1))
    for region in regions:
        colour = colours[region.class_id] / 255.0
        text = Marker(type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, ns=namespace, id=2 * region.class_id)
        text.header = header
        text.header.frame_id = frame_id
        text.pose.position = Point(x=float(region.centroid[0]), y=float(region.centroid[1]),
                                   z=float(region.centroid[2]))
        text.pose.orientation.w = 1.0
        text.scale.z = 0.1
        text.color.r, text.color.g, text.color.b, text.color.a = (float(colour[0]), float(colour[1]),
                                                                  float(colour[2]), 1.0)
        text.text = region.name
        markers.append(text)
        if boxes:
            box = Marker(type=Marker.CUBE, action=Marker.ADD, ns=namespace, id=2 * region.class_id + 1)
            box.header = text.header
            box.pose = text.pose
            box.scale.x, box.scale.y, box.scale.z = (max(float(v), 0.01) for v in region.extent)
            box.color = text.color
            box.color.a = 0.25
            markers.append(box)
    return MarkerArray(markers=markers)


def tracked_object(view: ObjectView, depth_frame_id: str, with_embedding: bool) -> TrackedObject:
    msg = TrackedObject(id=view.id, label=view.label, class_id=view.class_id, score=float(view.score),
                        top_labels=list(view.top_labels), top_scores=[float(s) for s in view.top_scores],
                        box=[float(v) for v in view.box], state=view.state, age=view.age, hits=view.hits)
    if view.centroid is not None:
        msg.has_3d, msg.depth_frame_id = True, depth_frame_id
        msg.centroid = Point(x=float(view.centroid[0]), y=float(view.centroid[1]), z=float(view.centroid[2]))
        msg.extent = Vector3(x=float(view.extent[0]), y=float(view.extent[1]), z=float(view.extent[2]))
    if with_embedding:
        msg.embedding = [float(v) for v in view.embedding]
    return msg


def objects_msg(header, version: int, objects: list[ObjectView], depth_frame_id: str,
                with_embedding: bool) -> TrackedObjects:
    return TrackedObjects(header=header, vocabulary_version=version,
                          objects=[tracked_object(v, depth_frame_id, with_embedding) for v in objects])


def object_markers(header, depth: PairedDepth, objects: list[ObjectView], namespace: str = "ovseg_objects",
                   lifetime_s: float = 0.5) -> MarkerArray:
    """"#id label" at each tracked object's 3D centroid (DELETEALL first: vanished objects leave nothing)."""
    frame_id = depth.frame_id or header.frame_id
    clear = Marker(action=Marker.DELETEALL, ns=namespace)
    clear.header.frame_id = frame_id
    markers = [clear]
    colours = palette(max((v.id for v in objects), default=0) + 1)
    for view in objects:
        if view.centroid is None:
            continue
        colour = colours[view.id] / 255.0
        text = Marker(type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, ns=namespace, id=view.id)
        text.header = header
        text.header.frame_id = frame_id
        text.pose.position = Point(x=float(view.centroid[0]), y=float(view.centroid[1]), z=float(view.centroid[2]))
        text.pose.orientation.w = 1.0
        text.scale.z = 0.08
        text.color.r, text.color.g, text.color.b, text.color.a = (float(colour[0]), float(colour[1]),
                                                                  float(colour[2]), 1.0)
        text.text = f"#{view.id} {view.label}"
        text.lifetime.nanosec = int(lifetime_s * 1e9)
        markers.append(text)
    return MarkerArray(markers=markers)


def fill_find_response(response: FindObjects.Response, found: FoundObjects) -> None:
    header = found.header
    response.success = True
    if header is not None:
        response.header = header
    response.objects = [tracked_object(v, found.depth_frame_id or response.header.frame_id, True)
                        for v in found.objects]
    response.scores = [float(s) for s in found.scores]
    response.masks = [mono8_to_image(v.mask.astype(np.uint8) * 255, response.header) if v.visible else Image()
                      for v in found.objects]
    response.message = f"{len(found.objects)} objects ranked" + ("" if found.objects else " (no tracks yet)")


# ---------------------------------------------------------------------- vocabulary
def exemplar_requests(request: SetVocabulary.Request, max_pixels: int) -> list[ExemplarRequest]:
    """The request's example images: one per exemplar label, from exemplar_images or 4 numbers of
    exemplar_boxes each; VocabularyError / ImageError say what does not fit."""
    labels = list(request.exemplar_labels)
    if not labels:
        if len(request.exemplar_images) or len(request.exemplar_boxes):
            raise VocabularyError("example images or boxes were given without exemplar_labels")
        return []
    if len(labels) > MAX_EXEMPLARS:
        raise VocabularyError(f"{len(labels)} example images exceed the limit of {MAX_EXEMPLARS}")
    if len(request.exemplar_images):
        if len(request.exemplar_boxes):
            raise VocabularyError("give exemplar_images or exemplar_boxes, not both")
        if len(request.exemplar_images) != len(labels):
            raise VocabularyError(f"{len(labels)} exemplar_labels but {len(request.exemplar_images)} "
                                  "exemplar_images: give one image per label")
        examples = []
        for index, (label, image) in enumerate(zip(labels, request.exemplar_images, strict=True)):
            try:
                examples.append(ExemplarRequest(label, image=image_to_rgb(image, max_pixels)))
            except ImageError as exc:
                raise ImageError(f"exemplar_images[{index}]: {exc}") from None
        return examples
    boxes = np.asarray(request.exemplar_boxes, dtype=np.float32)
    if len(boxes) != 4 * len(labels):
        raise VocabularyError(f"{len(labels)} exemplar_labels need {4 * len(labels)} exemplar_boxes numbers "
                              f"(x1, y1, x2, y2 each), got {len(boxes)}")
    key = frame_key(request.exemplar_stamp)
    return [ExemplarRequest(label, box=box, camera=request.camera, key=None if key == (0, 0) else key)
            for label, box in zip(labels, boxes.reshape(-1, 4), strict=True)]


# ---------------------------------------------------------------------- prompts
def prompts_from_request(request: SegmentPrompt.Request) -> list[Prompt]:
    """Points join prompts by `point_groups` (empty: one prompt per point); box i joins prompt i. Refuses
    inconsistent arrays with a reason (coordinates are checked against the frame by the core)."""
    n_points = len(request.points)
    labels = np.asarray(request.point_labels, dtype=np.int64)
    if len(labels) != n_points:
        raise PromptError(f"{n_points} points but {len(labels)} point_labels: give one label per point")
    groups = np.asarray(request.point_groups, dtype=np.int64)
    if len(groups) and len(groups) != n_points:
        raise PromptError(f"{n_points} points but {len(groups)} point_groups: give one group per point or none")
    boxes = np.asarray(request.boxes, dtype=np.float32)
    if len(boxes) % 4:
        raise PromptError(f"boxes has {len(boxes)} numbers; it needs 4 per box (x1, y1, x2, y2)")
    boxes = boxes.reshape(-1, 4)
    if not len(groups):
        groups = np.arange(n_points)
    if len(groups) and groups.min() < 0:
        raise PromptError("point_groups must be >= 0")
    count = max(int(groups.max()) + 1 if len(groups) else 0, len(boxes))
    if count == 0:
        raise PromptError("no prompts: give at least one point or box")
    if count > MAX_PROMPTS:
        raise PromptError(f"{count} prompts exceed the limit of {MAX_PROMPTS} per request")
    points = np.array([[p.x, p.y] for p in request.points], dtype=np.float32).reshape(-1, 2)
    return [Prompt(points=points[groups == index], point_labels=labels[groups == index],
                   box=boxes[index] if index < len(boxes) else None) for index in range(count)]


def prompt_request(request: SegmentPrompt.Request, max_pixels: int) -> PromptRequest:
    """SegmentPrompt request -> core PromptRequest (the image decoded; stamp zero = the newest frame)."""
    core = PromptRequest(prompts=prompts_from_request(request), camera=request.camera,
                         vocabulary=list(request.vocabulary), multimask=request.multimask,
                         crop_fusion=request.crop_fusion)
    if request.image.height > 0:
        core.image = image_to_rgb(request.image, max_pixels)
        core.image_key, core.image_header = frame_key(request.image.header.stamp), request.image.header
    else:
        key = frame_key(request.stamp)
        core.key = None if key == (0, 0) else key
    return core


def fill_prompt_response(response: SegmentPrompt.Response, outcome: PromptOutcome, fallback_header) -> None:
    header = outcome.frame.header if outcome.frame.header is not None else fallback_header
    answers = outcome.answers
    response.header = header
    response.camera = outcome.camera
    response.masks = [mono8_to_image(a.mask.astype(np.uint8) * 255, header) for a in answers]
    response.labels = [a.labels[0] for a in answers]
    response.label_scores = [a.label_scores[0] for a in answers]
    response.mask_scores = [a.mask_score for a in answers]
    response.vocabulary_version = outcome.vocabulary_version
    response.top_k = len(answers[0].labels)
    response.top_labels = [name for a in answers for name in a.labels]
    response.top_scores = [score for a in answers for score in a.label_scores]
    if outcome.places is not None:
        response.depth_frame_id = outcome.frame.depth.frame_id or header.frame_id
        for place in outcome.places:
            response.has_3d.append(place is not None)
            centroid, extent = place if place is not None else (np.zeros(3), np.zeros(3))
            response.centroids.append(Point(x=float(centroid[0]), y=float(centroid[1]), z=float(centroid[2])))
            response.extents.append(Vector3(x=float(extent[0]), y=float(extent[1]), z=float(extent[2])))
    response.success = True
    key = outcome.frame.key
    where = f" of camera {outcome.camera}" if outcome.camera else ""
    response.message = f"{len(answers)} prompts answered on frame {key[0]}.{key[1]:09d}{where}"


def _shared_fields(source_type, target_type) -> list[str]:
    source = source_type.get_fields_and_field_types()
    return [name for name in target_type.get_fields_and_field_types() if name in source]


def request_from_query(query: PromptQuery) -> SegmentPrompt.Request:
    """The prompt topic's message as a service request: every field of the same name, the stamp from the header."""
    request = SegmentPrompt.Request()
    for name in _shared_fields(PromptQuery, SegmentPrompt.Request):
        setattr(request, name, getattr(query, name))
    request.stamp = query.header.stamp
    return request


def result_from_response(response: SegmentPrompt.Response, request_id: str) -> PromptResult:
    result = PromptResult(request_id=request_id)
    for name in _shared_fields(SegmentPrompt.Response, PromptResult):
        setattr(result, name, getattr(response, name))
    return result
