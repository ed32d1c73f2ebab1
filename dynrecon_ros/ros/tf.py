"""/tf publishing and the two frame modes (standalone ``map -> camera``; navigation ``odom -> base_link``).

Frames (REP-105)::

    standalone:   map ──> camera                       (camera = image header.frame_id or camera_frame)
    navigation:   map ··> odom ──> base_link ──> camera (map->odom: a localiser; odom->base_link: this node;
                                                         base_link->camera: the robot's URDF/static tf)
"""
from __future__ import annotations

import numpy as np
from geometry_msgs.msg import TransformStamped
from rclpy.node import Node
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from dynrecon_ros.ros.conversions import matrix_to_transform, transform_to_matrix, xyz_rpy_to_matrix
from dynrecon_ros.ros.qos import TF_QOS

try:  # a ROS distro's tf2_ros gives the real base->camera extrinsic from the tf tree
    import tf2_ros
except ImportError:
    tf2_ros = None

MODES = ('standalone', 'navigation')


class TransformBroadcaster:
    """Publishes TFMessage on /tf exactly as tf2_ros.TransformBroadcaster (depth 100, reliable, volatile)."""

    def __init__(self, node: Node, qos=TF_QOS):
        self.pub = node.create_publisher(TFMessage, '/tf', qos)

    def send_transform(self, transform: TransformStamped | list[TransformStamped]) -> None:
        transforms = transform if isinstance(transform, list) else [transform]
        self.pub.publish(TFMessage(transforms=transforms))


def stamped(T: np.ndarray, header: Header, child: str) -> TransformStamped:
    """(4, 4) parent<-child -> TransformStamped (header.frame_id = parent)."""
    return TransformStamped(header=header, child_frame_id=child, transform=matrix_to_transform(T))


class ExtrinsicSource:
    """base_frame <- camera_frame transform: from the tf tree when tf2_ros imports, else the parameter."""

    def __init__(self, node: Node, base_to_camera: list[float]):
        self.param = xyz_rpy_to_matrix(list(base_to_camera))
        self.buffer = None
        if tf2_ros is not None:
            self.buffer = tf2_ros.Buffer()
            self._listener = tf2_ros.TransformListener(self.buffer, node)
        self.source = 'parameter'

    def lookup(self, base_frame: str, camera_frame: str) -> np.ndarray:
        """(4, 4) base<-camera."""
        if self.buffer is not None:
            try:
                import rclpy.time
                tf = self.buffer.lookup_transform(base_frame, camera_frame, rclpy.time.Time())
                self.source = 'tf'
                return transform_to_matrix(tf.transform)
            except Exception:  # noqa: BLE001 - not yet on the tree: the parameter is the fallback
                pass
        self.source = 'parameter'
        return self.param


def navigation_pose(T_w_c0: np.ndarray, T_w_c: np.ndarray, T_b_c: np.ndarray) -> np.ndarray:
    """odom<-base for camera poses in the reconstruction's world frame.

    The odom frame is where base_link was at the first frame (REP-105: continuous, starts at the
    origin), so ``T_o_b = T_b_c · T_w_c0⁻¹ · T_w_c · T_b_c⁻¹``; then ``T_o_b · T_b_c`` is the camera's
    motion since the first frame expressed in odom. All (4, 4).
    """
    return T_b_c @ np.linalg.inv(T_w_c0) @ T_w_c @ np.linalg.inv(T_b_c)


def body_twist(T_prev: np.ndarray, T_cur: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear (3,) and angular (3,) velocity in the child (body) frame between two (4, 4) poses."""
    from scipy.spatial.transform import Rotation
    if dt <= 0:
        return np.zeros(3), np.zeros(3)
    d = np.linalg.inv(T_prev) @ T_cur
    return d[:3, 3] / dt, Rotation.from_matrix(d[:3, :3]).as_rotvec() / dt
