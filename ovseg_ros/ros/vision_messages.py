"""The node's outputs as standard `vision_msgs` (4.x: Humble, Jazzy, Kilted), for consumers that know no
ovseg_interfaces: trackers, planners, Foxglove panels, Isaac ROS nodes.

Per camera, next to its `labels` image:
- `vision_label_info` (LabelInfo, transient-local): pixel value -> class name of the label image. The node's own
  `label_info` topic keeps the versioned ovseg_interfaces message, so the standard one has its own name.
- `detections` (Detection2DArray): one Detection2D per published track; `id` is the track id, `results` the
  track's top labels with their evidence shares (best first), `bbox` its pixel box.
- `detections_3d` (Detection3DArray), with depth: the tracks with a 3D place; `bbox` centred on the centroid
  (median of the mask's depth), sized by the 5-95 % extent, in the depth frame.

A hypothesis' `class_id` is the class *name*: ids of an open vocabulary change with every `set_vocabulary`,
names do not (the label image's numbers map to names through `vision_label_info`).
"""

from __future__ import annotations

try:
    from vision_msgs.msg import (
        BoundingBox2D,
        BoundingBox3D,
        Detection2D,
        Detection2DArray,
        Detection3D,
        Detection3DArray,
        LabelInfo,
        ObjectHypothesisWithPose,
        VisionClass,
    )
except ImportError:  # robots: ros-<distro>-vision-msgs (rosdep key vision_msgs); the rest is published anyway
    Detection2DArray = Detection3DArray = LabelInfo = None

from ..core.pipeline import ObjectView
from ..core.vocabulary import Vocabulary

AVAILABLE = LabelInfo is not None
MISSING_REASON = ("vision_msgs is not installed: the standard outputs (vision_label_info, detections, "
                  "detections_3d) are not published; install ros-<distro>-vision-msgs for them")
TOPICS = {"vision_label_info": LabelInfo, "detections": Detection2DArray}  # per camera; detections_3d with depth


def label_info(vocabulary: Vocabulary, threshold: float, header) -> LabelInfo:
    return LabelInfo(header=header, threshold=float(threshold),
                     class_map=[VisionClass(class_id=i, class_name=name)
                                for i, name in enumerate(vocabulary.display_names)])


def _hypotheses(view: ObjectView) -> list[ObjectHypothesisWithPose]:
    results = []
    for label, score in zip(view.top_labels, view.top_scores, strict=True):
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id, hypothesis.hypothesis.score = label, float(score)
        if view.centroid is not None:
            hypothesis.pose.pose.position.x, hypothesis.pose.pose.position.y, hypothesis.pose.pose.position.z = (
                float(v) for v in view.centroid)
            hypothesis.pose.pose.orientation.w = 1.0
        results.append(hypothesis)
    return results


def detections_2d(header, objects: list[ObjectView]) -> Detection2DArray:
    detections = []
    for view in objects:
        x1, y1, x2, y2 = (float(v) for v in view.box)
        box = BoundingBox2D(size_x=x2 - x1, size_y=y2 - y1)
        box.center.position.x, box.center.position.y = (x1 + x2) / 2, (y1 + y2) / 2
        detections.append(Detection2D(header=header, results=_hypotheses(view), bbox=box, id=str(view.id)))
    return Detection2DArray(header=header, detections=detections)


def detections_3d(header, objects: list[ObjectView], depth_frame_id: str) -> Detection3DArray:
    """Objects with a 3D place, in `depth_frame_id` (the frame the centroids were computed in)."""
    from std_msgs.msg import Header

    in_depth = Header(stamp=header.stamp, frame_id=depth_frame_id or header.frame_id)
    detections = []
    for view in objects:
        if view.centroid is None:
            continue
        box = BoundingBox3D()
        box.center.position.x, box.center.position.y, box.center.position.z = (float(v) for v in view.centroid)
        box.center.orientation.w = 1.0
        box.size.x, box.size.y, box.size.z = (float(v) for v in view.extent)
        detections.append(Detection3D(header=in_depth, results=_hypotheses(view), bbox=box, id=str(view.id)))
    return Detection3DArray(header=in_depth, detections=detections)
