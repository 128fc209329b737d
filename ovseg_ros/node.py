"""`python -m ovseg_ros.node` and the `ovseg_node` executable: the node lives in ovseg_ros/ros/node.py."""

import sys

from .ros.node import OvsegNode, main

__all__ = ["OvsegNode", "main"]

if __name__ == "__main__":
    sys.exit(main())
