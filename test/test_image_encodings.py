"""One encoding table for the ROS conversions and the bag reader; 8UC3 settled as cv_bridge does:
it has no channel order, so neither reader turns it into RGB (cv_bridge refuses 8UC3 -> rgb8/bgr8 and
hands it out only as passthrough)."""
import types

import numpy as np
import pytest

from dynrecon_ros import image_encodings as encodings
from dynrecon_ros.data import bags
from dynrecon_ros.errors import InputError


def bag_msg(arr, encoding):
    """What rosbags deserialises: an object with sensor_msgs/Image's fields."""
    arr = np.ascontiguousarray(arr)
    return types.SimpleNamespace(height=arr.shape[0], width=arr.shape[1], encoding=encoding, is_bigendian=0,
                                 step=arr.strides[0], data=arr.reshape(-1).view(np.uint8))


def test_8uc3_is_passthrough_only():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(bags.image_to_array(bag_msg(arr, '8UC3')), arr)  # the bytes, as passthrough
    with pytest.raises(InputError, match="'8UC3' has no channel order.*rgb8 or bgr8"):
        encodings.to_rgb(arr, '8UC3')


def test_bag_reader_refuses_8uc3_colour(tmp_path, monkeypatch):
    """A bag whose colour topic is 8UC3 stops with an error naming the encoding and the topic."""
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    seq = render_sequence(SyntheticConfig(width=32, height=24, frames=3, movers=0, seed=1))
    path = tmp_path / 'c.bag'
    orig = bags._image_msg  # write the colour image with encoding 8UC3 (the same bytes as rgb8)
    monkeypatch.setattr(bags, '_image_msg',
                        lambda ts, hdr, arr, enc: orig(ts, hdr, arr, '8UC3' if enc == 'rgb8' else enc))
    bags.write_bag(seq, path)
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"'8UC3' has no channel order.*\(/camera/rgb/image_color\)"):
        list(bags.read_bag(path))


@pytest.mark.parametrize('encoding, order', [('rgb8', [10, 20, 30]), ('bgr8', [30, 20, 10]),
                                             ('rgba8', [10, 20, 30, 40]), ('bgra8', [30, 20, 10, 40])])
def test_colour_orders(encoding, order):
    px = np.array(order, np.uint8)[None, None]
    assert encodings.to_rgb(px, encoding).tolist() == [[[10, 20, 30]]]


def test_depth_units_and_invalid_readings():
    assert np.allclose(encodings.to_depth(np.array([[1500, 0]], np.uint16), '16UC1'), [[1.5, 0.0]])
    d = encodings.to_depth(np.array([[2.5, np.nan, -1.0, np.inf]], np.float32), '32FC1')
    assert d.tolist() == [[2.5, 0.0, 0.0, 0.0]]
    with pytest.raises(InputError, match="unsupported depth encoding 'rgb8'"):
        encodings.to_depth(np.zeros((1, 1, 3), np.uint8), 'rgb8')


def test_ros_conversions_use_the_same_table():
    pytest.importorskip('rclpy')
    from dynrecon_ros.ros import conversions as conv
    assert conv.ENCODINGS is encodings.ENCODINGS
    msg = conv.numpy_to_image(np.zeros((2, 3, 3), np.uint8), '8UC3')
    assert conv.image_to_numpy(msg).shape == (2, 3, 3)
    with pytest.raises(conv.ConversionError, match="'8UC3' has no channel order"):
        conv.image_to_rgb(msg)
