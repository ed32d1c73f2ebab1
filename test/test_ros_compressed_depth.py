"""recon_node with use_compressed_depth:=true (and use_compressed:=true) in its own process: colour on
image/compressed and depth on depth/compressedDepth in image_transport's formats are processed (the
node's ~/depth is the sent depth within one quantisation step); corrupt or truncated compressedDepth
payloads each get a warning naming the topic and the fault, the frame is dropped and the node runs on.
End to end (slow): a rendered default sequence replayed raw and with `dynrecon replay --compress` into
the node gives ATEs within 1 mm of each other."""
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('rclpy')
from sensor_msgs.msg import CameraInfo, CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from dynrecon_ros.ros import conversions as conv  # noqa: E402
from dynrecon_ros.ros.qos import OUTPUT_QOS, RELIABLE_INPUT_QOS, TF_QOS  # noqa: E402
from dynrecon_ros.ros.testing import ROOT, NodeProcess, RosHarness, domain_id_for, node_command, node_env  # noqa: E402

W, H = 64, 48
DOMAIN = domain_id_for(__name__)
K = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])


def scene(i):
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([(xx * 4 + i) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    depth = (1.5 + 0.01 * xx + 0.02 * yy).astype(np.float32)
    return rgb, depth


def header(t):
    return Header(stamp=conv.sec_to_stamp(t), frame_id='cam_optical')


def test_compressed_depth_input_and_bad_payloads():
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(node_command(['-p', 'qos_reliable:=true', '-p', 'queue_size:=50', '-p', 'warn_throttle:=0.0',
                                     '-p', 'use_compressed:=true', '-p', 'use_compressed_depth:=true']), DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        assert 'depth=/depth/compressedDepth' in proc.output()
        pub_img = ros.publisher(CompressedImage, '/image/compressed', RELIABLE_INPUT_QOS)
        pub_depth = ros.publisher(CompressedImage, '/depth/compressedDepth', RELIABLE_INPUT_QOS)
        pub_info = ros.publisher(CameraInfo, '/camera_info', RELIABLE_INPUT_QOS)
        masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS)
        depths = ros.collect(Image, '/dynrecon/depth', OUTPUT_QOS,
                             keep=lambda m: (conv.stamp_to_sec(m.header.stamp), conv.image_to_depth(m)))
        assert ros.wait_for(lambda: pub_img.get_subscription_count() and pub_depth.get_subscription_count()
                            and pub_info.get_subscription_count(), 20)
        assert ros.wait_for(lambda: ros.node.count_publishers('/dynrecon/dynamic_mask') > 0, 20)
        t = [1.0]
        sent = {}

        def send(depth_msg=None, tries=1, expect=None):
            for _ in range(tries):  # the first frame may race DDS discovery on the node's side: resend
                t[0] += 0.1
                rgb, depth = scene(int(t[0] * 10))
                sent[round(t[0], 6)] = depth
                pub_info.publish(conv.numpy_to_camera_info(K, (W, H), header(t[0])))
                img = conv.rgb_to_compressed(rgb, 'png', header(t[0]))
                pub_img.publish(img)
                msg = depth_msg or conv.depth_to_compressed_depth(depth, '32FC1', header(t[0]))
                msg.header = header(t[0])
                pub_depth.publish(msg)
                if expect is None or ros.wait_for(lambda: len(masks) >= expect, 30 / tries):
                    return
            raise AssertionError(proc.output()[-3000:])

        send(tries=10, expect=1)
        good = conv.depth_to_compressed_depth(scene(0)[1], '32FC1')
        cases = []

        def bad(mutate, problem):
            msg = conv.depth_to_compressed_depth(scene(0)[1], '32FC1')
            mutate(msg)
            cases.append(problem)
            send(msg)

        bad(lambda m: setattr(m, 'data', m.data[:len(good.data) // 2]), 'corrupt or truncated')
        bad(lambda m: setattr(m, 'data', bytes(m.data[:12]) + bytes(range(256)) * 4), 'corrupt or truncated')
        bad(lambda m: setattr(m, 'data', m.data[:8]), 'payload of 8 bytes is too short')
        bad(lambda m: setattr(m, 'data', struct.pack('<iff', 3, 1.0, 1.0) + bytes(m.data[12:])), 'compression format 3')
        bad(lambda m: setattr(m, 'format', '32FC1; compressedDepth rvl'), "codec 'rvl' is not supported")
        n_before = len(masks)
        send(expect=n_before + 1)
        log = proc.output()
        for problem in cases:
            lines = [ln for ln in log.splitlines() if 'WARN' in ln and problem in ln]
            assert lines, f'no warning for {problem!r}:\n{log[-3000:]}'
            assert '/depth/compressedDepth:' in lines[0] and 'message dropped' in lines[0], lines[0]
        assert proc.proc.poll() is None, 'node died'
        assert len(masks) == n_before + 1, 'a frame with a bad depth payload produced output'
        # the node's depth output is the sent depth, decoded: within one quantisation step d^2 / A
        assert ros.wait_for(lambda: len(depths) >= 2, 10)
        for stamp, depth in depths:
            want = sent[round(stamp, 6)]
            assert np.all(np.abs(depth - want) <= want ** 2 / 10100 + 1e-5)
    finally:
        proc.stop()
        ros.close()
    assert 'Traceback' not in proc.output()


def _replay_ate(bag, seq, compress: bool, domain: int):
    """Node on TUM's topics (compressed or raw inputs), the bag replayed into it; (ATE, poses, replay stdout)."""
    from dynrecon_ros.evaluation import trajectory_metrics
    topics = {'image': '/camera/rgb/image_color', 'depth': '/camera/depth/image',
              'camera_info': '/camera/rgb/camera_info'}
    if compress:
        topics = {'image/compressed': '/camera/rgb/image_color/compressed',
                  'depth/compressedDepth': '/camera/depth/image/compressedDepth',
                  'camera_info': '/camera/rgb/camera_info'}
    args = ['--params-file', str(ROOT / 'config' / 'tum.yaml'), '-p', 'use_sim_time:=true',
            '-p', 'publish_map_rate:=0.0', '-p', 'idle_flush:=3.0', '-p', 'queue_size:=1000',
            '-p', f'use_compressed:={str(compress).lower()}', '-p', f'use_compressed_depth:={str(compress).lower()}']
    for src, dst in topics.items():
        args += ['-r', f'{src}:={dst}']
    ros = RosHarness(domain)
    proc = NodeProcess(node_command(args), domain)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        tfs = ros.collect(TFMessage, '/tf', TF_QOS)
        assert ros.wait_for(lambda: ros.node.count_publishers('/dynrecon/dynamic_mask'), 30)
        cmd = [sys.executable, '-m', 'dynrecon_ros.cli', 'replay', str(bag), '--clock', '--wait-subscribers', '30',
               '--delay', '1.0'] + (['--compress'] if compress else [])
        replay = subprocess.run(cmd, env=node_env(domain), cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        assert replay.returncode == 0, replay.stderr
        assert proc.wait_output('input idle: flushed', 300), proc.output()[-3000:]
        assert ros.wait_for(lambda: len([t for m in tfs for t in m.transforms]) >= len(seq.frames) - 2, 20)
    finally:
        proc.stop()
        ros.close()
    log = proc.output()
    assert 'dropped 0' in log and 'Traceback' not in log, log[-2000:]
    tf_list = [t for msg in tfs for t in msg.transforms]
    stamps = np.array([conv.stamp_to_sec(t.header.stamp) for t in tf_list])
    poses = np.stack([conv.transform_to_matrix(t.transform) for t in tf_list])
    return trajectory_metrics(stamps, poses, seq.stamps, seq.poses)['ate_rmse_se3'], len(tf_list), replay.stdout


@pytest.mark.slow
def test_compressed_replay_ate_equals_raw(tmp_path):
    """The default rendered sequence (dynrecon render's defaults: 320x240, 90 frames, 2 movers) as a TUM bag."""
    from dynrecon_ros.data.bags import write_bag
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    seq = render_sequence(SyntheticConfig())
    bag = write_bag(seq, tmp_path / 'default.bag', ros_version=1)
    ate_raw, n_raw, _ = _replay_ate(bag, seq, False, DOMAIN)
    ate_cmp, n_cmp, out = _replay_ate(bag, seq, True, DOMAIN)
    print(f'\nATE raw {ate_raw * 1e3:.3f} mm ({n_raw} poses), compressed {ate_cmp * 1e3:.3f} mm ({n_cmp} poses)\n{out}')
    assert n_raw == n_cmp == len(seq.frames)
    assert abs(ate_cmp - ate_raw) < 1e-3
    # the replay printed the bandwidth: colour (PNG, lossless) and depth both smaller than raw
    assert 'B/frame compressed png' in out and 'compressedDepth png' in out and 'images per frame' in out
