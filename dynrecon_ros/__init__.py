"""dynrecon_ros: dynamic-scene-aware 3D reconstruction from a camera stream.

The core (everything outside ``dynrecon_ros.ros``) is a plain numpy/torch/OpenCV library with no
rclpy import; ``dynrecon_ros.ros`` is the thin ROS 2 adapter over it.
"""
__version__ = '0.1.0'
