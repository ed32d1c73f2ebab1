"""`dynrecon replay`: a synthetic TUM-style bag (ROS 1 and ROS 2) published from a subprocess arrives
bit-exact, on TUM's topics, with the bag's timing, plus /clock."""
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip('rclpy')
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from dynrecon_ros.data.bags import write_bag  # noqa: E402
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence  # noqa: E402
from dynrecon_ros.ros import conversions as conv  # noqa: E402
from dynrecon_ros.ros.replay import MessageConverter, open_bag  # noqa: E402
from dynrecon_ros.ros.testing import ROOT, RosHarness, domain_id_for, node_env  # noqa: E402

DOMAIN = domain_id_for(__name__)
# The test's subscribers keep every sample until their callback takes it: a KEEP_LAST 10 reader overwrote
# frames of a 12-frame replay at --rate 4 while its callbacks (PNG decodes) lagged on a loaded box
# (a fresh-clone CI run: not every compressed frame arrived). The replay's own writer keeps 100.
EVERY_SAMPLE = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture(scope='module')
def seq():
    return render_sequence(SyntheticConfig(width=64, height=48, frames=12, movers=1, seed=3))


@pytest.fixture(scope='module')
def ros():
    h = RosHarness(DOMAIN)
    yield h
    h.close()


@pytest.mark.parametrize('ros_version', [1, 2])
def test_converter_matches_bag_content(seq, tmp_path, ros_version):
    bag = write_bag(seq, tmp_path / ('s.bag' if ros_version == 1 else 's'), ros_version=ros_version)
    reader = open_bag(bag)
    conv_ = MessageConverter()
    rgb_count = 0
    for c, _, raw in reader.messages():
        msg = conv_.convert(reader.deserialize(raw, c.msgtype))
        if c.topic == '/camera/rgb/image_color':
            assert isinstance(msg, Image) and msg.header.frame_id == 'openni_rgb_optical_frame'
            i = rgb_count
            assert np.array_equal(conv.image_to_rgb(msg), seq.frames[i].rgb)
            assert conv.stamp_to_sec(msg.header.stamp) == pytest.approx(seq.stamps[i], abs=1e-6)
            rgb_count += 1
        elif c.topic == '/camera/rgb/camera_info':
            assert isinstance(msg, CameraInfo)
            K, D, size = conv.camera_info_to_numpy(msg)  # ROS 1 'K' -> ROS 2 'k'
            assert np.allclose(K, seq.K) and size == (64, 48)
    reader.close()
    assert rgb_count == len(seq.frames)


def test_replay_subcommand_publishes_with_timing_and_clock(seq, ros, tmp_path):
    bag = write_bag(seq, tmp_path / 'tum.bag', ros_version=1)
    images = ros.collect(Image, '/camera/rgb/image_color', EVERY_SAMPLE,
                         keep=lambda m: (time.monotonic(), conv.image_to_rgb(m), conv.stamp_to_sec(m.header.stamp)))
    depths = ros.collect(Image, '/camera/depth/image', EVERY_SAMPLE, keep=conv.image_to_depth)
    clocks = ros.collect(Clock, '/clock', 10, keep=lambda m: conv.stamp_to_sec(m.clock))
    proc = subprocess.run([sys.executable, '-m', 'dynrecon_ros.cli', 'replay', str(bag), '--rate', '0.5', '--clock',
                           '--wait-subscribers', '20'], env=node_env(DOMAIN), cwd=str(ROOT), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ros.wait_for(lambda: len(images) == len(seq.frames) and len(depths) == len(seq.frames), 10)
    for i, (_, rgb, stamp) in enumerate(images):
        assert np.array_equal(rgb, seq.frames[i].rgb)
        assert stamp == pytest.approx(seq.stamps[i], abs=1e-6)
    assert np.allclose(depths[3], np.nan_to_num(seq.frames[3].depth), atol=1e-6)
    # original timing at rate 0.5: 11 frame intervals of 1/30 s take ~0.73 s (unpaced: ~10 ms); a loaded box
    # delivers the subscriber's callbacks in bursts (0.41 s seen beside two busy processes on 2 cores)
    span = images[-1][0] - images[0][0]
    assert 0.3 < span < 2.0, span
    assert clocks and clocks[-1] >= seq.stamps[-1] - 0.02 and clocks == sorted(clocks)


def test_replay_rejects_missing_bag(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'dynrecon_ros.cli', 'replay', str(tmp_path / 'nope.bag')],
                          env=node_env(DOMAIN), cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and 'nope.bag' in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('fmt', ['png', 'jpeg'])
def test_replay_compress_publishes_image_transport_formats(seq, ros, tmp_path, fmt):
    """--compress: colour on <topic>/compressed (png: bit-exact; jpeg: close), depth on <topic>/compressedDepth
    within one quantisation step; raw topics not published; bytes per frame printed."""
    from sensor_msgs.msg import CompressedImage
    bag = write_bag(seq, tmp_path / f'c_{fmt}.bag', ros_version=1)
    colour = ros.collect(CompressedImage, '/camera/rgb/image_color/compressed', EVERY_SAMPLE,
                         keep=lambda m: (m.format, conv.compressed_to_rgb(m)))
    depth = ros.collect(CompressedImage, '/camera/depth/image/compressedDepth', EVERY_SAMPLE,
                        keep=lambda m: (m.format, conv.compressed_depth_to_depth(m)))
    raw = ros.collect(Image, '/camera/rgb/image_color', EVERY_SAMPLE)
    n_raw = len(raw)
    proc = subprocess.run([sys.executable, '-m', 'dynrecon_ros.cli', 'replay', str(bag), '--rate', '4',
                           '--wait-subscribers', '20', '--compress', fmt], env=node_env(DOMAIN), cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ros.wait_for(lambda: len(colour) == len(seq.frames) and len(depth) == len(seq.frames), 10)
    assert len(raw) == n_raw
    assert {f for f, _ in colour} == {f'rgb8; {fmt} compressed bgr8'}
    assert {f for f, _ in depth} == {'32FC1; compressedDepth png'}
    for (_, rgb), (_, d), frame in zip(colour, depth, seq.frames):
        err = np.abs(rgb.astype(int) - frame.rgb.astype(int))
        assert err.max() == 0 if fmt == 'png' else 0 < err.mean() < 8  # quality 95 on a 64x48 textured image: ~4.7
        want = np.nan_to_num(frame.depth)
        assert np.all(np.abs(d - want) <= want ** 2 / 10100 + 1e-5)
    assert f'B/frame compressed {fmt}' in proc.stdout and 'B/frame compressedDepth png' in proc.stdout, proc.stdout
