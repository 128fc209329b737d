"""ovseg_node: the ROS 2 adapter around the ROS-free core.

Callbacks only store the newest frame of each camera; one worker thread takes the newest frame of every camera,
runs the model on them in one batch and publishes. A frame that is replaced before the worker reaches it is
counted as dropped. The vocabulary is one immutable object swapped atomically, so every output carries exactly
one vocabulary version.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import Point, Vector3  # noqa: E402
from rcl_interfaces.msg import SetParametersResult  # noqa: E402
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup  # noqa: E402
from rclpy.exceptions import ParameterException  # noqa: E402
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor  # noqa: E402
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn  # noqa: E402
from rclpy.qos import (  # noqa: E402
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from ovseg_interfaces.msg import LabelInfo, PromptQuery, PromptResult, Segmentation  # noqa: E402
from ovseg_interfaces.srv import GetVocabulary, SegmentPrompt, SetVocabulary  # noqa: E402

from .cameras import Camera, CameraNameError, Frame, normalise_camera_name, parse_camera_names  # noqa: E402
from .core.backends import BackendUnavailable  # noqa: E402
from .core.dense import (  # noqa: E402
    DenseConfig,
    DenseSegmenter,
    PreparedVocabulary,
    SegmentationResult,
)
from .core.geometry import DepthError, region_centroid  # noqa: E402
from .core.overlay import blend, draw_prompt_answers  # noqa: E402
from .core.prompt import PromptError, PromptSegmenter  # noqa: E402
from .core.registry import ModelError, load_clip, load_sam  # noqa: E402
from .core.text_cache import TextEmbeddingCache  # noqa: E402
from .core.vocabulary import (  # noqa: E402
    Vocabulary,
    VocabularyError,
    VocabularyLimits,
    load_vocabulary,
    make_vocabulary,
    save_vocabulary,
)
from .depth_output import DepthPairer, PairedDepth, class_markers, labelled_cloud  # noqa: E402
from .diagnostics import diagnostic_array, diagnostic_status  # noqa: E402
from .image_conversions import (  # noqa: E402
    ImageError,
    compressed_to_rgb,
    image_to_rgb,
    mono8_to_image,
    mono16_to_image,
    rgb_to_image,
)
from .parameters import (  # noqa: E402
    DENSE_PARAMETERS,
    SPEC_BY_NAME,
    SPECS,
    dense_config,
    preset_defaults,
)
from .prompt_requests import prompts_from_request  # noqa: E402
from .qos import SERVICE_QOS  # noqa: E402


class OvsegNode(LifecycleNode):
    """Dense open-vocabulary segmentation of a camera stream, with a run-time vocabulary and prompts.

    A lifecycle node: configure loads and warms up the models, activate subscribes to the camera, deactivate
    unsubscribes, cleanup releases the models. With `autostart` (the default) it does configure + activate by
    itself, like a plain node.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("ovseg", **kwargs)
        self.startup_error = self._declare_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.cameras: list[Camera] = []
        self.limits = VocabularyLimits(max_classes=self.get_parameter("max_classes").value,
                                       max_name_length=self.get_parameter("max_name_length").value)
        self.segmenter: DenseSegmenter | None = None
        self.prompter: PromptSegmenter | None = None
        self.requests = Camera("requests")  # the prompt frame cache of images sent with requests
        self._prepared: PreparedVocabulary | None = None
        self._vocab_lock = threading.Lock()  # serialises changes; readers just take the reference
        self._slot_cond = threading.Condition()  # guards every camera's slot
        self._last_logged: dict[str, tuple[str, float]] = {}  # channel -> (message, when)
        self._last_processed = 0.0
        self._last_batch = 0  # frames in the last image-tower pass (one per camera with a new frame)
        self._worker: threading.Thread | None = None
        self._running = False
        self._configured_entities: list = []
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics)
        self.configure_failed = False
        if self.startup_error:
            self.get_logger().fatal(f"configure failed: {self.startup_error}")
            self.configure_failed = True
        elif self.get_parameter("autostart").value:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                self.configure_failed = True
            else:
                self.trigger_activate()

    # ------------------------------------------------------------------ lifecycle
    def _declare_parameters(self) -> str | None:
        """Declare every parameter, the preset's values as defaults (so values given explicitly override them).
        Returns the first problem with a given value (wrong type, out of range, not a choice): configure then
        fails with that one reason instead of a traceback."""
        problems: list[str] = []

        def declare(spec, default):
            try:
                return self.declare_parameter(spec.name, default, spec.descriptor()).value
            except ParameterException as exc:
                problems.append(f"parameter {spec.name}: {exc}")
                return self.declare_parameter(spec.name, default, spec.descriptor(), ignore_override=True).value

        preset_spec = SPEC_BY_NAME["preset"]
        self.preset = declare(preset_spec, preset_spec.default)
        reason = preset_spec.check(self.preset)
        if reason:
            problems.append(reason)
            self.preset = preset_spec.default
        defaults = preset_defaults(self.preset)
        for spec in SPECS:
            if spec.name != "preset":
                reason = spec.check(declare(spec, defaults[spec.name]))
                if reason:
                    problems.append(reason)
        return problems[0] if problems else None

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.startup_error:
            self.get_logger().fatal(f"configure failed: {self.startup_error}")
            return TransitionCallbackReturn.FAILURE
        try:
            self.cameras = [Camera(name) for name in parse_camera_names(self.get_parameter("cameras").value)]
            self.segmenter = self._load_segmenter()
            self.prompter = self._load_prompter()
            self._check_refinement(self.segmenter.config)
            vocabulary = self._initial_vocabulary()
            self._prepared = self.segmenter.prepare(vocabulary)
            self._warm_up()
        except (ModelError, VocabularyError, CameraNameError, ValueError) as exc:
            self.get_logger().fatal(f"configure failed: {exc}")
            self._release_models()
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # anything else (a cache folder that cannot be made, ...): still one line, why
            self.get_logger().fatal(f"configure failed: {type(exc).__name__}: {exc}")
            self._release_models()
            return TransitionCallbackReturn.FAILURE
        if self.prompter is not None:  # one SAM and one CLIP; a frame cache per camera
            self.cameras[0].prompter = self.prompter
            for camera in self.cameras[1:]:
                camera.prompter = self.prompter.for_another_camera()
            # Images that prompt requests bring get a cache of their own: never mixed with a camera's frames.
            self.requests = Camera("requests", prompter=self.prompter.for_another_camera())
        self._setup_publishers()
        self._setup_services()
        if self.get_parameter("use_depth").value:
            self._create_depth_subscriptions()
        self._running = True
        self._worker = threading.Thread(target=self._work_loop, name="ovseg-worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"configured: model {self.segmenter.encoder.model_id} on {self.segmenter.encoder.device}, "
            f"{len(vocabulary)} classes (vocabulary v{vocabulary.version}, {len(vocabulary.templates)} templates), "
            f"variant {self.segmenter.config.variant}, prompts {'on' if self.prompter else 'off'}, cameras: "
            f"{', '.join(c.name for c in self.cameras) if self.cameras[0].name else 'one (image)'}")
        self.get_logger().info(f"preset {self.preset}: {self.effective_settings()}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for camera in self.cameras:
            camera.subscription = self._create_image_subscription(camera)
        result = super().on_activate(state)
        self._publish_label_info()
        self.get_logger().info("active: segmenting the camera stream")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for camera in self.cameras:
            if camera.subscription is not None:
                self.destroy_subscription(camera.subscription)
                camera.subscription = None
        with self._slot_cond:
            for camera in self.cameras:
                camera.slot = None
        self.get_logger().info("inactive: cameras unsubscribed")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        for kind, entity in self._configured_entities:
            if kind == "service":
                self.destroy_service(entity)
            elif kind == "publisher":
                self.destroy_lifecycle_publisher(entity)
            else:
                self.destroy_subscription(entity)
        self._configured_entities.clear()
        self.cameras = []
        self._release_models()
        self.get_logger().info("cleaned up: models released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._release_models()
        return TransitionCallbackReturn.SUCCESS

    def _release_models(self) -> None:
        self.segmenter = self.prompter = None
        self.requests = Camera("requests")
        self._prepared = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _warm_up(self) -> None:
        """One pass at start so the first camera frame does not pay for lazy initialisation."""
        self.segmenter.segment(np.zeros((64, 64, 3), np.uint8), self._prepared)

    def _stop_worker(self) -> None:
        with self._slot_cond:
            self._running = False
            self._slot_cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=10.0)
            self._worker = None

    # ------------------------------------------------------------------ set-up
    def _initial_vocabulary(self) -> Vocabulary:
        """The persisted vocabulary if there is a valid one (a restart keeps what the operator set)."""
        path = self._vocabulary_path()
        if path and os.path.exists(path):
            try:
                vocabulary = load_vocabulary(path, self.limits)
                self.get_logger().info(f"restored vocabulary v{vocabulary.version} ({len(vocabulary)} classes) "
                                       f"from {path}")
                return vocabulary
            except VocabularyError as exc:
                aside = set_aside(path)
                self.get_logger().warning(f"{exc}; moved it to {aside} and using the `vocabulary` parameter instead")
        return make_vocabulary(list(self.get_parameter("vocabulary").value),
                               list(self.get_parameter("prompt_templates").value), limits=self.limits)

    def _load_segmenter(self) -> DenseSegmenter:
        name = self.get_parameter("clip_model").value
        encoder = load_clip(name, device=self.get_parameter("device").value)
        if encoder.model_id.split("@")[1].startswith("random"):
            self.get_logger().warning(f"CLIP '{name}' runs with seeded random weights: the labels mean nothing")
        cache = TextEmbeddingCache(encoder.encode_text, encoder.model_id,
                                   self.get_parameter("text_cache_dir").value or None)
        engine_dir = self.get_parameter("engine_cache_dir").value or None
        segmenter = DenseSegmenter(encoder, cache, self._dense_config({}), backend=self.get_parameter("backend").value,
                                   engine_cache_dir=engine_dir)
        try:
            runner = segmenter.runner()
        except BackendUnavailable as exc:
            raise ModelError(f"backend '{segmenter.backend}' cannot run here: {exc}") from exc
        self.get_logger().info(f"image tower backend: {runner.name}")
        return segmenter

    def _dense_config(self, changes: dict) -> DenseConfig:
        return dense_config({name: changes[name] if name in changes else self.get_parameter(name).value
                             for name in DENSE_PARAMETERS})

    def _check_refinement(self, config: DenseConfig) -> None:
        if config.refinement == "sam" and self.prompter is None:
            raise ValueError("refinement 'sam' refines the dense labels with SAM and needs sam_model (it is empty)")

    def effective_settings(self) -> str:
        """The dense settings in force, each marked with '*' where it differs from the preset's value."""
        preset = preset_defaults(self.preset)
        parts = []
        for name in ["clip_model", *sorted(DENSE_PARAMETERS)]:
            value = self.get_parameter(name).value
            value = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "tolist") else value
            parts.append(f"{name}={value}{'' if value == preset[name] else '*'}")
        return " ".join(parts) + " (* = set explicitly, not the preset's)"

    def _load_prompter(self) -> PromptSegmenter | None:
        name = self.get_parameter("sam_model").value
        if not name:
            self.get_logger().info("sam_model is empty: segment_prompt is disabled")
            return None
        sam = load_sam(name, device=self.get_parameter("device").value)
        return PromptSegmenter(sam, self.segmenter.encoder,
                               cache_size=self.get_parameter("frame_cache_size").value,
                               eager_sam=self.get_parameter("eager_sam").value,
                               top_k=self.get_parameter("prompt_top_k").value)

    def _setup_publishers(self) -> None:
        def publisher(msg_type, topic: str, qos):
            pub = self.create_lifecycle_publisher(msg_type, topic, qos)
            self._configured_entities.append(("publisher", pub))
            return pub

        per_camera = {"labels": Image, "segmentation": Segmentation, "overlay": Image, "instances": Segmentation}
        if self.get_parameter("use_depth").value:
            per_camera.update(labels_cloud=PointCloud2, labels_markers=MarkerArray)
        for camera in self.cameras:
            camera.publishers = {base: publisher(msg_type, camera.topic(base), 2)
                                 for base, msg_type in per_camera.items()}
        latched = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_label_info = publisher(LabelInfo, "label_info", latched)  # one vocabulary for every camera
        self.pub_prompt_result = publisher(PromptResult, "prompt_result", 10)

    def _image_qos(self) -> QoSProfile:
        depth = self.get_parameter("qos_depth").value
        if self.get_parameter("image_qos").value == "sensor_data":
            qos = QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                             reliability=qos_profile_sensor_data.reliability,
                             durability=qos_profile_sensor_data.durability)
        else:
            qos = QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        override = self.get_parameter("image_reliability").value
        if override:
            qos.reliability = ReliabilityPolicy.RELIABLE if override == "reliable" else ReliabilityPolicy.BEST_EFFORT
        return qos

    def _create_depth_subscriptions(self) -> None:
        for camera in self.cameras:
            camera.depth = depth = DepthPairer(self.get_parameter("depth_buffer_size").value,
                                               self.get_parameter("depth_tolerance_s").value)
            self._configured_entities += [
                ("subscription", self.create_subscription(Image, camera.topic("depth/image"), depth.add_depth,
                                                          self._image_qos())),
                ("subscription", self.create_subscription(CameraInfo, camera.topic("depth/camera_info"),
                                                          depth.add_info, 10)),
            ]

    def _create_image_subscription(self, camera: Camera):
        def store(msg: Image | CompressedImage) -> None:
            self._on_image(camera, msg)

        if self.get_parameter("input_type").value == "compressed":
            return self.create_subscription(CompressedImage, camera.topic("image/compressed"), store,
                                            self._image_qos())
        return self.create_subscription(Image, camera.topic("image"), store, self._image_qos())

    def _setup_services(self) -> None:
        services = MutuallyExclusiveCallbackGroup()  # text encoding never blocks the image callback
        self._configured_entities += [
            ("service", self.create_service(SetVocabulary, "set_vocabulary", self._on_set_vocabulary,
                                            qos_profile=SERVICE_QOS, callback_group=services)),
            ("service", self.create_service(GetVocabulary, "get_vocabulary", self._on_get_vocabulary,
                                            qos_profile=SERVICE_QOS, callback_group=services)),
        ]
        if self.prompter is not None:
            prompts_group = MutuallyExclusiveCallbackGroup()
            self._configured_entities += [
                ("service", self.create_service(SegmentPrompt, "segment_prompt", self._on_segment_prompt,
                                                qos_profile=SERVICE_QOS, callback_group=prompts_group)),
                ("subscription", self.create_subscription(PromptQuery, "prompt", self._on_prompt_topic, 10,
                                                          callback_group=prompts_group)),
            ]

    # ------------------------------------------------------------------ callbacks
    def _on_image(self, camera: Camera, msg: Image | CompressedImage) -> None:
        with self._slot_cond:
            camera.stats.on_received(replaced_unprocessed=camera.slot is not None)
            camera.slot = Frame(msg)
            self._slot_cond.notify()

    def _on_set_vocabulary(self, request: SetVocabulary.Request, response: SetVocabulary.Response):
        ok, message, version = self.set_vocabulary(list(request.labels), list(request.prompt_templates))
        response.success, response.message, response.vocabulary_version = ok, message, version
        return response

    def _on_get_vocabulary(self, request: GetVocabulary.Request, response: GetVocabulary.Response):
        prepared = self._prepared
        if prepared is None:  # shut down or cleaned up: an empty answer (version 0), never a crash
            self.get_logger().warning("get_vocabulary while no model is configured: answered empty, version 0")
            return response
        vocabulary = prepared.vocabulary
        response.labels = list(vocabulary.labels)
        response.prompt_templates = list(vocabulary.templates)
        response.vocabulary_version = vocabulary.version
        return response

    def set_vocabulary(self, labels, templates) -> tuple[bool, str, int]:
        """Validate, embed, swap. Returns (success, message, current version); never raises."""
        with self._vocab_lock:
            current, segmenter = self._prepared, self.segmenter
            if current is None or segmenter is None:
                return False, "no model is configured (the node is unconfigured or shutting down)", 0
            try:
                vocabulary = make_vocabulary(labels, templates, previous=current.vocabulary, limits=self.limits)
                prepared = segmenter.prepare(vocabulary)
            except VocabularyError as exc:
                self.get_logger().warning(f"set_vocabulary refused: {exc}")
                return False, str(exc), current.version
            except Exception as exc:  # text encoding failure must not take the node down
                self.get_logger().error(f"set_vocabulary failed while embedding: {exc!r}")
                return False, f"embedding the vocabulary failed: {exc}", current.version
            problem = self._persist(vocabulary)  # first: a change that cannot be kept is not made
            if problem:
                self.get_logger().error(f"set_vocabulary refused: {problem}")
                return False, problem, current.version
            self._prepared = prepared
        self._publish_label_info()
        message = f"vocabulary v{vocabulary.version}: {len(vocabulary)} classes"
        self.get_logger().info(message)
        return True, message, vocabulary.version

    def _vocabulary_path(self) -> str:
        """vocabulary_file with ~ expanded (the same file is saved and restored); "" = no persistence."""
        path = self.get_parameter("vocabulary_file").value
        return os.path.expanduser(path) if path else ""

    def _persist(self, vocabulary: Vocabulary) -> str | None:
        """Save to vocabulary_file (atomically); the reason if it cannot be saved, else None."""
        path = self._vocabulary_path()
        if not path:
            return None
        try:
            save_vocabulary(vocabulary, path)
        except OSError as exc:
            return f"cannot save the vocabulary to {path} ({exc}); the vocabulary in force is unchanged"
        return None

    def _on_set_parameters(self, params) -> SetParametersResult:
        """Refuse unknown choices and out-of-range values with a reason; apply dense settings atomically."""
        changes = {}
        for param in params:
            spec = SPEC_BY_NAME.get(param.name)
            if spec is None:
                continue
            reason = spec.check(param.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
            changes[param.name] = param.value
        if self.segmenter is not None and DENSE_PARAMETERS & set(changes):
            try:
                config = self._dense_config(changes)
                self._check_refinement(config)
            except ValueError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
            self.segmenter.config = config  # one reference swap: a frame uses one config throughout
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ worker
    def _work_loop(self) -> None:
        while True:
            with self._slot_cond:
                while self._running and all(camera.slot is None for camera in self.cameras):
                    self._slot_cond.wait(timeout=0.5)
                if not self._running:
                    return
                batch = [(camera, camera.slot) for camera in self.cameras if camera.slot is not None]
                for camera, _ in batch:
                    camera.slot = None
            rate = self.get_parameter("max_rate_hz").value
            if rate > 0:
                wait = self._last_processed + 1.0 / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            self._last_processed = time.monotonic()
            self._process_batch(batch)

    def _process_batch(self, batch: list[tuple[Camera, Frame]]) -> None:
        """Decode each camera's frame, segment them all in one tower pass, publish per camera. A bad frame is
        refused alone; the other cameras' frames go on."""
        limit = int(self.get_parameter("max_image_pixels").value)
        decoded = []
        for camera, frame in batch:
            try:
                if isinstance(frame.msg, CompressedImage):
                    rgb = compressed_to_rgb(frame.msg, max_pixels=limit)
                else:
                    rgb = image_to_rgb(frame.msg, max_pixels=limit)
                decoded.append((camera, frame, rgb))
            except ImageError as exc:
                self._report_refusal(camera, f"frame refused: {exc}", error=False)
        if not decoded:
            return
        prepared = self._prepared  # one reference for the whole batch: outputs never mix versions
        self._last_batch = len(decoded)
        try:
            results = self.segmenter.segment_batch([rgb for _, _, rgb in decoded], prepared)
        except Exception as exc:  # one bad batch must never stop the stream
            for camera, _, _ in decoded:
                self._report_refusal(camera, f"frame failed: {exc!r}", error=True)
            return
        for (camera, frame, rgb), result in zip(decoded, results, strict=True):
            try:
                self._finish(camera, frame, rgb, result, prepared)
            except Exception as exc:
                self._report_refusal(camera, f"frame failed: {exc!r}", error=True)

    def _report_refusal(self, camera: Camera, message: str, error: bool) -> None:
        """Count every refusal; the log says each new reason."""
        camera.stats.on_rejected(message)
        self._log_new_reason(f"refusal/{camera.name}", camera.log_prefix + message,
                             self.get_logger().error if error else self.get_logger().warning)

    def _log_new_reason(self, channel: str, message: str, log) -> None:
        """Log a new reason at once, repeats of the same reason on this channel at most every 5 s."""
        now = time.monotonic()
        last_message, last_time = self._last_logged.get(channel, ("", 0.0))
        if message == last_message and now - last_time < 5.0:
            return
        self._last_logged[channel] = (message, now)
        log(message)

    def _finish(self, camera: Camera, frame: Frame, rgb: np.ndarray, result: SegmentationResult,
                prepared: PreparedVocabulary) -> None:
        stamp = frame.msg.header.stamp
        key = (stamp.sec, stamp.nanosec)
        if camera.prompter is not None:
            camera.prompter.add_frame(key, rgb, result.dense_features)
            if result.config.refinement == "sam":  # the frame's own settings snapshot, not the current ones
                result = camera.prompter.refine_result(key, result, prepared, result.config.score_threshold)
        self._publish(camera, frame.msg.header, rgb, result, prepared)
        paired = self._publish_3d(camera, frame.msg.header, rgb, result, prepared) if camera.depth else None
        if camera.prompter is not None:
            camera.remember(key, frame.msg.header, paired, camera.prompter.cache_size)
            if self.get_parameter("segment_everything").value:
                self._publish_everything(camera, frame.msg.header, prepared)
        camera.stats.on_processed(frame.received)

    def _publish(self, camera: Camera, header, rgb, result: SegmentationResult,
                 prepared: PreparedVocabulary) -> None:
        seg = segmentation_msg(header, result.labels, result.vocabulary_version, result.class_ids,
                               result.class_names, result.class_scores, result.class_areas, result.inference_ms)
        camera.publishers["labels"].publish(seg.labels)
        camera.publishers["segmentation"].publish(seg)
        if self.get_parameter("publish_overlay").value:
            overlay = blend(rgb, result.labels, len(prepared.vocabulary),
                            alpha=float(self.get_parameter("overlay_alpha").value),
                            names=prepared.vocabulary.display_names, class_ids=result.class_ids,
                            class_areas=result.class_areas)
            camera.publishers["overlay"].publish(rgb_to_image(overlay, header))

    def _publish_3d(self, camera: Camera, header, rgb, result: SegmentationResult,
                    prepared: PreparedVocabulary) -> PairedDepth | None:
        """Cloud and markers for a frame with paired depth; a frame without gets a warning, never an error."""
        try:
            paired = camera.depth.pair(header.stamp, rgb.shape[:2])
        except DepthError as exc:
            self._log_new_reason(f"depth/{camera.name}", f"{camera.log_prefix}no 3D output for this frame: {exc}",
                                 self.get_logger().warning)
            return None
        max_range = self.get_parameter("max_range_m").value
        with np.errstate(invalid="ignore"):
            paired.depth_m[paired.depth_m > max_range] = np.nan  # beyond range is invalid for every 3D output
        camera.publishers["labels_cloud"].publish(labelled_cloud(
            header, paired, rgb, result.labels, result.confidence, max_range,
            self.get_parameter("cloud_stride").value))
        if self.get_parameter("publish_markers").value:
            camera.publishers["labels_markers"].publish(class_markers(
                header, paired, result.labels, result.class_ids, prepared.vocabulary.display_names,
                len(prepared.vocabulary), self.get_parameter("marker_boxes").value))
        return paired

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
        for name in ("camera", "points", "point_labels", "point_groups", "boxes", "vocabulary", "multimask",
                     "crop_fusion"):
            setattr(request, name, getattr(query, name))
        response = self._on_segment_prompt(request, SegmentPrompt.Response())
        result = PromptResult(request_id=query.request_id)
        for name in ("success", "message", "camera", "header", "masks", "labels", "label_scores", "mask_scores",
                     "vocabulary_version", "top_k", "top_labels", "top_scores", "depth_frame_id", "has_3d",
                     "centroids", "extents"):
            setattr(result, name, getattr(response, name))
        self.pub_prompt_result.publish(result)

    def _camera_named(self, name: str) -> Camera:
        """The camera a prompt means: empty = the first; an unknown name is refused with the known ones."""
        name = normalise_camera_name(name)
        if not name:
            return self.cameras[0]
        for camera in self.cameras:
            if camera.name == name:
                return camera
        known = ", ".join(c.name for c in self.cameras if c.name) or "none (this node has one unnamed camera)"
        raise PromptError(f"unknown camera {name!r}; cameras of this node: {known}")

    def _answer_prompt(self, request: SegmentPrompt.Request, response: SegmentPrompt.Response) -> None:
        camera = self._camera_named(request.camera)
        prepared = self._prepared
        version = prepared.version
        if len(request.vocabulary):
            override = make_vocabulary(list(request.vocabulary), [], previous=prepared.vocabulary,
                                       limits=self.limits)
            prepared = self.segmenter.prepare(override)
            version = 0
        if request.image.height > 0:  # the client's image, in a cache of its own: never a camera's frame
            source = self.requests
            rgb = image_to_rgb(request.image, int(self.get_parameter("max_image_pixels").value))
            key = (request.image.header.stamp.sec, request.image.header.stamp.nanosec)
            source.prompter.add_frame(key, rgb, self.segmenter.frame_features(rgb))
            source.remember(key, request.image.header, None, source.prompter.cache_size)
        else:
            key = (request.stamp.sec, request.stamp.nanosec)
            key = None if key == (0, 0) else key
            source = self._frame_source(camera, key)
        prompter = source.prompter
        cached = prompter.frame(key)
        height, width = cached.image.shape[:2]
        prompts = prompts_from_request(request, height, width)
        frame, answers = prompter.query(cached.key, prompts, prepared, multimask=request.multimask,
                                        crop_fusion=request.crop_fusion)
        header = source.headers.get(frame.key)
        if header is None:
            header = request.image.header
        response.header = header
        response.camera = camera.name
        response.masks = [mono8_to_image(a.mask.astype("uint8") * 255, header) for a in answers]
        response.labels = [a.labels[0] for a in answers]
        response.label_scores = [a.label_scores[0] for a in answers]
        response.mask_scores = [a.mask_score for a in answers]
        response.vocabulary_version = version
        response.top_k = len(answers[0].labels)
        response.top_labels = [name for a in answers for name in a.labels]
        response.top_scores = [score for a in answers for score in a.label_scores]
        paired = source.depth_frames.get(frame.key)  # never any for a client's image
        if paired is not None:
            response.depth_frame_id = paired.frame_id or header.frame_id
            for answer in answers:
                found = region_centroid(answer.mask, paired.depth_m, paired.intrinsics)
                response.has_3d.append(found is not None)
                centroid, extent = found if found is not None else (np.zeros(3), np.zeros(3))
                response.centroids.append(Point(x=float(centroid[0]), y=float(centroid[1]), z=float(centroid[2])))
                response.extents.append(Vector3(x=float(extent[0]), y=float(extent[1]), z=float(extent[2])))
        response.success = True
        where = f" of camera {camera.name}" if camera.name else ""
        response.message = f"{len(answers)} prompts answered on frame {frame.key[0]}.{frame.key[1]:09d}{where}"
        if self.get_parameter("publish_overlay").value:
            overlay = draw_prompt_answers(frame.image, answers, prompts)
            camera.publishers["overlay"].publish(rgb_to_image(overlay, header))

    def _frame_source(self, camera: Camera, key: tuple[int, int] | None) -> Camera:
        """Where a by-stamp prompt finds its frame: the camera's frames first, then images sent with earlier
        requests (kept apart, so a client's image never stands in for a camera frame with the same stamp).
        Stamp zero means the camera's newest frame, or the newest sent image while the camera has none."""
        own, sent = camera.prompter.cached_keys(), self.requests.prompter.cached_keys()
        if key is None:
            return camera if own or not sent else self.requests
        if key in own:
            return camera
        return self.requests if key in sent or not own else camera

    def _publish_everything(self, camera: Camera, header, prepared: PreparedVocabulary) -> None:
        key = (header.stamp.sec, header.stamp.nanosec)
        instances, answers = camera.prompter.segment_everything(
            key, prepared, points_per_side=self.get_parameter("everything_points_per_side").value)
        # Instance ids as class ids; the names are their labels.
        camera.publishers["instances"].publish(segmentation_msg(
            header, instances, prepared.version, [i + 1 for i in range(len(answers))],
            [a.labels[0] for a in answers], [a.label_scores[0] for a in answers],
            [float(a.mask.mean()) for a in answers]))

    def _publish_diagnostics(self) -> None:
        prepared, segmenter = self._prepared, self.segmenter
        state = self._state_machine.current_state[1] if hasattr(self, "_state_machine") else ""  # rclpy internal
        backend = self.get_parameter("backend").value
        runner = segmenter.active_runner if segmenter is not None else None
        if runner is not None:
            chosen = getattr(runner, "chosen", None)  # auto: the backend it measured fastest
            backend = f"auto -> {chosen.name}" if chosen is not None else runner.name
        extra = {"lifecycle_state": state, "backend": backend, "precision": self.get_parameter("precision").value,
                 "preset": self.preset, "settings": self.effective_settings()}
        if prepared is not None and segmenter is not None:
            extra.update(vocabulary_version=str(prepared.version), classes=str(len(prepared.vocabulary)),
                         device=str(segmenter.encoder.device), model=segmenter.encoder.model_id)
        statuses = []
        for camera in self.cameras or [Camera("")]:  # before configure: one status saying nothing runs yet
            values = dict(extra)
            name = f"{self.get_fully_qualified_name()}: open-vocabulary segmentation"
            if camera.name:
                name += f" ({camera.name})"
                values.update(camera=camera.name, batched_cameras=str(len(self.cameras)),
                              frames_in_last_tower_pass=str(self._last_batch))
            if camera.depth is not None:
                values.update(depth_paired=str(camera.depth.paired), depth_unpaired=str(camera.depth.unpaired),
                              depth_pairing_rate=f"{camera.depth.rate():.2f}")
            statuses.append(diagnostic_status(name, camera.stats.snapshot(), values, camera.stats.last_error))
        self.pub_diagnostics.publish(diagnostic_array(self.get_clock().now().to_msg(), statuses))

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
        self._stop_worker()


def set_aside(path: str) -> str:
    """Rename a state file that cannot be used to PATH.bad-<time>, so the next start does not trip over it."""
    aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"(could not move it: {exc})"
    return aside


def segmentation_msg(header, labels, version: int, ids, names, scores, areas,
                     inference_ms: float = 0.0) -> Segmentation:
    """A Segmentation message whose mono16 label image carries the source header."""
    msg = Segmentation()
    msg.header = header
    msg.vocabulary_version = version
    msg.labels = mono16_to_image(labels, header)
    msg.class_ids, msg.class_names, msg.class_scores, msg.class_areas = ids, names, scores, areas
    msg.inference_ms = float(inference_ms)
    return msg


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = None
    code = 0
    try:
        node = OvsegNode()
        if node.configure_failed:
            code = 1  # autostart could not load the models: the log says why
        else:
            executor = MultiThreadedExecutor(num_threads=3)
            executor.add_node(node)
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
