"""Record topics to MCAP exactly as rosbag2 does (CDR payloads, ros2msg schemas), for Foxglove and ros2 bag.

    python -m ovseg_ros.recording OUT.mcap [--topics segmentation label_info overlay] [--seconds 10]

The schema of each type is its .msg text followed by every nested type's, separated the way rosbag2 does, so any
MCAP reader can decode the messages without this package.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path

from mcap.writer import Writer
from rclpy.serialization import serialize_message

SEPARATOR = "=" * 80


def _share_dirs() -> list[Path]:
    dirs = [Path(p) / "share" for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    dirs.append(Path(sys.prefix) / "share")
    return dirs


def _msg_file(type_name: str) -> Path:
    package, _, name = type_name.partition("/")
    for share in _share_dirs():
        candidate = share / package / "msg" / f"{name}.msg"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no .msg file for {type_name} under {', '.join(str(d) for d in _share_dirs())}")


def _nested_types(msg_class) -> list[str]:
    """pkg/Type names of the message fields, from the generated class' own field table."""
    found = []
    for field_type in msg_class.get_fields_and_field_types().values():
        base = re.sub(r"^sequence<(.+?)(, \d+)?>$", r"\1", field_type)
        base = re.sub(r"\[\d*\]$", "", base)
        if "/" in base:
            found.append(base)
    return found


def _class_of(type_name: str):
    package, _, name = type_name.partition("/")
    module = __import__(f"{package}.msg", fromlist=[name])
    return getattr(module, name)


def message_definition(msg_class) -> tuple[str, str]:
    """(pkg/msg/Type, ros2msg schema text with all nested definitions)."""
    module = msg_class.__module__.split(".")[0]
    root = f"{module}/{msg_class.__name__}"
    text = [_msg_file(root).read_text()]
    seen = {root}
    queue = _nested_types(msg_class)
    while queue:
        type_name = queue.pop(0)
        if type_name in seen:
            continue
        seen.add(type_name)
        text.append(f"{SEPARATOR}\nMSG: {type_name}\n{_msg_file(type_name).read_text()}")
        queue.extend(_nested_types(_class_of(type_name)))
    package, name = root.split("/")
    return f"{package}/msg/{name}", "\n".join(text)


class McapRecorder:
    """Subscribes to topics on a node and writes every message to an MCAP file (thread-safe)."""

    def __init__(self, node, path: str | Path, topics: dict[str, type], qos=10) -> None:
        self._stream = open(path, "wb")
        self._writer = Writer(self._stream)
        self._writer.start(profile="ros2", library="ovseg_ros")
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        for topic, msg_class in topics.items():
            type_name, schema_text = message_definition(msg_class)
            schema_id = self._writer.register_schema(name=type_name, encoding="ros2msg", data=schema_text.encode())
            channel_id = self._writer.register_channel(topic=topic, message_encoding="cdr", schema_id=schema_id)
            self.counts[topic] = 0
            node.create_subscription(msg_class, topic, self._callback(topic, channel_id), qos)

    def _callback(self, topic: str, channel_id: int):
        def write(msg) -> None:
            now = time.time_ns()
            header = getattr(msg, "header", None)
            publish = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec if header is not None else now
            with self._lock:
                if self._stream.closed:
                    return
                self._writer.add_message(channel_id=channel_id, log_time=now, publish_time=publish,
                                         data=serialize_message(msg), sequence=self.counts[topic])
                self.counts[topic] += 1

        return write

    def close(self) -> None:
        with self._lock:
            if not self._stream.closed:
                self._writer.finish()
                self._stream.close()


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from sensor_msgs.msg import Image

    from ovseg_interfaces.msg import LabelInfo, Segmentation

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--topics", nargs="+", default=["segmentation", "label_info", "overlay", "labels"])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    kinds = {"segmentation": Segmentation, "label_info": LabelInfo, "overlay": Image, "labels": Image,
             "instances": Segmentation}
    prefix = args.namespace.rstrip("/") + "/" if args.namespace else ""
    rclpy.init()
    node = rclpy.create_node("ovseg_recorder")
    recorder = McapRecorder(node, args.out, {prefix + t: kinds[t] for t in args.topics})
    deadline = time.monotonic() + args.seconds
    try:
        while time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
    finally:
        recorder.close()
        node.destroy_node()
        rclpy.try_shutdown()
    print(f"wrote {args.out}: " + ", ".join(f"{t} {n}" for t, n in recorder.counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
