"""QoS profiles of the node's topics, stated in one place, and the DDS transport profile its frames need."""
from __future__ import annotations

import os
import pathlib
import sys

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


# Transport: Fast DDS's default shared-memory segment (512 KB) holds less than one 320x240 RGB-D frame (image +
# depth); the writer puts samples into its own segment, so publishers and subscribers of frames both need the
# large segment of config/fastdds_shm.xml, or frames are lost (best effort silently; reliable under load too).
FASTDDS_PROFILE = 'fastdds_shm.xml'


def default_fastdds_profile() -> pathlib.Path | None:
    """config/fastdds_shm.xml from the installed share dir, else from the source tree."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(pathlib.Path(get_package_share_directory('dynrecon_ros')) / 'config' / FASTDDS_PROFILE)
    except Exception:  # noqa: BLE001 - no ament index outside a ROS install
        pass
    candidates.append(pathlib.Path(__file__).resolve().parents[2] / 'config' / FASTDDS_PROFILE)
    candidates.append(pathlib.Path(sys.prefix) / 'share' / 'dynrecon_ros' / 'config' / FASTDDS_PROFILE)
    return next((p for p in candidates if p.is_file()), None)


def use_large_shm_segment() -> None:
    """Point FASTDDS_DEFAULT_PROFILES_FILE at :func:`default_fastdds_profile` unless it is set: call before this
    process's first DDS participant (Fast DDS reads its profiles once per process)."""
    if not os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE'):
        profile = default_fastdds_profile()
        if profile is not None:
            os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(profile)
