"""synthetic_camera: a camera driver stand-in streaming the project's synthetic world, with ground truth.

Publishes `image` (rgb8) and `ground_truth/labels` (mono16 ids into the world vocabulary, same header), so a
demo or a test can score the segmenter frame by frame. Deterministic: frame k uses seed `seed + k`.
"""

from __future__ import annotations

import sys

import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from .ros.image_conversions import mono16_to_image, rgb_to_image
from .synth.world import generate_scene


class SyntheticCamera(Node):
    def __init__(self) -> None:
        super().__init__("synthetic_camera")
        describe = ParameterDescriptor
        self.declare_parameter("rate_hz", 5.0, describe(description="frames per second"))
        self.declare_parameter("width", 640, describe(description="image width"))
        self.declare_parameter("height", 480, describe(description="image height"))
        self.declare_parameter("seed", 0, describe(description="scene k uses seed + k"))
        self.declare_parameter("split", "eval", describe(description="train: seen classes only; eval: half novel"))
        self.declare_parameter("frame_id", "synthetic_camera_optical", describe(description="header frame_id"))
        self.declare_parameter("max_frames", 0, describe(description="stop publishing after this many; 0 = never"))
        self.declare_parameter("reliable", False, describe(description="reliable QoS instead of sensor data"))
        self.declare_parameter("wait_for_subscribers", 0, describe(
            description="publish only once `image` has this many subscribers (a reproducible demo start)"))
        reliable = self.get_parameter("reliable").value
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE) if reliable else qos_profile_sensor_data
        self.pub_image = self.create_publisher(Image, "image", qos)
        self.pub_truth = self.create_publisher(Image, "ground_truth/labels", QoSProfile(depth=10))
        self.count = 0
        self.timer = self.create_timer(1.0 / float(self.get_parameter("rate_hz").value), self._tick)

    def _tick(self) -> None:
        limit = self.get_parameter("max_frames").value
        if limit and self.count >= limit:
            return
        if self.pub_image.get_subscription_count() < self.get_parameter("wait_for_subscribers").value:
            return
        size = (self.get_parameter("height").value, self.get_parameter("width").value)
        scene = generate_scene(self.get_parameter("seed").value + self.count, size=size,
                               split=self.get_parameter("split").value)
        header = Header(frame_id=self.get_parameter("frame_id").value)
        header.stamp = self.get_clock().now().to_msg()
        self.pub_truth.publish(mono16_to_image(scene.labels, header))
        self.pub_image.publish(rgb_to_image(scene.image, header))
        self.count += 1


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = SyntheticCamera()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
