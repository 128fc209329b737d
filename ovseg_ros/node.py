"""ovseg_node: the ROS 2 adapter around the ROS-free core.

Callbacks only store the newest frame; one worker thread runs the model on it and publishes. A frame that is
replaced before the worker reaches it is counted as dropped. The vocabulary is one immutable object swapped
atomically, so every output carries exactly one vocabulary version.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult  # noqa: E402
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup  # noqa: E402
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import (  # noqa: E402
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from ovseg_interfaces.msg import LabelInfo, PromptQuery, PromptResult, Segmentation  # noqa: E402
from ovseg_interfaces.srv import GetVocabulary, SegmentPrompt, SetVocabulary  # noqa: E402

from .core.dense import DenseConfig, DenseSegmenter, PreparedVocabulary, SegmentationResult  # noqa: E402
from .core.overlay import blend, draw_prompt_answers  # noqa: E402
from .core.prompt import PromptError, PromptSegmenter  # noqa: E402
from .core.registry import ModelError, load_clip, load_sam  # noqa: E402
from .core.text_cache import TextEmbeddingCache  # noqa: E402
from .core.vocabulary import (  # noqa: E402
    DEFAULT_TEMPLATES,
    Vocabulary,
    VocabularyError,
    VocabularyLimits,
    load_vocabulary,
    make_vocabulary,
    save_vocabulary,
)
from .diagnostics import StreamStats, diagnostic_array  # noqa: E402
from .image_conversions import (  # noqa: E402
    ImageError,
    compressed_to_rgb,
    image_to_rgb,
    mono8_to_image,
    mono16_to_image,
    rgb_to_image,
)
from .prompt_requests import prompts_from_request  # noqa: E402

DEFAULT_VOCABULARY = ("grass", "water", "sky", "wall", "sand", "red circle", "blue square", "yellow triangle")


@dataclass
class _Frame:
    msg: Image
    received: float


class OvsegNode(Node):
    """Dense open-vocabulary segmentation of a camera stream, with a run-time vocabulary."""

    def __init__(self, **kwargs) -> None:
        super().__init__("ovseg", **kwargs)
        self._declare_parameters()
        self.stats = StreamStats()

        self.limits = VocabularyLimits(
            max_classes=self.get_parameter("max_classes").value,
            max_name_length=self.get_parameter("max_name_length").value,
        )
        self.segmenter = self._load_segmenter()
        self.prompter = self._load_prompter()
        vocabulary = self._initial_vocabulary()
        self._prepared: PreparedVocabulary = self.segmenter.prepare(vocabulary)
        self._vocab_lock = threading.Lock()  # serialises changes; readers just take the reference

        self._setup_publishers()
        self._setup_subscriptions_and_services()
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._slot: _Frame | None = None
        self._last_refusal: tuple[str, float] = ("", 0.0)
        self._frame_headers: dict[tuple[int, int], object] = {}
        self._slot_cond = threading.Condition()
        self._running = True
        self._worker = threading.Thread(target=self._work_loop, name="ovseg-worker", daemon=True)
        self._worker.start()
        self._publish_label_info()
        self.get_logger().info(
            f"ready: model {self.segmenter.encoder.model_id} on {self.segmenter.encoder.device}, "
            f"{len(vocabulary)} classes (vocabulary v{vocabulary.version}), variant {self.segmenter.config.variant}"
        )

    # ------------------------------------------------------------------ set-up
    def _declare_parameters(self) -> None:
        def declare(name: str, value, description: str, read_only: bool = False) -> None:
            self.declare_parameter(name, value, ParameterDescriptor(description=description, read_only=read_only))

        declare("clip_model", "ovseg-demo-clip",
                "CLIP model: a models/manifest.yaml name, an open_clip architecture (random init), or ARCH:/path",
                read_only=True)
        declare("device", "cpu", "torch device: cpu, cuda, cuda:N", read_only=True)
        declare("dense_variant", "plain", "last-block variant: plain, maskclip, clearclip, sclip, naclip")
        declare("input_size", 0, "short side fed to the image tower in pixels; 0 = the model's native size")
        declare("score_threshold", 0.0, "pixels whose class probability is below this are unlabelled (65535)")
        declare("vocabulary", list(DEFAULT_VOCABULARY), "initial class names (';' separates synonyms)")
        declare("prompt_templates", list(DEFAULT_TEMPLATES), "prompt templates, each with one '{}'")
        declare("vocabulary_file", "", "JSON file the vocabulary is saved to on every change and restored from "
                "at start; empty = no persistence", read_only=True)
        declare("max_classes", 1000, "largest vocabulary accepted", read_only=True)
        declare("max_name_length", 128, "longest class name accepted", read_only=True)
        declare("input_type", "raw", "raw: sensor_msgs/Image on `image`; compressed: CompressedImage (jpeg, png) "
                "on `image/compressed`", read_only=True)
        declare("max_image_pixels", 4096 * 4096, "larger frames are refused (protects memory on a robot)")
        declare("image_qos", "sensor_data", "QoS of the image subscription: sensor_data or default", read_only=True)
        declare("qos_depth", 1, "queue depth of the image subscription", read_only=True)
        declare("publish_overlay", True, "publish the rgb8 colour overlay for rviz")
        declare("overlay_alpha", 0.5, "opacity of the class colours in the overlay")
        declare("sam_model", "ovseg-demo-sam",
                "SAM for prompts: a manifest name or ARCH:/path (demo, vit_b, vit_l, vit_h, vit_t); empty disables",
                read_only=True)
        declare("frame_cache_size", 4, "recent frames kept for prompt queries by stamp", read_only=True)
        declare("eager_sam", False, "compute SAM's image embedding for every frame instead of on the first prompt",
                read_only=True)
        declare("prompt_top_k", 3, "labels returned per prompt", read_only=True)
        declare("segment_everything", False, "also publish a point-grid instance segmentation (`instances`)")
        declare("everything_points_per_side", 16, "point grid of the segment-everything mode", read_only=True)
        declare("text_cache_dir", "", "directory for the on-disk text-embedding cache; empty = memory only",
                read_only=True)

    def _initial_vocabulary(self) -> Vocabulary:
        """The persisted vocabulary if there is a valid one (a restart keeps what the operator set)."""
        path = self.get_parameter("vocabulary_file").value
        if path and os.path.exists(path):
            try:
                vocabulary = load_vocabulary(path, self.limits)
                self.get_logger().info(f"restored vocabulary v{vocabulary.version} ({len(vocabulary)} classes) "
                                       f"from {path}")
                return vocabulary
            except VocabularyError as exc:
                self.get_logger().error(f"{exc}; using the `vocabulary` parameter instead")
        return make_vocabulary(list(self.get_parameter("vocabulary").value),
                               list(self.get_parameter("prompt_templates").value), limits=self.limits)

    def _load_segmenter(self) -> DenseSegmenter:
        name = self.get_parameter("clip_model").value
        device = self.get_parameter("device").value
        try:
            encoder = load_clip(name, device=device)
        except ModelError as exc:
            self.get_logger().fatal(str(exc))
            raise
        if encoder.model_id.split("@")[1].startswith("random"):
            self.get_logger().warning(f"CLIP '{name}' runs with seeded random weights: the labels mean nothing")
        config = DenseConfig(
            variant=self.get_parameter("dense_variant").value,
            input_size=self.get_parameter("input_size").value,
            score_threshold=self.get_parameter("score_threshold").value,
        )
        cache = TextEmbeddingCache(encoder.encode_text, encoder.model_id,
                                   self.get_parameter("text_cache_dir").value or None)
        return DenseSegmenter(encoder, cache, config)

    def _load_prompter(self) -> PromptSegmenter | None:
        name = self.get_parameter("sam_model").value
        if not name:
            self.get_logger().info("sam_model is empty: segment_prompt is disabled")
            return None
        try:
            sam = load_sam(name, device=self.get_parameter("device").value)
        except ModelError as exc:
            self.get_logger().fatal(str(exc))
            raise
        return PromptSegmenter(sam, self.segmenter.encoder,
                               cache_size=self.get_parameter("frame_cache_size").value,
                               eager_sam=self.get_parameter("eager_sam").value,
                               top_k=self.get_parameter("prompt_top_k").value)

    def _setup_publishers(self) -> None:
        self.pub_labels = self.create_publisher(Image, "labels", 2)
        self.pub_segmentation = self.create_publisher(Segmentation, "segmentation", 2)
        self.pub_overlay = self.create_publisher(Image, "overlay", 2)
        latched = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_label_info = self.create_publisher(LabelInfo, "label_info", latched)
        self.pub_instances = self.create_publisher(Segmentation, "instances", 2)
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics)

    def _setup_subscriptions_and_services(self) -> None:
        qos_name = self.get_parameter("image_qos").value
        depth = self.get_parameter("qos_depth").value
        if qos_name == "sensor_data":
            qos = QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                             reliability=qos_profile_sensor_data.reliability,
                             durability=qos_profile_sensor_data.durability)
        elif qos_name == "default":
            qos = QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        else:
            raise ValueError(f"image_qos must be 'sensor_data' or 'default', got {qos_name!r}")
        input_type = self.get_parameter("input_type").value
        if input_type == "raw":
            self.create_subscription(Image, "image", self._on_image, qos)
        elif input_type == "compressed":
            self.create_subscription(CompressedImage, "image/compressed", self._on_image, qos)
        else:
            raise ValueError(f"input_type must be 'raw' or 'compressed', got {input_type!r}")
        services = MutuallyExclusiveCallbackGroup()  # text encoding never blocks the image callback
        self.create_service(SetVocabulary, "set_vocabulary", self._on_set_vocabulary, callback_group=services)
        self.create_service(GetVocabulary, "get_vocabulary", self._on_get_vocabulary, callback_group=services)
        if self.prompter is not None:
            prompts_group = MutuallyExclusiveCallbackGroup()
            self.create_service(SegmentPrompt, "segment_prompt", self._on_segment_prompt,
                                callback_group=prompts_group)
            self.pub_prompt_result = self.create_publisher(PromptResult, "prompt_result", 10)
            self.create_subscription(PromptQuery, "prompt", self._on_prompt_topic, 10, callback_group=prompts_group)

    # ------------------------------------------------------------------ callbacks
    def _on_image(self, msg: Image | CompressedImage) -> None:
        with self._slot_cond:
            self.stats.on_received(replaced_unprocessed=self._slot is not None)
            self._slot = _Frame(msg, time.monotonic())
            self._slot_cond.notify()

    def _on_set_vocabulary(self, request: SetVocabulary.Request, response: SetVocabulary.Response):
        ok, message, version = self.set_vocabulary(list(request.labels), list(request.prompt_templates))
        response.success, response.message, response.vocabulary_version = ok, message, version
        return response

    def _on_get_vocabulary(self, request: GetVocabulary.Request, response: GetVocabulary.Response):
        vocabulary = self._prepared.vocabulary
        response.labels = list(vocabulary.labels)
        response.prompt_templates = list(vocabulary.templates)
        response.vocabulary_version = vocabulary.version
        return response

    def set_vocabulary(self, labels, templates) -> tuple[bool, str, int]:
        """Validate, embed, swap. Returns (success, message, current version); never raises."""
        with self._vocab_lock:
            current = self._prepared
            try:
                vocabulary = make_vocabulary(labels, templates, previous=current.vocabulary, limits=self.limits)
                prepared = self.segmenter.prepare(vocabulary)
            except VocabularyError as exc:
                self.get_logger().warning(f"set_vocabulary refused: {exc}")
                return False, str(exc), current.version
            except Exception as exc:  # text encoding failure must not take the node down
                self.get_logger().error(f"set_vocabulary failed while embedding: {exc!r}")
                return False, f"embedding the vocabulary failed: {exc}", current.version
            self._prepared = prepared
            self._persist(vocabulary)
        self._publish_label_info()
        message = f"vocabulary v{vocabulary.version}: {len(vocabulary)} classes"
        self.get_logger().info(message)
        return True, message, vocabulary.version

    def _persist(self, vocabulary: Vocabulary) -> None:
        path = self.get_parameter("vocabulary_file").value
        if not path:
            return
        try:
            save_vocabulary(vocabulary, path)
        except OSError as exc:  # the change itself succeeded; say that persistence did not
            self.get_logger().error(f"could not save the vocabulary to {path}: {exc}")

    def _on_set_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "score_threshold" and not 0.0 <= float(param.value) <= 1.0:
                return SetParametersResult(successful=False, reason="score_threshold must be in [0, 1]")
            if param.name == "overlay_alpha" and not 0.0 <= float(param.value) <= 1.0:
                return SetParametersResult(successful=False, reason="overlay_alpha must be in [0, 1]")
            if param.name == "dense_variant":
                try:
                    DenseConfig(variant=param.value)
                except ValueError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        for param in params:
            if param.name in ("score_threshold", "dense_variant", "input_size"):
                fields = dict(self.segmenter.config.__dict__)
                fields[param.name if param.name != "dense_variant" else "variant"] = param.value
                self.segmenter.config = DenseConfig(**fields)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ worker
    def _work_loop(self) -> None:
        while True:
            with self._slot_cond:
                while self._slot is None and self._running:
                    self._slot_cond.wait(timeout=0.5)
                if not self._running:
                    return
                frame, self._slot = self._slot, None
            try:
                self._process(frame)
            except ImageError as exc:
                self._report_refusal(f"frame refused: {exc}", error=False)
            except Exception as exc:  # one bad frame must never stop the stream
                self._report_refusal(f"frame failed: {exc!r}", error=True)

    def _report_refusal(self, message: str, error: bool) -> None:
        """Count every refusal; log a new reason at once, repeats of the same reason at most every 5 s."""
        self.stats.on_rejected(message)
        now = time.monotonic()
        if message == self._last_refusal[0] and now - self._last_refusal[1] < 5.0:
            return
        self._last_refusal = (message, now)
        (self.get_logger().error if error else self.get_logger().warning)(message)

    def _process(self, frame: _Frame) -> None:
        limit = int(self.get_parameter("max_image_pixels").value)
        if isinstance(frame.msg, CompressedImage):
            rgb = compressed_to_rgb(frame.msg, max_pixels=limit)
        else:
            rgb = image_to_rgb(frame.msg, max_pixels=limit)
        prepared = self._prepared  # one reference for the whole frame: outputs never mix versions
        result = self.segmenter.segment(rgb, prepared)
        self._publish(frame.msg, rgb, result, prepared)
        if self.prompter is not None:
            stamp = frame.msg.header.stamp
            self.prompter.add_frame((stamp.sec, stamp.nanosec), rgb, result.dense_features)
            self._frame_headers[(stamp.sec, stamp.nanosec)] = frame.msg.header
            while len(self._frame_headers) > self.prompter.cache_size:
                self._frame_headers.pop(next(iter(self._frame_headers)))
            if self.get_parameter("segment_everything").value:
                self._publish_everything(frame.msg.header, prepared)
        self.stats.on_processed(frame.received)

    def _publish(self, source: Image, rgb, result: SegmentationResult, prepared: PreparedVocabulary) -> None:
        header = source.header
        labels_msg = mono16_to_image(result.labels, header)
        seg = Segmentation()
        seg.header = header
        seg.vocabulary_version = result.vocabulary_version
        seg.labels = labels_msg
        seg.class_ids = result.class_ids
        seg.class_names = result.class_names
        seg.class_scores = result.class_scores
        seg.class_areas = result.class_areas
        seg.inference_ms = float(result.inference_ms)
        self.pub_labels.publish(labels_msg)
        self.pub_segmentation.publish(seg)
        if self.get_parameter("publish_overlay").value:
            overlay = blend(rgb, result.labels, len(prepared.vocabulary),
                            alpha=float(self.get_parameter("overlay_alpha").value),
                            names=prepared.vocabulary.display_names, class_ids=result.class_ids)
            self.pub_overlay.publish(rgb_to_image(overlay, header))

    def _on_segment_prompt(self, request: SegmentPrompt.Request, response: SegmentPrompt.Response):
        try:
            self._answer_prompt(request, response)
        except (PromptError, ImageError, VocabularyError) as exc:
            response.success, response.message = False, str(exc)
            self.get_logger().warning(f"segment_prompt refused: {exc}")
        except Exception as exc:  # never let one request take the node down
            response.success, response.message = False, f"segment_prompt failed: {exc!r}"
            self.get_logger().error(response.message)
        return response

    def _on_prompt_topic(self, query: PromptQuery) -> None:
        request = SegmentPrompt.Request()
        request.stamp = query.header.stamp
        for name in ("points", "point_labels", "point_groups", "boxes", "vocabulary", "multimask", "crop_fusion"):
            setattr(request, name, getattr(query, name))
        response = self._on_segment_prompt(request, SegmentPrompt.Response())
        result = PromptResult(request_id=query.request_id)
        for name in ("success", "message", "header", "masks", "labels", "label_scores", "mask_scores",
                     "vocabulary_version", "top_k", "top_labels", "top_scores"):
            setattr(result, name, getattr(response, name))
        self.pub_prompt_result.publish(result)

    def _answer_prompt(self, request: SegmentPrompt.Request, response: SegmentPrompt.Response) -> None:
        prepared = self._prepared
        version = prepared.version
        if len(request.vocabulary):
            override = make_vocabulary(list(request.vocabulary), [], previous=prepared.vocabulary,
                                       limits=self.limits)
            prepared = self.segmenter.prepare(override)
            version = 0
        if request.image.height > 0:
            rgb = image_to_rgb(request.image)
            key = (request.image.header.stamp.sec, request.image.header.stamp.nanosec)
            height, width = rgb.shape[:2]
            dense_shape = self.segmenter.model_input_shape(height, width)
            self.prompter.add_frame(key, rgb, dense_input_shape=dense_shape)
            self._frame_headers[key] = request.image.header
        else:
            key = (request.stamp.sec, request.stamp.nanosec)
            key = None if key == (0, 0) else key
        cached = self.prompter.frame(key)
        height, width = cached.image.shape[:2]
        prompts = prompts_from_request(request, height, width)
        frame, answers = self.prompter.query(cached.key, prompts, prepared, multimask=request.multimask,
                                             crop_fusion=request.crop_fusion)
        header = self._frame_headers.get(frame.key)
        if header is None:
            header = request.image.header
        response.header = header
        response.masks = [mono8_to_image(a.mask.astype("uint8") * 255, header) for a in answers]
        response.labels = [a.labels[0] for a in answers]
        response.label_scores = [a.label_scores[0] for a in answers]
        response.mask_scores = [a.mask_score for a in answers]
        response.vocabulary_version = version
        response.top_k = len(answers[0].labels)
        response.top_labels = [name for a in answers for name in a.labels]
        response.top_scores = [score for a in answers for score in a.label_scores]
        response.success = True
        response.message = f"{len(answers)} prompts answered on frame {frame.key[0]}.{frame.key[1]:09d}"
        if self.get_parameter("publish_overlay").value:
            overlay = draw_prompt_answers(frame.image, answers, prompts)
            self.pub_overlay.publish(rgb_to_image(overlay, header))

    def _publish_everything(self, header, prepared: PreparedVocabulary) -> None:
        key = (header.stamp.sec, header.stamp.nanosec)
        instances, answers = self.prompter.segment_everything(
            key, prepared, points_per_side=self.get_parameter("everything_points_per_side").value)
        msg = Segmentation()
        msg.header = header
        msg.vocabulary_version = prepared.version
        msg.labels = mono16_to_image(instances, header)
        msg.class_ids = [i + 1 for i in range(len(answers))]  # instance ids; the names are their labels
        msg.class_names = [a.labels[0] for a in answers]
        msg.class_scores = [a.label_scores[0] for a in answers]
        msg.class_areas = [float(a.mask.mean()) for a in answers]
        self.pub_instances.publish(msg)

    def _publish_diagnostics(self) -> None:
        extra = {"vocabulary_version": str(self._prepared.version), "classes": str(len(self._prepared.vocabulary)),
                 "device": str(self.segmenter.encoder.device), "backend": "torch",
                 "model": self.segmenter.encoder.model_id}
        self.pub_diagnostics.publish(diagnostic_array(self.get_clock().now().to_msg(), self.get_fully_qualified_name(),
                                                      self.stats.snapshot(), extra, self.stats.last_error))

    def _publish_label_info(self) -> None:
        vocabulary = self._prepared.vocabulary
        msg = LabelInfo()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.vocabulary_version = vocabulary.version
        msg.class_ids = list(range(len(vocabulary)))
        msg.class_names = vocabulary.display_names
        msg.threshold = float(self.segmenter.config.score_threshold)
        self.pub_label_info.publish(msg)

    def stop(self) -> None:
        with self._slot_cond:
            self._running = False
            self._slot_cond.notify_all()
        self._worker.join(timeout=5.0)


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = None
    try:
        node = OvsegNode()
        executor = MultiThreadedExecutor(num_threads=2)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ModelError:
        return 1
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
