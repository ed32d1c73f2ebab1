"""Message <-> numpy conversions: Image, CompressedImage, CameraInfo, PointCloud2, transforms.

Like cv_bridge, image conversions are driven by one table (encoding -> dtype, channels); an unknown
encoding raises an error naming it. Everything is vectorised: no per-pixel or per-point Python.
cv_bridge and sensor_msgs_py are not installable on the machines without a ROS distro, and their
behaviour for the cases we need is small, so this module is its own implementation (same semantics:
``step`` padding and ``is_bigendian`` honoured, the same field layout for PointCloud2).

All functions raise :class:`ConversionError` (an ``InputError``) with a message naming the problem;
the node prefixes the topic.
"""
from __future__ import annotations

import array
import sys

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, Quaternion, Transform, Vector3
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header

from dynrecon_ros import compressed_depth
from dynrecon_ros import image_encodings as encodings
from dynrecon_ros.errors import InputError

try:  # a ROS distro's cv_bridge / sensor_msgs_py do the unpacking when present (same results)
    from cv_bridge import CvBridge
    _BRIDGE = CvBridge()
except ImportError:
    _BRIDGE = None
try:
    from sensor_msgs_py import point_cloud2 as _pc2
except ImportError:
    _pc2 = None


class ConversionError(InputError):
    """A message that cannot be converted; the text names the problem (not the topic)."""


# The encoding table (shared with data/bags.py): encoding -> (dtype, channels), colour order, depth unit.
ENCODINGS = encodings.ENCODINGS

_NATIVE_BIG = sys.byteorder == 'big'


def _bytes_array(buf: bytes | memoryview) -> array.array:
    """bytes -> array('B') (a memcpy; rclpy would check a list element by element)."""
    out = array.array('B')
    out.frombytes(buf)
    return out


def stamp_to_sec(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def sec_to_stamp(t: float) -> Time:
    ns = int(round(t * 1e9))
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


# ---------------------------------------------------------------- images

def image_to_numpy(msg: Image) -> np.ndarray:
    """sensor_msgs/Image -> (H, W) or (H, W, C) array of the encoding's dtype, native byte order.

    Honours ``step`` (row padding) and ``is_bigendian``. Returns a copy (the message can be freed).
    """
    enc = msg.encoding
    if enc not in ENCODINGS:
        raise ConversionError(f"unknown encoding '{enc}' (supported: {', '.join(ENCODINGS)})")
    dtype, ch = ENCODINGS[enc]
    h, w = int(msg.height), int(msg.width)
    if h <= 0 or w <= 0:
        raise ConversionError(f'zero-size image ({w}x{h})')
    row = w * ch * dtype.itemsize
    if msg.step < row:
        raise ConversionError(f'step {msg.step} too small for {w} px of {enc} (needs >= {row})')
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size != msg.step * h:
        raise ConversionError(f'data length {buf.size} does not match step*height = {msg.step}*{h} '
                              f'= {msg.step * h}')
    if _BRIDGE is not None:
        return np.array(_BRIDGE.imgmsg_to_cv2(msg, desired_encoding='passthrough'), dtype=dtype)
    rows = buf.reshape(h, msg.step)[:, :row]
    typed = np.ascontiguousarray(rows).view(dtype.newbyteorder('>' if msg.is_bigendian else '<'))
    out = typed.reshape((h, w, ch) if ch > 1 else (h, w)).astype(dtype, copy=True)
    return out


def numpy_to_image(arr: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """(H, W) or (H, W, C) array -> sensor_msgs/Image (dense rows, native byte order)."""
    if encoding not in ENCODINGS:
        raise ConversionError(f"unknown encoding '{encoding}'")
    dtype, ch = ENCODINGS[encoding]
    arr = np.asarray(arr)
    got_ch = 1 if arr.ndim == 2 else arr.shape[2]
    if arr.ndim not in (2, 3) or got_ch != ch:
        raise ConversionError(f'array of shape {arr.shape} does not fit encoding {encoding} ({ch} channels)')
    arr = np.ascontiguousarray(arr, dtype=dtype)
    msg = Image(header=header or Header(), height=arr.shape[0], width=arr.shape[1], encoding=encoding,
                is_bigendian=int(_NATIVE_BIG), step=arr.shape[1] * ch * dtype.itemsize)
    msg.data = _bytes_array(arr.tobytes())
    return msg


def image_to_rgb(msg: Image) -> np.ndarray:
    """Colour or mono Image -> (H, W, 3) uint8 RGB. mono16 is scaled by 1/256 (as cv_bridge does); 8UC3,
    which carries no channel order, is refused as cv_bridge refuses it (see dynrecon_ros.image_encodings)."""
    arr = image_to_numpy(msg)
    try:
        return encodings.to_rgb(arr, msg.encoding)
    except InputError as exc:
        raise ConversionError(str(exc)) from None


def image_to_depth(msg: Image) -> np.ndarray:
    """Depth Image (32FC1 metres, 16UC1/mono16 millimetres) -> (H, W) float32 metres, 0 = no reading."""
    if msg.encoding not in encodings.DEPTH_SCALE:
        raise ConversionError(f"unsupported depth encoding '{msg.encoding}' (use 32FC1 or 16UC1)")
    return encodings.to_depth(image_to_numpy(msg), msg.encoding)


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """CompressedImage (jpeg/png) -> (H, W, 3) uint8 RGB via cv2.imdecode."""
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size == 0:
        raise ConversionError('empty compressed image')
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ConversionError(f"cannot decode compressed image (format '{msg.format}')")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def rgb_to_compressed(rgb: np.ndarray, fmt: str = 'png', header: Header | None = None, params=(),
                      format_string: str | None = None) -> CompressedImage:
    """(H, W, 3) uint8 RGB -> CompressedImage (``fmt`` 'png', 'jpeg' or 'jpg'; ``params`` cv2.IMWRITE_*
    pairs); ``format`` is ``format_string`` or ``fmt``."""
    ok, buf = cv2.imencode('.' + fmt, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), list(params))
    if not ok:
        raise ConversionError(f'cannot encode {fmt}')
    msg = CompressedImage(header=header or Header(), format=format_string or fmt)
    msg.data = _bytes_array(buf.tobytes())
    return msg


# image_transport's compressed plugin defaults (compressed_publisher.cpp): jpeg_quality 95, png_level 3.
COMPRESSED_PARAMS = {'jpeg': (cv2.IMWRITE_JPEG_QUALITY, 95), 'png': (cv2.IMWRITE_PNG_COMPRESSION, 3)}


def image_to_compressed(msg: Image, fmt: str = 'png') -> CompressedImage:
    """Colour/mono Image -> CompressedImage as image_transport's ``compressed`` plugin publishes it:
    encoded from bgr8, ``format`` ``"<encoding>; <jpeg|png> compressed bgr8"``, the plugin's default
    quality/level."""
    if fmt not in COMPRESSED_PARAMS:
        raise ConversionError(f"compressed format must be 'png' or 'jpeg', got '{fmt}'")
    return rgb_to_compressed(image_to_rgb(msg), fmt, msg.header, COMPRESSED_PARAMS[fmt],
                             f'{msg.encoding}; {fmt} compressed bgr8')


def image_to_compressed_depth(msg: Image) -> CompressedImage:
    """16UC1 or 32FC1 depth Image -> compressedDepth CompressedImage (the plugin's default parameters)."""
    if msg.encoding not in compressed_depth.ENCODINGS:
        raise ConversionError(f"compressedDepth takes 16UC1 or 32FC1 depth, not '{msg.encoding}'")
    return depth_to_compressed_depth(image_to_numpy(msg), msg.encoding, msg.header)


def compressed_depth_to_depth(msg: CompressedImage) -> np.ndarray:
    """CompressedImage in image_transport's compressedDepth format (16UC1 mm or inverse-depth quantised
    32FC1, see :mod:`dynrecon_ros.compressed_depth`) -> (H, W) float32 metres, 0 = no reading."""
    try:
        encoding, arr = compressed_depth.decode(msg.format, msg.data)
    except InputError as exc:
        raise ConversionError(str(exc)) from None
    return encodings.to_depth(arr, encoding)


def depth_to_compressed_depth(depth: np.ndarray, encoding: str = '32FC1', header: Header | None = None,
                              **params) -> CompressedImage:
    """(H, W) depth (float32 m for 32FC1, uint16 mm for 16UC1; NaN/0 = no reading) -> compressedDepth
    CompressedImage as compressed_depth_image_transport publishes it (``params``: depth_max,
    depth_quantization, png_level; the plugin's defaults)."""
    try:
        fmt, data = compressed_depth.encode(depth, encoding, **params)
    except InputError as exc:
        raise ConversionError(str(exc)) from None
    msg = CompressedImage(header=header or Header(), format=fmt)
    msg.data = _bytes_array(data)
    return msg


# ---------------------------------------------------------------- camera info

def camera_info_to_numpy(msg: CameraInfo) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """CameraInfo -> (K (3, 3) float64, D (N,) float64, (W, H)). Rejects an all-zero or invalid K."""
    K = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    if not np.any(K):
        raise ConversionError('camera_info K is all zero (uncalibrated camera)')
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ConversionError(f'camera_info K has non-finite or non-positive focal lengths: {K.ravel().tolist()}')
    D = np.asarray(msg.d, dtype=np.float64)
    return K, D, (int(msg.width), int(msg.height))


def numpy_to_camera_info(K: np.ndarray, size: tuple[int, int], header: Header | None = None,
                         D: np.ndarray | None = None) -> CameraInfo:
    """K (3, 3), (W, H) -> CameraInfo with plumb_bob model, identity R and P = [K | 0]."""
    K = np.asarray(K, dtype=np.float64).reshape(3, 3)
    P = np.zeros((3, 4))
    P[:, :3] = K
    msg = CameraInfo(header=header or Header(), width=int(size[0]), height=int(size[1]),
                     distortion_model='plumb_bob')
    msg.k = K.ravel().copy()
    msg.r = np.eye(3).ravel()
    msg.p = P.ravel()
    msg.d = array.array('d', np.zeros(5) if D is None else np.asarray(D, dtype=np.float64))
    return msg


class Undistorter:
    """Undistorts images for one (K, D, size); the remap tables are built once and reused."""

    def __init__(self, K: np.ndarray, D: np.ndarray, size: tuple[int, int]):
        self.key = (K.tobytes(), D.tobytes(), tuple(size))
        self.K = K
        self.maps = cv2.initUndistortRectifyMap(K, D, None, K, tuple(size), cv2.CV_32FC1)

    def __call__(self, img: np.ndarray, nearest: bool = False) -> np.ndarray:
        """(H, W[, C]) -> same shape; nearest for depth so readings are not blended across edges."""
        return cv2.remap(img, *self.maps, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


# ---------------------------------------------------------------- point clouds

_PF_DTYPES = {PointField.INT8: 'i1', PointField.UINT8: 'u1', PointField.INT16: 'i2', PointField.UINT16: 'u2',
              PointField.INT32: 'i4', PointField.UINT32: 'u4', PointField.FLOAT32: 'f4',
              PointField.FLOAT64: 'f8'}


def xyzrgb_to_cloud(points: np.ndarray, header: Header | None = None) -> PointCloud2:
    """(N, 6) xyz (m) + rgb (0-255 or 0-1 floats) -> PointCloud2 with x, y, z float32 and rgb packed float32.

    Layout as sensor_msgs_py.point_cloud2 / PCL write it: point_step 16, offsets 0, 4, 8, 12; ``rgb`` is
    the uint32 0x00RRGGBB reinterpreted as float32 (what RViz and PCL read).
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise ConversionError(f'points must be (N, 3) or (N, 6), got {points.shape}')
    n = points.shape[0]
    data = np.empty((n, 4), dtype=np.float32)
    data[:, :3] = points[:, :3]
    if points.shape[1] == 6:
        rgb = points[:, 3:6].astype(np.float32)
        if n and rgb.max() <= 1.0:
            rgb = rgb * 255.0
        c = np.clip(np.rint(rgb), 0, 255).astype(np.uint32)
        data.view(np.uint32)[:, 3] = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    else:
        data.view(np.uint32)[:, 3] = 0
    fields = [PointField(name=nm, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, nm in enumerate(('x', 'y', 'z', 'rgb'))]
    msg = PointCloud2(header=header or Header(), height=1, width=n, fields=fields,
                      is_bigendian=_NATIVE_BIG, point_step=16, row_step=16 * n, is_dense=True)
    msg.data = _bytes_array(data.tobytes())
    return msg


def cloud_to_numpy(msg: PointCloud2) -> np.ndarray:
    """PointCloud2 -> structured array with one named field per PointField (any offsets/point_step)."""
    order = '>' if msg.is_bigendian else '<'
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in _PF_DTYPES:
            raise ConversionError(f'unknown PointField datatype {f.datatype} for field {f.name}')
        names.append(f.name)
        formats.append((order + _PF_DTYPES[f.datatype], (f.count,)) if f.count > 1 else order + _PF_DTYPES[f.datatype])
        offsets.append(f.offset)
    dtype = np.dtype({'names': names, 'formats': formats, 'offsets': offsets, 'itemsize': msg.point_step})
    n = msg.width * msg.height
    if _pc2 is not None:
        return np.asarray(_pc2.read_points(msg, skip_nans=False)).ravel()
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size < n * msg.point_step:
        raise ConversionError(f'cloud data length {buf.size} < width*height*point_step = {n * msg.point_step}')
    if msg.height > 1 and msg.row_step != msg.width * msg.point_step:  # padded rows: drop the padding
        buf = buf.reshape(msg.height, msg.row_step)[:, :msg.width * msg.point_step].ravel()
    return np.frombuffer(buf[:n * msg.point_step].tobytes(), dtype=dtype)


def cloud_to_xyzrgb(msg: PointCloud2) -> np.ndarray:
    """PointCloud2 with x, y, z (+ packed rgb) -> (N, 6) float32 xyz + rgb in 0-255 (0 when absent)."""
    arr = cloud_to_numpy(msg)
    out = np.zeros((arr.size, 6), dtype=np.float32)
    for i, nm in enumerate('xyz'):
        out[:, i] = arr[nm]
    if 'rgb' in arr.dtype.names:
        packed = np.ascontiguousarray(arr['rgb'], dtype=np.float32).view(np.uint32)
        out[:, 3] = (packed >> 16) & 0xFF
        out[:, 4] = (packed >> 8) & 0xFF
        out[:, 5] = packed & 0xFF
    return out


# ---------------------------------------------------------------- transforms

def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation (re-orthonormalised) -> (4,) unit quaternion x, y, z, w with w >= 0."""
    U, _, Vt = np.linalg.svd(np.asarray(R, dtype=np.float64))
    R = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
    q = Rotation.from_matrix(R).as_quat()
    q = q / np.linalg.norm(q)
    return -q if q[3] < 0 else q


def matrix_to_transform(T: np.ndarray) -> Transform:
    """(4, 4) rigid transform -> geometry_msgs/Transform (unit quaternion, never NaN)."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ConversionError(f'pose is not a finite 4x4 matrix: {T.tolist()}')
    q = matrix_to_quaternion(T[:3, :3])
    return Transform(translation=Vector3(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
                     rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))


def matrix_to_pose(T: np.ndarray) -> Pose:
    tf = matrix_to_transform(T)
    p = Pose()
    p.position.x, p.position.y, p.position.z = tf.translation.x, tf.translation.y, tf.translation.z
    p.orientation = tf.rotation
    return p


def transform_to_matrix(tf: Transform | Pose) -> np.ndarray:
    """geometry_msgs Transform or Pose -> (4, 4)."""
    t = tf.translation if isinstance(tf, Transform) else tf.position
    q = tf.rotation if isinstance(tf, Transform) else tf.orientation
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()
    T[:3, 3] = [t.x, t.y, t.z]
    return T


def xyz_rpy_to_matrix(values: list[float]) -> np.ndarray:
    """[x, y, z, roll, pitch, yaw] (m, rad; as static_transform_publisher) -> (4, 4) parent<-child."""
    if len(values) != 6:
        raise ConversionError(f'extrinsic must be [x, y, z, roll, pitch, yaw], got {list(values)}')
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('xyz', values[3:]).as_matrix()
    T[:3, 3] = values[:3]
    return T
