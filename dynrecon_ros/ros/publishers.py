"""recon_node's outputs: one small class per topic (or per group of topics stamped together), each
making its publisher with the QoS stated here, as tf2_ros's TransformBroadcaster does for /tf.

=====================  =====================  ============  ===========================================
topic                  type                   QoS           class
=====================  =====================  ============  ===========================================
``~/dynamic_mask``     sensor_msgs/Image      OUTPUT_QOS    :class:`FrameImagePublisher` (mono8, 255 =
``~/depth``            sensor_msgs/Image      OUTPUT_QOS    moving), depth 32FC1 m and camera_info, all
``~/camera_info``      sensor_msgs/CameraInfo OUTPUT_QOS    with the input image's header and size
``~/pose``             geometry_msgs/PoseSt.  OUTPUT_QOS    :class:`PosePublisher`
``~/path``             nav_msgs/Path          OUTPUT_QOS    :class:`PathPublisher` (rate-limited, bounded)
``~/odom``             nav_msgs/Odometry      OUTPUT_QOS    :class:`OdometryPublisher`
``~/static_map``       sensor_msgs/PointCloud2 MAP_QOS      :class:`MapPublisher` (latched)
``/tf``                tf2_msgs/TFMessage     TF_QOS        :class:`dynrecon_ros.ros.tf.TransformBroadcaster`
=====================  =====================  ============  ===========================================

``param(name)`` is the node's current value of a parameter (read at each use, as the node did).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import cv2
import numpy as np
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry, Path
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

from dynrecon_ros.ros import conversions as conv
from dynrecon_ros.ros.qos import MAP_QOS, OUTPUT_QOS
from dynrecon_ros.ros.tf import body_twist


class FrameImagePublisher:
    """``~/dynamic_mask`` (mono8), ``~/depth`` (32FC1 m) and ``~/camera_info`` of one processed frame, at
    the input image's size and with its header (a smaller pipeline output is resized, K scaled)."""

    def __init__(self, node: Node, qos=OUTPUT_QOS):
        self.mask = node.create_publisher(Image, '~/dynamic_mask', qos)
        self.depth = node.create_publisher(Image, '~/depth', qos)
        self.info = node.create_publisher(CameraInfo, '~/camera_info', qos)

    def publish(self, header: Header, size: tuple[int, int], mask, depth, K_out, K_in) -> None:
        """``mask`` (h, w) bool/uint8 or None; ``depth`` (h, w) m or None; ``K_out`` the pipeline's (3, 3)
        for ``depth`` (None: ``K_in``, the input's); ``size`` the input image's (W, H)."""
        w, h = size
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.shape != (h, w):
                mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
            self.mask.publish(conv.numpy_to_image(mask, 'mono8', header))
        if depth is None:
            return
        depth = np.asarray(depth, dtype=np.float32)
        K = K_out if K_out is not None else K_in
        K = np.asarray(K, dtype=np.float64) if K is not None else None
        if depth.shape != (h, w):
            if K is not None:
                K = K.copy()
                K[0] *= w / depth.shape[1]
                K[1] *= h / depth.shape[0]
            depth = cv2.resize(depth, (w, h), interpolation=cv2.INTER_NEAREST)
        self.depth.publish(conv.numpy_to_image(depth, '32FC1', header))
        if K is not None:
            self.info.publish(conv.numpy_to_camera_info(K, (w, h), header))


class PosePublisher:
    """``~/pose``: the camera pose of each processed frame."""

    def __init__(self, node: Node, qos=OUTPUT_QOS):
        self.pub = node.create_publisher(PoseStamped, '~/pose', qos)

    def publish(self, header: Header, T: np.ndarray) -> PoseStamped:
        """(4, 4) pose in ``header.frame_id`` -> published PoseStamped (returned for the path)."""
        pose = PoseStamped(header=header, pose=conv.matrix_to_pose(T))
        self.pub.publish(pose)
        return pose


class PathPublisher:
    """``~/path``: every pose so far (the oldest dropped beyond ``max_path_length``), re-sent at most
    ``publish_path_rate`` times a second (0: with every pose) since a long path costs CPU to send.
    Thread-safe: poses are appended by the thread that publishes the frames, the path is sent (a copy of
    the list, so appending does not wait for the send) by the node's periodic thread."""

    def __init__(self, node: Node, param: Callable[[str], object], qos=OUTPUT_QOS):
        self.pub = node.create_publisher(Path, '~/path', qos)
        self._param = param
        self.path = Path()
        self._dirty = False
        self._last_pub = 0.0
        self._lock = threading.Lock()

    def append(self, pose: PoseStamped) -> None:
        with self._lock:
            self.path.header = pose.header
            self.path.poses.append(pose)
            if len(self.path.poses) > int(self._param('max_path_length')):
                del self.path.poses[0]
            self._dirty = True

    def maybe_publish(self, force: bool = False) -> None:
        rate = float(self._param('publish_path_rate'))
        now = time.monotonic()
        with self._lock:
            if not self._dirty or (not force and rate > 0 and now - self._last_pub < 1.0 / rate):
                return
            self._last_pub = now
            self._dirty = False
            msg = Path(header=self.path.header, poses=list(self.path.poses))
        self.pub.publish(msg)

    def last_stamp(self):
        """Stamp of the newest pose, or None when the path is empty."""
        with self._lock:
            return self.path.poses[-1].header.stamp if self.path.poses else None

    def reset(self) -> None:
        with self._lock:
            self.path = Path()


class OdometryPublisher:
    """``~/odom``: pose with ``odom_pose_variance`` on the covariance diagonal, and the body-frame twist
    from the previous pose (``odom_twist_variance``)."""

    def __init__(self, node: Node, param: Callable[[str], object], qos=OUTPUT_QOS):
        self.pub = node.create_publisher(Odometry, '~/odom', qos)
        self._param = param
        self._prev: tuple[float, np.ndarray] | None = None

    def publish(self, header: Header, T: np.ndarray, child: str) -> None:
        """(4, 4) pose of ``child`` in ``header.frame_id``."""
        odom = Odometry(header=header, child_frame_id=child)
        odom.pose.pose = conv.matrix_to_pose(T)
        odom.pose.covariance = np.diag(np.asarray(self._param('odom_pose_variance'), float)).ravel()
        t = conv.stamp_to_sec(header.stamp)
        if self._prev is not None:
            v, w = body_twist(self._prev[1], T, t - self._prev[0])
            odom.twist.twist.linear.x, odom.twist.twist.linear.y, odom.twist.twist.linear.z = map(float, v)
            odom.twist.twist.angular.x, odom.twist.twist.angular.y, odom.twist.twist.angular.z = map(float, w)
        odom.twist.covariance = np.diag(np.asarray(self._param('odom_twist_variance'), float)).ravel()
        self._prev = (t, T)
        self.pub.publish(odom)

    def reset(self) -> None:
        self._prev = None


class MapPublisher:
    """``~/static_map``: the static map as PointCloud2 (x, y, z, rgb), latched (MAP_QOS) so that a late
    RViz gets the latest map."""

    def __init__(self, node: Node, qos=MAP_QOS):
        self.pub = node.create_publisher(PointCloud2, '~/static_map', qos)

    def publish(self, points: np.ndarray, header: Header) -> None:
        """(N, 6) xyz + rgb."""
        self.pub.publish(conv.xyzrgb_to_cloud(points, header))
