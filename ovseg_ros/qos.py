"""QoS profiles shared by the node and its clients."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

# Services answer every caller: requests queue (reliable, up to 100 waiting) while one is served; rclpy's default
# keeps 10, and a burst beyond that goes unanswered. Clients use it too, so a tool's own burst is not dropped
# before it leaves.
SERVICE_QOS = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
