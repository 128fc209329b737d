"""A small Python client for a running ovseg node (used by the demo, the tests and scripts).

It owns an rclpy node spun in a background thread: call services synchronously, publish images, and wait for
outputs that satisfy a condition.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image

from ovseg_interfaces.msg import LabelInfo, Segmentation
from ovseg_interfaces.srv import GetVocabulary, SetVocabulary

from .ros.messages import SERVICE_QOS
from .ros.spinning import SpinLoop

OUTPUT_TOPICS = {"labels": Image, "segmentation": Segmentation, "overlay": Image}


class OvsegClient:
    def __init__(self, target_namespace: str = "", name: str = "ovseg_client", keep: int = 200,
                 extra_topics: dict[str, type] | None = None, camera: str = "") -> None:
        """`camera`: for a node serving several cameras, the camera whose image and outputs this client uses
        (its topics are CAMERA/image, CAMERA/labels, ...); services and label_info are the node's."""
        if not rclpy.ok():
            rclpy.init()
        self.node = rclpy.create_node(name)
        prefix = target_namespace.rstrip("/") + "/" if target_namespace else ""
        self.prefix = prefix
        self.camera_prefix = prefix + (camera.strip("/") + "/" if camera else "")
        self._cond = threading.Condition()
        self.received: dict[str, collections.deque] = {}
        self.image_pub = self.node.create_publisher(Image, self.camera_prefix + "image", qos_profile_sensor_data)
        for topic, msg_type in {**OUTPUT_TOPICS, **(extra_topics or {})}.items():
            self._subscribe(self.camera_prefix + topic, topic, msg_type, QoSProfile(depth=10), keep)
        latched = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self._subscribe(prefix + "label_info", "label_info", LabelInfo, latched, keep)
        self.set_client = self.node.create_client(SetVocabulary, prefix + "set_vocabulary", qos_profile=SERVICE_QOS)
        self.get_client = self.node.create_client(GetVocabulary, prefix + "get_vocabulary", qos_profile=SERVICE_QOS)
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self.node)
        self._spin = SpinLoop(self._executor, on_error=self.node.get_logger().warning)
        self._spin.start(name=f"{name}-spin")
        self._closed = False

    def _subscribe(self, full_topic: str, key: str, msg_type, qos, keep: int) -> None:
        self.received[key] = collections.deque(maxlen=keep)

        def callback(msg, key=key) -> None:
            with self._cond:
                self.received[key].append(msg)
                self._cond.notify_all()

        self.node.create_subscription(msg_type, full_topic, callback, qos)

    def subscribe(self, topic: str, msg_type, qos=None, keep: int = 200) -> None:
        """Record any further topic of the node (relative names get the target namespace and camera)."""
        full = topic if topic.startswith("/") else self.camera_prefix + topic
        self._subscribe(full, topic, msg_type, qos or QoSProfile(depth=10), keep)

    # ------------------------------------------------------------------ services
    def wait_ready(self, timeout: float = 60.0, configured: bool = True) -> bool:
        """The services are there and, with `configured`, the node has loaded its models (its vocabulary has a
        version: the services exist in every lifecycle state and answer version 0 while unconfigured)."""
        deadline = time.monotonic() + timeout
        if not (self.set_client.wait_for_service(timeout_sec=timeout)
                and self.get_client.wait_for_service(timeout_sec=max(0.0, deadline - time.monotonic()))):
            return False
        while configured:
            try:
                if self.get_vocabulary(timeout=min(5.0, max(0.1, deadline - time.monotonic()))).vocabulary_version:
                    return True
            except TimeoutError:  # an answer lost while discovery completes: ask again
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def call(self, client, request, timeout: float = 30.0):
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {client.srv_name} within {timeout} s")
            time.sleep(0.01)
        return future.result()

    def set_vocabulary(self, labels: list[str], templates: list[str] | None = None,
                       timeout: float = 60.0) -> SetVocabulary.Response:
        request = SetVocabulary.Request()
        request.labels = list(labels)
        request.prompt_templates = list(templates or [])
        return self.call(self.set_client, request, timeout)

    def get_vocabulary(self, timeout: float = 30.0) -> GetVocabulary.Response:
        return self.call(self.get_client, GetVocabulary.Request(), timeout)

    # ------------------------------------------------------------------ topics
    def publish_image(self, msg: Image) -> None:
        self.image_pub.publish(msg)

    def wait_for(self, topic: str, predicate: Callable[[object], bool] = lambda m: True,
                 timeout: float = 30.0):
        """The first recorded message on topic (oldest first) that satisfies predicate, else None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.received[topic]:
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(timeout=min(remaining, 0.2))

    def segment(self, msg: Image, tries: int = 10, timeout: float = 2.0):
        """Publish an image (again, as best-effort delivery may drop it) until its segmentation arrives: the
        Segmentation message with the image's stamp, or None after `tries`."""
        stamp = msg.header.stamp
        for _ in range(tries):
            self.publish_image(msg)
            answer = self.wait_for("segmentation", lambda m: m.header.stamp == stamp, timeout)
            if answer is not None:
                return answer
        return None

    def clear(self, topic: str | None = None) -> None:
        with self._cond:
            for key in [topic] if topic else list(self.received):
                self.received[key].clear()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the spin thread (it sees the flag within 0.1 s), join it within `timeout`, then destroy: never
        shut an executor down underneath a thread that spins it. False if the thread did not end in time (the node
        is then left alone rather than destroyed under it)."""
        if self._closed:
            return True
        ended = self._spin.stop(timeout)
        if ended:
            self._executor.shutdown(timeout_sec=timeout)
            self.node.destroy_node()
            self._closed = True
        return ended


@dataclass
class StreamCounts:
    """What `stream_frames` has sent so far (all cameras together)."""

    published: int = 0
    publish_errors: int = 0


@contextmanager
def stream_frames(clients: OvsegClient | Sequence[OvsegClient], rate_hz: float, size: tuple[int, int] = (480, 640),
                  first_sec: int = 1_000_000) -> Iterator[StreamCounts]:
    """Publish synthetic frames at `rate_hz` per client (camera) from a thread until the block ends, as a camera
    driver would; every frame has its own stamp. Benchmarks and tests use it to load a node."""
    from std_msgs.msg import Header

    from .ros.image_conversions import rgb_to_image
    from .synth.world import generate_scene

    clients = [clients] if isinstance(clients, OvsegClient) else list(clients)
    frames = [generate_scene(i, size=size, split="eval").image for i in range(8)]
    counts, stop = StreamCounts(), threading.Event()

    def run() -> None:
        period, next_time, index = 1.0 / rate_hz, time.monotonic(), 0
        while not stop.is_set():
            for camera, client in enumerate(clients):
                header = Header(frame_id=f"camera{camera}")
                header.stamp.sec, header.stamp.nanosec = first_sec + index // 1000, (index % 1000) * 1000
                try:
                    client.publish_image(rgb_to_image(frames[(index + camera) % len(frames)], header))
                    counts.published += 1
                except Exception:  # rclpy can refuse a publish under load; count it, keep going
                    counts.publish_errors += 1
            index += 1
            next_time += period
            stop.wait(max(0.0, next_time - time.monotonic()))

    thread = threading.Thread(target=run, name="ovseg-stream", daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(5)
