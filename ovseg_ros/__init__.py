"""ovseg_ros: open-vocabulary segmentation for ROS 2 (core in ovseg_ros.core, ROS side in ovseg_ros.ros)."""

import os

# Never let a library reach a model hub at run time: models come only from local, verified files (models/).
# Set here, once, because huggingface_hub reads it when it is first imported, by whichever module imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
