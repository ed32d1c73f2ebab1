"""QoS profiles of the node's topics, stated in one place."""
from __future__ import annotations

from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)

# Inputs: sensor-data QoS (best effort, keep last 5) unless `qos_reliable` is set. A best-effort
# subscriber matches both reliable and best-effort publishers; a reliable one only reliable publishers.
SENSOR_QOS = qos_profile_sensor_data
RELIABLE_INPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                                reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
# /tf exactly as tf2_ros.TransformBroadcaster: depth 100, reliable, volatile.
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                    reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
# Static map: latched, so a late RViz gets the latest map.
MAP_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                     reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Per-frame outputs (mask, depth, camera_info, pose, odom, path): reliable, keep last 10.
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                        reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


def input_qos(reliable: bool, depth: int = 5) -> QoSProfile:
    """Subscription QoS for the image/depth/camera_info inputs."""
    if not reliable:
        return SENSOR_QOS
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(depth, 10),
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
