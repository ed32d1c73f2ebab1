"""Message <-> numpy conversions against hand-built messages (every encoding, padding, byte order)."""
import struct

import numpy as np
import pytest

pytest.importorskip('rclpy')
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField  # noqa: E402

from dynrecon_ros.ros import conversions as conv  # noqa: E402


def hand_image(h, w, encoding, rows_bytes, step, bigendian=0):
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=bigendian, step=step)
    msg.data = b''.join(rows_bytes)
    return msg


PIXEL = {  # one pixel (r=10, g=20, b=30, a=40) written by hand in each encoding
    'rgb8': bytes([10, 20, 30]), 'bgr8': bytes([30, 20, 10]), 'rgba8': bytes([10, 20, 30, 40]),
    'bgra8': bytes([30, 20, 10, 40]), 'mono8': bytes([20]),
}


@pytest.mark.parametrize('encoding', list(PIXEL))
def test_colour_encodings_with_step_padding(encoding):
    h, w, pad = 3, 5, 7
    px = PIXEL[encoding]
    row = px * w + b'\xee' * pad  # padding bytes must be ignored
    msg = hand_image(h, w, encoding, [row] * h, step=len(px) * w + pad)
    rgb = conv.image_to_rgb(msg)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    want = [20, 20, 20] if encoding == 'mono8' else [10, 20, 30]
    assert (rgb == want).all()


def test_mono16_big_and_little_endian():
    h, w = 2, 3
    vals = np.arange(h * w, dtype=np.uint16).reshape(h, w) * 1000 + 7
    big = hand_image(h, w, 'mono16', [b''.join(struct.pack('>H', int(v)) for v in r) for r in vals], 2 * w, 1)
    little = hand_image(h, w, 'mono16', [b''.join(struct.pack('<H', int(v)) for v in r) for r in vals], 2 * w, 0)
    assert (conv.image_to_numpy(big) == vals).all()
    assert (conv.image_to_numpy(little) == vals).all()
    assert (conv.image_to_rgb(big)[..., 0] == (vals >> 8)).all()
    # as depth in millimetres
    assert np.allclose(conv.image_to_depth(big), vals / 1000.0)


def test_depth_32fc1_with_nan_and_16uc1_padding():
    h, w = 2, 2
    vals = [[1.5, float('nan')], [0.0, 2.25]]
    rows = [b''.join(struct.pack('<f', v) for v in r) + b'\0\0\0\0' for r in vals]
    d = conv.image_to_depth(hand_image(h, w, '32FC1', rows, step=4 * w + 4))
    assert d.dtype == np.float32 and np.allclose(d, [[1.5, 0.0], [0.0, 2.25]])
    rows16 = [struct.pack('<HH', 1500, 0) + b'\x01\x02', struct.pack('<HH', 65535, 250) + b'\x01\x02']
    d16 = conv.image_to_depth(hand_image(h, w, '16UC1', rows16, step=6))
    assert np.allclose(d16, [[1.5, 0.0], [65.535, 0.25]])


@pytest.mark.parametrize('encoding', ['rgb8', 'bgra8', 'mono8', 'mono16', '32FC1', '16UC1'])
def test_round_trip(encoding):
    dtype, ch = conv.ENCODINGS[encoding]
    rng = np.random.default_rng(0)
    shape = (4, 6) if ch == 1 else (4, 6, ch)
    arr = (rng.random(shape) * 1000).astype(dtype)
    msg = conv.numpy_to_image(arr, encoding)
    assert msg.step == 6 * ch * dtype.itemsize and len(msg.data) == msg.step * 4
    assert (conv.image_to_numpy(msg) == arr).all()


@pytest.mark.parametrize('mutate, problem', [
    (lambda m: setattr(m, 'encoding', 'yuv422_weird'), "unknown encoding 'yuv422_weird'"),
    (lambda m: setattr(m, 'step', 5), 'step 5 too small'),
    (lambda m: setattr(m, 'data', bytes(len(m.data) - 1)), 'data length'),
    (lambda m: (setattr(m, 'width', 0), setattr(m, 'data', b'')), 'zero-size image'),
])
def test_bad_images_name_the_problem(mutate, problem):
    msg = conv.numpy_to_image(np.zeros((4, 6, 3), np.uint8), 'rgb8')
    mutate(msg)
    with pytest.raises(conv.ConversionError, match=problem):
        conv.image_to_rgb(msg)


def test_compressed_png_and_jpeg():
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = [200, 30, 10]
    png = conv.rgb_to_compressed(rgb, 'png')
    assert (conv.compressed_to_rgb(png) == rgb).all()
    jpg = conv.rgb_to_compressed(rgb, 'jpg')
    assert np.abs(conv.compressed_to_rgb(jpg).astype(int) - rgb).mean() < 6
    bad = conv.rgb_to_compressed(rgb, 'png')
    bad.data = b'not an image'
    with pytest.raises(conv.ConversionError, match='cannot decode'):
        conv.compressed_to_rgb(bad)


def test_camera_info_and_zero_K():
    K = np.array([[500.0, 0, 320], [0, 510, 240], [0, 0, 1]])
    msg = conv.numpy_to_camera_info(K, (640, 480))
    K2, D, size = conv.camera_info_to_numpy(msg)
    assert np.allclose(K2, K) and size == (640, 480) and not D.any()
    assert list(msg.p) == [500, 0, 320, 0, 0, 510, 240, 0, 0, 0, 1, 0]
    with pytest.raises(conv.ConversionError, match='K is all zero'):
        conv.camera_info_to_numpy(CameraInfo(width=640, height=480))


def test_undistort_moves_points_as_opencv_says():
    import cv2
    K = np.array([[300.0, 0, 80], [0, 300, 60], [0, 0, 1]])
    D = np.array([0.2, -0.1, 0.0, 0.0, 0.0])
    img = np.zeros((120, 160), np.uint8)
    img[10:14, 10:14] = 255
    und = conv.Undistorter(K, D, (160, 120))(img, nearest=True)
    ys, xs = np.nonzero(und)
    want = cv2.undistortPoints(np.array([[[11.5, 11.5]]]), K, D, P=K)[0, 0]
    assert abs(xs.mean() - want[0]) < 1.5 and abs(ys.mean() - want[1]) < 1.5


def test_pointcloud2_layout_matches_hand_packing():
    pts = np.array([[1.0, 2.0, 3.0, 255, 128, 1], [-1.5, 0.25, 9.0, 0, 0, 0]], np.float32)
    msg = conv.xyzrgb_to_cloud(pts)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ('x', 0, PointField.FLOAT32, 1), ('y', 4, PointField.FLOAT32, 1), ('z', 8, PointField.FLOAT32, 1),
        ('rgb', 12, PointField.FLOAT32, 1)]
    assert msg.point_step == 16 and msg.row_step == 32 and msg.height == 1 and msg.width == 2
    hand = struct.pack('<fffI', 1.0, 2.0, 3.0, (255 << 16) | (128 << 8) | 1) + struct.pack('<fffI', -1.5, 0.25, 9.0, 0)
    assert bytes(msg.data) == hand
    assert np.allclose(conv.cloud_to_xyzrgb(msg), pts)


def test_read_cloud_with_other_layout():
    # x y z float32 + intensity float64 + padding: point_step 32, fields out of order, big-endian
    fields = [PointField(name='z', offset=8, datatype=PointField.FLOAT32, count=1),
              PointField(name='x', offset=0, datatype=PointField.FLOAT32, count=1),
              PointField(name='y', offset=4, datatype=PointField.FLOAT32, count=1),
              PointField(name='intensity', offset=16, datatype=PointField.FLOAT64, count=1)]
    rows = [struct.pack('>fff4xd8x', 1, 2, 3, 0.5), struct.pack('>fff4xd8x', 4, 5, 6, 0.75)]
    msg = PointCloud2(height=1, width=2, fields=fields, is_bigendian=True, point_step=32, row_step=64,
                      is_dense=True)
    msg.data = b''.join(rows)
    arr = conv.cloud_to_numpy(msg)
    assert list(arr['x']) == [1, 4] and list(arr['z']) == [3, 6] and list(arr['intensity']) == [0.5, 0.75]
    assert np.allclose(conv.cloud_to_xyzrgb(msg)[:, :3], [[1, 2, 3], [4, 5, 6]])


def test_transform_round_trip_and_unit_quaternion():
    from scipy.spatial.transform import Rotation
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('xyz', [0.3, -1.2, 2.5]).as_matrix() * 1.001  # slightly off-orthonormal
    T[:3, 3] = [1, -2, 3]
    tf = conv.matrix_to_transform(T)
    q = np.array([tf.rotation.x, tf.rotation.y, tf.rotation.z, tf.rotation.w])
    assert abs(np.linalg.norm(q) - 1) < 1e-12 and q[3] >= 0
    assert np.allclose(conv.transform_to_matrix(tf)[:3, :3], T[:3, :3] / 1.001, atol=1e-9)
    with pytest.raises(conv.ConversionError):
        conv.matrix_to_transform(np.full((4, 4), np.nan))


def test_compressed_depth_messages():
    """depth -> compressedDepth CompressedImage -> metres (NaN/0 = no reading -> 0); garbage names the fault."""
    depth = np.full((4, 6), 2.0, np.float32)
    depth[0, 0] = np.nan
    msg = conv.depth_to_compressed_depth(depth, '32FC1')
    assert msg.format == '32FC1; compressedDepth png' and bytes(msg.data[:4]) == bytes(4)
    back = conv.compressed_depth_to_depth(msg)
    assert back.dtype == np.float32 and back[0, 0] == 0.0
    assert np.all(np.abs(back.ravel()[1:] - 2.0) <= 4.0 / 10100)
    mm = conv.depth_to_compressed_depth(np.full((4, 6), 1234, np.uint16), '16UC1')
    assert np.allclose(conv.compressed_depth_to_depth(mm), 1.234)
    msg.data = msg.data[:20]
    with pytest.raises(conv.ConversionError, match='corrupt or truncated'):
        conv.compressed_depth_to_depth(msg)
