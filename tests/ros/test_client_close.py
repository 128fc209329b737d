"""OvsegClient opens and closes 50 times while messages flow to it: every close returns within its bound and
leaves no thread behind (the old close shut the executor down underneath its spinning thread and could hang).

In-process: the publisher is a node of this process, so no child process is involved."""

from __future__ import annotations

import threading
import time

import numpy as np
from std_msgs.msg import Header

from ovseg_ros.ros.image_conversions import mono16_to_image
from ovseg_ros.runtime import wait_until

CLOSE_BOUND_S = 5.0


def test_fifty_opens_and_closes_under_traffic_leave_no_thread(ros):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    from ovseg_ros.client import OvsegClient
    from ovseg_ros.ros.spinning import SpinLoop

    source = rclpy.create_node("close_stress_source")
    labels_pub = source.create_publisher(Image, "/close_stress/labels", 10)
    executor = SingleThreadedExecutor()
    executor.add_node(source)
    source_loop = SpinLoop(executor)
    source_loop.start()
    stop = threading.Event()
    labels = mono16_to_image(np.zeros((48, 64), np.uint16), Header(frame_id="cam"))

    def flood() -> None:
        while not stop.is_set():
            labels_pub.publish(labels)
            time.sleep(0.002)

    publisher = threading.Thread(target=flood, daemon=True)
    publisher.start()
    before = set(threading.enumerate())
    try:
        received = 0
        for i in range(50):
            client = OvsegClient("/close_stress", name=f"close_stress_{i}")
            if i % 10 == 0:  # now and then make sure messages really are flowing into the client being closed
                assert client.wait_for("labels", timeout=10) is not None
                received += 1
            start = time.monotonic()
            assert client.close(timeout=CLOSE_BOUND_S)
            assert time.monotonic() - start < CLOSE_BOUND_S
            assert client.close()  # twice is harmless
        assert received == 5
        assert wait_until(lambda: set(threading.enumerate()) <= before, 5), \
            [t.name for t in set(threading.enumerate()) - before]
    finally:
        stop.set()
        publisher.join(5)
        assert source_loop.stop(CLOSE_BOUND_S)
        executor.shutdown(timeout_sec=1)
        source.destroy_node()


def test_a_failing_callback_is_logged_and_the_loop_spins_on_and_destroys_between_turns(ros):
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from ovseg_ros.ros.spinning import SpinLoop

    node = rclpy.create_node("spin_loop_probe")
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    errors, ticks = [], []

    def tick() -> None:
        ticks.append(threading.get_ident())
        if len(ticks) % 2:
            raise RuntimeError("a callback that fails")

    node.create_timer(0.02, tick)
    loop = SpinLoop(executor, on_error=errors.append)
    loop.start()
    try:
        assert wait_until(lambda: len(ticks) >= 10, 10)
        assert errors and "a callback that fails" in errors[0] and len(errors) == 1  # logged once, not per tick
        ran_in = []
        loop.between_turns(lambda: ran_in.append(threading.get_ident()))
        assert wait_until(lambda: ran_in, 5) and ran_in[0] == loop._thread.ident
    finally:
        assert loop.stop(CLOSE_BOUND_S)
        executor.shutdown(timeout_sec=1)
        node.destroy_node()
