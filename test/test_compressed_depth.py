"""image_transport's compressedDepth format: payloads built by hand from the plugin's layout (12-byte
ConfigHeader {int32 format, float32 depthParam[2]} + PNG) decode to the depths they hold; what we write
has that layout; 32FC1 round trips within one quantisation step; bad payloads raise naming the fault."""
import struct

import cv2
import numpy as np
import pytest

from dynrecon_ros import compressed_depth as cd
from dynrecon_ros.errors import InputError


def png16(img):
    ok, buf = cv2.imencode('.png', img.astype(np.uint16))
    assert ok
    return buf.tobytes()


def test_hand_built_16uc1_payload():
    mm = np.array([[1500, 0], [65535, 250]], np.uint16)
    data = struct.pack('<iff', 0, 0.0, 0.0) + png16(mm)
    enc, arr = cd.decode('16UC1; compressedDepth png', data)
    assert enc == '16UC1' and arr.dtype == np.uint16 and np.array_equal(arr, mm)
    # a publisher from before the '; compressedDepth <codec>' suffix: PNG
    assert np.array_equal(cd.decode('16UC1', data)[1], mm)
    assert np.array_equal(cd.decode('mono16; compressedDepth png', data)[1], mm)  # any 16-bit mono, as the plugin


def test_hand_built_32fc1_inverse_depth_payload():
    """The plugin's defaults: depth_max 10 m, depth_quantization 100 -> A = 100 * 101, B = 1 - A / 10."""
    A, B = 100.0 * 101.0, 1.0 - 100.0 * 101.0 / 10.0
    q = np.array([[0, 4041], [11091, 1]], np.uint16)  # 0: no reading
    data = struct.pack('<iff', 0, A, B) + png16(q)
    enc, d = cd.decode('32FC1; compressedDepth png', data)
    assert enc == '32FC1' and d.dtype == np.float32
    assert np.isnan(d[0, 0])
    assert np.allclose(d[0, 1], A / (4041 - B)) and np.allclose(d[1, 0], A / (11091 - B))
    assert np.allclose(d[1, 1], A / (1 - B))  # the farthest code: just under depth_max
    assert cd.quantisation() == (np.float32(A), np.float32(B))


def test_encode_writes_the_plugin_layout():
    depth = np.array([[2.0, np.nan], [0.0, 12.0], [0.1, 9.0]], np.float32)
    fmt, data = cd.encode(depth, '32FC1')
    assert fmt == '32FC1; compressedDepth png'
    kind, a, b = struct.unpack('<iff', data[:12])
    assert (kind, a, b) == (0, np.float32(10100.0), np.float32(1.0 - 1010.0))
    q = cv2.imdecode(np.frombuffer(data[12:], np.uint8), cv2.IMREAD_UNCHANGED)
    assert q.dtype == np.uint16 and q.shape == (3, 2)
    # q = uint16(A / d + B), truncated; NaN, 0, beyond depth_max and nearer than A / (65535 - B): 0
    assert q.tolist() == [[int(np.float32(10100) / np.float32(2.0) + np.float32(-1009.0)), 0], [0, 0],
                          [0, int(np.float32(10100) / np.float32(9.0) + np.float32(-1009.0))]]
    fmt16, data16 = cd.encode(np.array([[1500, 10001], [10000, 0]], np.uint16), '16UC1')
    assert fmt16 == '16UC1; compressedDepth png' and data16[:12] == bytes(12)
    assert cv2.imdecode(np.frombuffer(data16[12:], np.uint8), cv2.IMREAD_UNCHANGED).tolist() == \
        [[1500, 0], [10000, 0]]  # beyond depth_max (10 m = 10000 mm): 0


def test_32fc1_round_trip_within_one_step():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.3, 9.5, (48, 64)).astype(np.float32)
    _, data = cd.encode(depth, '32FC1')
    _, back = cd.decode('32FC1; compressedDepth png', data)
    step = depth.astype(np.float64) ** 2 / 10100.0  # d(d)/dq = d^2 / A
    err = back.astype(np.float64) - depth
    assert np.all(err >= -1e-6) and np.all(err <= step * 1.01 + 1e-6)  # truncation: never nearer
    assert np.abs(err).max() > 0  # it is lossy


@pytest.mark.parametrize('fmt, data, problem', [
    ('32FC1; compressedDepth png', b'\0' * 12, 'payload of 12 bytes is too short'),
    ('32FC1; compressedDepth png', struct.pack('<iff', 0, 10100.0, -1009.0) + b'garbage' * 20, 'cannot be decoded'),
    ('32FC1; compressedDepth png', struct.pack('<iff', 7, 1.0, 1.0) + b'x' * 20, 'compression format 7'),
    ('32FC1; compressedDepth rvl', b'\0' * 40, "codec 'rvl' is not supported"),
    ('rgb8; jpeg compressed bgr8', b'\0' * 40, 'not a compressedDepth format'),
    ('8UC1; compressedDepth png', b'\0' * 40, "encoding '8UC1' is not supported"),
])
def test_bad_payloads_name_the_problem(fmt, data, problem):
    with pytest.raises(InputError, match=problem):
        cd.decode(fmt, data)


def test_truncated_png_and_wrong_png_type():
    _, data = cd.encode(np.full((40, 50), 2.0, np.float32), '32FC1')
    with pytest.raises(InputError, match='corrupt or truncated'):
        cd.decode('32FC1; compressedDepth png', data[:len(data) // 2])
    ok, rgb_png = cv2.imencode('.png', np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match='not 16-bit single-channel'):
        cd.decode('16UC1; compressedDepth png', bytes(12) + rgb_png.tobytes())
