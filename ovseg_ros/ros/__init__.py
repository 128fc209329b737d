"""The ROS 2 side of ovseg_ros: the node, message conversion, scheduling, parameters (the core is ROS-free)."""
