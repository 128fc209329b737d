"""ovseg_node: lifecycle, parameters, topics and services around the ROS-free `SegmentationPipeline`.

Wiring only: parameters become one `Settings` (ros/parameters.py), frames go through the latest-frame scheduler
(ros/scheduler.py) into one `pipeline.process_batch` call per batch, and messages are built in ros/messages.py.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import weakref
from dataclasses import dataclass, field

import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from ovseg_interfaces.msg import LabelInfo, PromptQuery, PromptResult, Segmentation, TrackedObjects
from ovseg_interfaces.srv import FindObjects, GetVocabulary, SegmentPrompt, SetVocabulary

from ..core.cameras import camera_topic, parse_camera_names
from ..core.geometry import DepthError
from ..core.pipeline import FrameInput, FrameOutput, SegmentationPipeline, build_pipeline, frame_key
from ..core.prompt import PromptError
from ..core.settings import SPEC_BY_NAME, describe_settings
from ..core.vocabulary import VocabularyError
from . import messages, vision_messages
from .depth import DepthPairer
from .diagnostics import ReasonLog, StreamStats, camera_statuses, diagnostic_array
from .image_conversions import ImageError, rgb_to_image
from .parameters import declare_settings, plain, read_settings
from .scheduler import LatestFrameScheduler, Pending
from .spinning import SpinLoop

SHUTTING_DOWN = "the node is shutting down"
EXECUTOR_THREADS = 8  # more than the callback groups that can block (transitions, writes, finds, prompts)
READ_SERVICES = ("get_state", "get_available_states", "get_available_transitions", "get_transition_graph")


@dataclass
class CameraIO:
    """One camera's ROS side: subscription, publishers, depth pairing and statistics."""

    name: str  # "" = the node's own topics
    stats: StreamStats = field(default_factory=StreamStats)
    publishers: dict[str, object] = field(default_factory=dict)
    depth: DepthPairer | None = None

    def topic(self, base: str) -> str:
        return camera_topic(self.name, base)

    @property
    def log_prefix(self) -> str:
        return f"[{self.name}] " if self.name else ""


class OvsegNode(LifecycleNode):
    """Dense open-vocabulary segmentation of camera streams, with a run-time vocabulary and prompts.

    configure builds the pipeline (models loaded and warmed up) and creates every topic and service, activate
    lets camera frames through, deactivate stops them, cleanup releases the models. With `autostart` (the
    default) `main` configures and activates it.

    Transitions never destroy an entity under the spinning executor: camera subscriptions live from configure to
    cleanup and are gated by the state, and cleanup hands its entities to the spin loop, which destroys them
    between turns (no executor thread then holds a wait set with them).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("ovseg", **kwargs)
        self.startup_error = declare_settings(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.pipeline: SegmentationPipeline | None = None
        self.cameras: dict[str, CameraIO] = {}
        self.scheduler: LatestFrameScheduler | None = None
        self.lifecycle_state = "unconfigured"
        self.spin_loop: SpinLoop | None = None  # set by main; entities are destroyed between its turns
        self.shutting_down = False
        self._entities: list[tuple[str, object]] = []  # created by configure, destroyed by cleanup
        self._log_reason = ReasonLog()
        self._reads = MutuallyExclusiveCallbackGroup()  # reads (microseconds each) never wait behind a
        # transition, a write or a frame
        self._move_lifecycle_reads()
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.pub_prompt_result = self.create_publisher(PromptResult, "prompt_result", 10)
        self.create_timer(1.0, self._publish_diagnostics)
        self._create_services()

    def _move_lifecycle_reads(self) -> None:
        """rclpy puts every lifecycle service in one mutually exclusive group, so `get_state` would wait behind a
        seconds-long configure; the reads move to the reads' group (`change_state` stays where it was)."""
        for service in self.services:
            if service.srv_name.rsplit("/", 1)[-1] in READ_SERVICES and service.callback_group is not self._reads:
                service.callback_group.entities.discard(weakref.ref(service))
                service.callback_group = self._reads
                self._reads.add_entity(service)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.startup_error:
            self.get_logger().fatal(f"configure failed: {self.startup_error}")
            return TransitionCallbackReturn.FAILURE
        try:
            settings = read_settings(self)
            names = parse_camera_names(settings.cameras)
            self.pipeline = build_pipeline(settings, names, log=self._log)
            self.cameras = {name: CameraIO(name) for name in names}
            self._create_entities()
        except Exception as exc:  # ModelError, VocabularyError, ValueError, a folder that cannot be made, ...
            self.get_logger().fatal(f"configure failed: {exc}" if isinstance(exc, ValueError | RuntimeError)
                                    else f"configure failed: {type(exc).__name__}: {exc}")
            self._destroy_entities()
            self._release()
            return TransitionCallbackReturn.FAILURE
        self.scheduler = LatestFrameScheduler(names, self._process,
                                              lambda: self.pipeline.settings.max_rate_hz if self.pipeline else 0.0,
                                              lambda exc: self.get_logger().error(f"batch failed: {exc!r}"))
        self.scheduler.start()
        described = self.pipeline.describe()
        vocabulary = self.pipeline.vocabulary
        self.get_logger().info(
            f"configured: model {described['model']} on {described['device']}, {len(vocabulary)} classes "
            f"(vocabulary v{vocabulary.version}, {len(vocabulary.templates)} templates), variant "
            f"{settings.dense_variant}, prompts {'on' if self.pipeline.has_prompts else 'off'}, cameras: "
            f"{', '.join(names) if names[0] else 'one (image)'}")
        self.get_logger().info(f"preset {settings.preset}: {describe_settings(settings)}")
        self.lifecycle_state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        self._publish_label_info()
        self.lifecycle_state = "active"
        self.get_logger().info("active: segmenting the camera stream")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.lifecycle_state = "inactive"  # first: frames stop here
        self.scheduler.clear()
        self.pipeline.clear_tracks()  # objects seen before the pause are not the ones after it
        self.get_logger().info("inactive: camera frames are ignored")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop()
        self._destroy_entities()
        self._release()
        self.lifecycle_state = "unconfigured"
        self.get_logger().info("cleaned up: models released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.begin_shutdown()
        self._release()
        self.lifecycle_state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def stop(self) -> None:
        """Stop the frame worker and wait for its batch: nothing is published after this returns."""
        if self.scheduler is not None:
            self.scheduler.stop(timeout=120.0)
            self.scheduler = None

    @property
    def frames_pass(self) -> bool:
        """Camera frames are taken only while active (the subscriptions stay through deactivate)."""
        return self.lifecycle_state == "active" and not self.shutting_down

    def begin_shutdown(self) -> None:
        """From now on requests are answered "the node is shutting down" and frames are ignored; the worker is
        stopped before the context goes, so it never publishes into a dead context."""
        self.shutting_down = True
        self.stop()

    def _release(self) -> None:
        self.pipeline = None
        self.cameras = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _log(self, level: int, message: str) -> None:
        # One call per severity: rclpy refuses one call site logging at two severities.
        if level >= logging.ERROR:
            self.get_logger().error(message)
        elif level >= logging.WARNING:
            self.get_logger().warning(message)
        else:
            self.get_logger().info(message)

    # ------------------------------------------------------------------ set-up
    def _create_entities(self) -> None:
        settings = self.pipeline.settings
        per_camera = {"labels": Image, "segmentation": Segmentation, "overlay": Image, "instances": Segmentation,
                      "objects": TrackedObjects, "object_ids": Image, "confidence": Image}
        if settings.use_depth:
            per_camera.update(labels_cloud=PointCloud2, labels_markers=MarkerArray, objects_markers=MarkerArray)
        if vision_messages.AVAILABLE:
            per_camera["detections"] = vision_messages.Detection2DArray
            if settings.use_depth:
                per_camera["detections_3d"] = vision_messages.Detection3DArray
        else:
            self.get_logger().warning(vision_messages.MISSING_REASON, once=True)
        qos = messages.image_qos(settings.image_qos, settings.qos_depth, settings.image_reliability)
        inputs = ReentrantCallbackGroup()  # storing a frame never waits for anything
        for camera in self.cameras.values():
            camera.publishers = {base: self._publisher(kind, camera.topic(base), messages.OUTPUT_DEPTH)
                                 for base, kind in per_camera.items()}
            if vision_messages.AVAILABLE:  # the label image's class map, as vision_msgs consumers expect it
                camera.publishers["vision_label_info"] = self._publisher(
                    vision_messages.LabelInfo, camera.topic("vision_label_info"), messages.LATCHED_QOS)

            def store(msg, camera=camera) -> None:
                scheduler = self.scheduler
                if self.frames_pass and scheduler is not None:
                    camera.stats.on_received(replaced_unprocessed=scheduler.offer(camera.name, msg))

            if settings.input_type == "compressed":
                self._keep("subscription", self.create_subscription(
                    CompressedImage, camera.topic("image/compressed"), store, qos, callback_group=inputs))
            else:
                self._keep("subscription", self.create_subscription(
                    Image, camera.topic("image"), store, qos, callback_group=inputs))
            if settings.use_depth:
                camera.depth = DepthPairer(settings.depth_buffer_size, settings.depth_tolerance_s)
                self._keep("subscription", self.create_subscription(Image, camera.topic("depth/image"),
                                                                    camera.depth.add_depth, qos,
                                                                    callback_group=inputs))
                self._keep("subscription", self.create_subscription(CameraInfo, camera.topic("depth/camera_info"),
                                                                    camera.depth.add_info, 10,
                                                                    callback_group=inputs))
        self.pub_label_info = self._publisher(LabelInfo, "label_info", messages.LATCHED_QOS)  # one for all cameras

    def _create_services(self) -> None:
        """Services live as long as the node: a caller is answered in every state (success=false with the
        reason while unconfigured), and no transition destroys one under the executor."""
        writes = MutuallyExclusiveCallbackGroup()  # vocabulary changes one at a time, answered in order
        self.create_service(SetVocabulary, "set_vocabulary", self._on_set_vocabulary,
                            qos_profile=messages.SERVICE_QOS, callback_group=writes)
        self.create_service(GetVocabulary, "get_vocabulary", self._on_get_vocabulary,
                            qos_profile=messages.SERVICE_QOS, callback_group=self._reads)
        self.create_service(FindObjects, "find_objects", self._on_find_objects, qos_profile=messages.SERVICE_QOS,
                            callback_group=MutuallyExclusiveCallbackGroup())
        prompts = MutuallyExclusiveCallbackGroup()
        self.create_service(SegmentPrompt, "segment_prompt", self._on_segment_prompt,
                            qos_profile=messages.SERVICE_QOS, callback_group=prompts)
        self.create_subscription(PromptQuery, "prompt", self._on_prompt_topic, 10, callback_group=prompts)

    def _publisher(self, kind, topic: str, qos):
        return self._keep("publisher", self.create_lifecycle_publisher(kind, topic, qos))

    def _keep(self, kind: str, entity):
        self._entities.append((kind, entity))
        return entity

    def _destroy_entities(self) -> None:
        """Destroy what configure created, between the spin loop's turns (at once when nothing spins)."""
        entities, self._entities = self._entities, []

        def destroy() -> None:
            kinds = {"publisher": self.destroy_lifecycle_publisher, "subscription": self.destroy_subscription}
            for kind, entity in entities:
                kinds[kind](entity)

        if self.spin_loop is not None:
            self.spin_loop.between_turns(destroy)
        else:
            destroy()

    # ------------------------------------------------------------------ frames
    def _process(self, batch: list[tuple[str, Pending]]) -> None:
        """Decode and pair each camera's frame (a bad one is refused alone), one pipeline call, publish."""
        pipeline, cameras = self.pipeline, self.cameras
        if pipeline is None or self.shutting_down:
            return
        settings = pipeline.settings
        inputs, received = [], {}
        for name, pending in batch:
            camera, msg = cameras[name], pending.item
            try:
                rgb = messages.decode_frame(msg, int(settings.max_image_pixels))
            except ImageError as exc:
                self._refuse(camera, f"frame refused: {exc}", error=False)
                continue
            inputs.append(FrameInput(name, rgb, frame_key(msg.header.stamp), msg.header, self._pair(camera, msg, rgb)))
            received[name] = pending.received
        for output in pipeline.process_batch(inputs):
            if self.shutting_down:
                return
            camera = cameras[output.frame.camera]
            if output.error:
                self._refuse(camera, output.error, error=True)
                continue
            try:
                self._publish(camera, output)
            except Exception as exc:
                self._refuse(camera, f"frame failed: {exc!r}", error=True)
                continue
            camera.stats.on_processed(received[camera.name])
            if output.tracking_error and self._log_reason.is_new(f"tracking/{camera.name}", output.tracking_error):
                self.get_logger().error(camera.log_prefix + output.tracking_error)

    def _pair(self, camera: CameraIO, msg, rgb):
        """The frame's depth, or None with a (throttled) warning saying why; never an error."""
        if camera.depth is None:
            return None
        camera.depth.tolerance_s = self.pipeline.settings.depth_tolerance_s
        try:
            return camera.depth.pair(msg.header.stamp, rgb.shape[:2])
        except DepthError as exc:
            message = f"{camera.log_prefix}no 3D output for this frame: {exc}"
            if self._log_reason.is_new(f"depth/{camera.name}", message):
                self.get_logger().warning(message)
            return None

    def _publish(self, camera: CameraIO, output: FrameOutput) -> None:
        for base, msg in messages.frame_messages(output).items():
            camera.publishers[base].publish(msg)

    def _refuse(self, camera: CameraIO, message: str, error: bool) -> None:
        """Count every refusal; the log says each new reason."""
        camera.stats.on_rejected(message)
        if not self._log_reason.is_new(f"refusal/{camera.name}", camera.log_prefix + message):
            return
        if error:
            self.get_logger().error(camera.log_prefix + message)
        else:
            self.get_logger().warning(camera.log_prefix + message)

    # ------------------------------------------------------------------ services
    def _on_set_vocabulary(self, request: SetVocabulary.Request, response: SetVocabulary.Response):
        pipeline = self.pipeline
        if pipeline is None or self.shutting_down:
            response.success, response.message = False, self._no_model_reason()
            return response
        try:
            exemplars = messages.exemplar_requests(request, int(pipeline.settings.max_image_pixels))
        except (VocabularyError, ImageError) as exc:
            response.success, response.message = False, str(exc)
            response.vocabulary_version = pipeline.vocabulary.version
            self.get_logger().warning(f"set_vocabulary refused: {exc}")
            return response
        change = pipeline.set_vocabulary(list(request.labels), list(request.prompt_templates), exemplars,
                                         request.clear_exemplars)
        response.success, response.message = change.success, change.message
        response.vocabulary_version = change.version
        if change.success:
            self._publish_label_info()
            self.get_logger().info(change.message)
        else:
            self.get_logger().warning(f"set_vocabulary refused: {change.message}")
        return response

    def _on_get_vocabulary(self, request: GetVocabulary.Request, response: GetVocabulary.Response):
        pipeline = self.pipeline
        if pipeline is None:  # shut down or cleaned up: an empty answer (version 0), never a crash
            self.get_logger().warning("get_vocabulary while no model is configured: answered empty, version 0")
            return response
        vocabulary = pipeline.vocabulary
        response.labels, response.prompt_templates = list(vocabulary.labels), list(vocabulary.templates)
        response.vocabulary_version = vocabulary.version
        return response

    def _on_find_objects(self, request: FindObjects.Request, response: FindObjects.Response):
        def work(pipeline: SegmentationPipeline) -> None:
            messages.fill_find_response(response, pipeline.find_objects(request.query, request.camera,
                                                                        request.max_results, request.include_lost))

        return self._serve("find_objects", response, work, (ValueError,))  # PromptError (camera) is one too

    def _on_segment_prompt(self, request: SegmentPrompt.Request, response: SegmentPrompt.Response):
        cameras = self.cameras  # the configuration the request started in, even if cleanup comes meanwhile

        def work(pipeline: SegmentationPipeline) -> None:
            outcome = pipeline.answer_prompts(messages.prompt_request(request, int(pipeline.settings.max_image_pixels)))
            messages.fill_prompt_response(response, outcome, request.image.header)
            camera = cameras.get(outcome.camera)
            if outcome.overlay is not None and camera is not None and not self.shutting_down:
                camera.publishers["overlay"].publish(rgb_to_image(outcome.overlay, response.header))

        return self._serve("segment_prompt", response, work, (PromptError, ImageError, VocabularyError))

    def _serve(self, service: str, response, work, refusals: tuple[type[Exception], ...]):
        """Run a request on the pipeline: a refusal answers success=false with its reason (warning), anything else
        with the error (logged); the node never goes down for one request."""
        pipeline = self.pipeline
        try:
            if pipeline is None or self.shutting_down:
                raise PromptError(self._no_model_reason())
            work(pipeline)
        except (PromptError, *refusals) as exc:
            response.success, response.message = False, str(exc)
            self.get_logger().warning(f"{service} refused: {exc}")
        except Exception as exc:
            response.success, response.message = False, f"{service} failed: {exc!r}"
            self.get_logger().error(response.message)
        return response

    def _on_prompt_topic(self, query: PromptQuery) -> None:
        response = self._on_segment_prompt(messages.request_from_query(query), SegmentPrompt.Response())
        if not self.shutting_down:
            self.pub_prompt_result.publish(messages.result_from_response(response, query.request_id))

    def _no_model_reason(self) -> str:
        return SHUTTING_DOWN if self.shutting_down else "no model is configured (the node is unconfigured)"

    def _on_set_parameters(self, params) -> SetParametersResult:
        """Refuse unknown choices, out-of-range values and inconsistent settings with a reason; apply the rest
        to the pipeline as one new settings snapshot."""
        changes = {p.name: plain(p.value) for p in params if p.name in SPEC_BY_NAME}
        for name, value in changes.items():
            reason = SPEC_BY_NAME[name].check(value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        if self.pipeline is not None and changes:
            try:
                self.pipeline.update_settings(changes)
            except ValueError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ status
    def _publish_label_info(self) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        stamp = self.get_clock().now().to_msg()
        self.pub_label_info.publish(messages.label_info_msg(pipeline.vocabulary, pipeline.settings.score_threshold,
                                                            stamp))
        if vision_messages.AVAILABLE:
            for camera in self.cameras.values():
                camera.publishers["vision_label_info"].publish(vision_messages.label_info(
                    pipeline.vocabulary, pipeline.settings.score_threshold, Header(stamp=stamp)))

    def _publish_diagnostics(self) -> None:
        pipeline = self.pipeline
        extra = {"lifecycle_state": self.lifecycle_state, "backend": self.get_parameter("backend").value,
                 "precision": self.get_parameter("precision").value, "preset": self.get_parameter("preset").value}
        if pipeline is not None:
            extra.update(pipeline.describe(), settings=describe_settings(pipeline.settings))
        cameras = [(c.name, c.stats, c.depth) for c in self.cameras.values()] or [("", StreamStats(), None)]
        self.pub_diagnostics.publish(diagnostic_array(self.get_clock().now().to_msg(), camera_statuses(
            f"{self.get_fully_qualified_name()}: open-vocabulary segmentation", cameras, extra,
            pipeline.last_batch if pipeline else 0)))

def autostart(node: OvsegNode) -> bool:
    """configure + activate, as an operator would with `ros2 lifecycle set`; False if configure failed (its
    FATAL line says why)."""
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        return False
    return node.trigger_activate() == TransitionCallbackReturn.SUCCESS


def main(argv: list[str] | None = None) -> int:
    """As ros2/demos' lifecycle_py: construct, drive the transitions (with `autostart`), spin, clean stop.

    SIGINT/SIGTERM end the spin loop; then the worker stops, callbacks in flight finish, the node is destroyed
    and only then the context shuts down (rclpy's own handler would shut the context down first)."""
    rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    node, executor, code = None, None, 0
    stop = threading.Event()
    loop: SpinLoop | None = None

    def on_signal(signum, frame) -> None:
        stop.set()
        if loop is not None:
            loop.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        node = OvsegNode()
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
        executor.add_node(node)
        loop = SpinLoop(executor, on_error=node.get_logger().error)
        node.spin_loop = loop
        if node.get_parameter("autostart").value and not autostart(node):
            code = 1  # the models could not be loaded or a parameter is wrong: the log says why
        elif not stop.is_set():
            loop.run()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.begin_shutdown()
        if executor is not None:
            executor.shutdown(timeout_sec=30.0)  # requests in flight are answered
        if node is not None:
            node.spin_loop = None
            node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
