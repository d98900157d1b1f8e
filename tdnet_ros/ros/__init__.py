"""ROS 2 integration of tdnet_ros: the segmentation node and its helpers.

This is the only part of the package that imports rclpy; the core (model, segmenter,
image conversion, masks) is usable and tested without a ROS graph.
"""
