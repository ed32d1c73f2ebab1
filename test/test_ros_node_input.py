"""recon_node in its own process: each bad input message is rejected with a warning naming the topic
and the problem, and the next good frame is still processed. Also: mask/depth/camera_info/pose headers,
~/save_map, clean SIGTERM shutdown with save_map_path, and the node-level parameters."""
import math
import pathlib
import signal

import numpy as np
import pytest

pytest.importorskip('rclpy')
from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Odometry, Path  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from dynrecon_ros.ros import conversions as conv  # noqa: E402
from dynrecon_ros.ros.qos import MAP_QOS, OUTPUT_QOS, RELIABLE_INPUT_QOS, TF_QOS  # noqa: E402
from dynrecon_ros.ros.testing import NodeProcess, RosHarness, domain_id_for, node_command  # noqa: E402

W, H = 64, 48
DOMAIN = domain_id_for(__name__)
K = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])


@pytest.fixture(scope='module')
def ros():
    h = RosHarness(DOMAIN)
    yield h
    h.close()


def scene(i):
    """A small textured scene (64x48) and its depth, shifted a little per frame."""
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([(xx * 4 + i) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    depth = (1.5 + 0.01 * xx + 0.0 * yy).astype(np.float32)
    return rgb, depth


def header(t, frame='cam_optical'):
    return Header(stamp=conv.sec_to_stamp(t), frame_id=frame)


@pytest.fixture(scope='module')
def node(ros, tmp_path_factory):
    out = tmp_path_factory.mktemp('node')
    proc = NodeProcess(node_command(['-p', 'qos_reliable:=true', '-p', 'queue_size:=50', '-p', 'warn_throttle:=0.0',
                                     '-p', f'save_map_path:={out / "final_map.ply"}', '-p', 'publish_map_rate:=50.0',
                                     # this module sends only two good frames: publish voxels seen once
                                     '-p', 'pipeline.map.min_weight:=1.0']),
                       DOMAIN)
    assert proc.wait_output('ready:', 60), proc.output()
    yield proc, out
    proc.stop()


def test_bad_messages_then_good_frame(ros, node):
    proc, _ = node
    pub_img = ros.publisher(Image, '/image', RELIABLE_INPUT_QOS)
    pub_depth = ros.publisher(Image, '/depth', RELIABLE_INPUT_QOS)
    pub_info = ros.publisher(CameraInfo, '/camera_info', RELIABLE_INPUT_QOS)
    masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS)
    depths = ros.collect(Image, '/dynrecon/depth', OUTPUT_QOS)
    infos = ros.collect(CameraInfo, '/dynrecon/camera_info', OUTPUT_QOS)
    poses = ros.collect(PoseStamped, '/dynrecon/pose', OUTPUT_QOS)
    paths = ros.collect(Path, '/dynrecon/path', OUTPUT_QOS)
    odoms = ros.collect(Odometry, '/dynrecon/odom', OUTPUT_QOS)
    tfs = ros.collect(TFMessage, '/tf', TF_QOS)
    assert ros.wait_for(lambda: pub_img.get_subscription_count() and pub_depth.get_subscription_count()
                        and pub_info.get_subscription_count(), 20)
    assert ros.wait_for(lambda: ros.node.count_publishers('/dynrecon/dynamic_mask') > 0, 20)

    t = [1.0]

    def good(expect_total, tries=1):
        for _ in range(tries):  # the first frame may race DDS discovery on the node's side: resend
            t[0] += 0.1
            rgb, depth = scene(int(t[0] * 10))
            pub_info.publish(conv.numpy_to_camera_info(K, (W, H), header(t[0])))
            pub_img.publish(conv.numpy_to_image(rgb, 'rgb8', header(t[0])))
            pub_depth.publish(conv.numpy_to_image(depth, '32FC1', header(t[0])))
            if ros.wait_for(lambda: len(masks) >= expect_total, 30 / tries):
                return t[0]
        raise AssertionError(proc.output()[-3000:])

    good(1, tries=10)
    rgb, depth = scene(0)
    cases = []

    def bad_image(mutate, topic, problem):
        cases.append((topic, problem))
        t[0] += 0.1
        msg = conv.numpy_to_image(rgb, 'rgb8', header(t[0]))
        mutate(msg)
        pub_img.publish(msg)
        pub_depth.publish(conv.numpy_to_image(depth, '32FC1', header(t[0])))

    bad_image(lambda m: setattr(m, 'encoding', 'yuv422_weird'), '/image', "unknown encoding 'yuv422_weird'")
    bad_image(lambda m: setattr(m, 'step', 10), '/image', 'step 10 too small')
    bad_image(lambda m: setattr(m, 'data', bytes(100)), '/image', 'data length 100 does not match')
    bad_image(lambda m: (setattr(m, 'width', 0), setattr(m, 'height', 0), setattr(m, 'data', b'')),
              '/image', 'zero-size image')
    # depth of a different size
    t[0] += 0.1
    cases.append(('/depth', 'depth of size 32x24 differs from the image size 64x48'))
    pub_img.publish(conv.numpy_to_image(rgb, 'rgb8', header(t[0])))
    pub_depth.publish(conv.numpy_to_image(depth[::2, ::2].copy(), '32FC1', header(t[0])))
    # camera_info with K all zero (the previous good K stays in use)
    cases.append(('/camera_info', 'K is all zero'))
    pub_info.publish(CameraInfo(header=header(t[0]), width=W, height=H))
    # stamps going backwards (by less than time_jump_reset)
    cases.append(('/image', 'stamp going backwards'))
    pub_img.publish(conv.numpy_to_image(rgb, 'rgb8', header(t[0] - 0.3)))

    n_before = len(masks)
    t_good = good(n_before + 1)
    log = proc.output()
    for topic, problem in cases:
        lines = [ln for ln in log.splitlines() if 'WARN' in ln and problem in ln]
        assert lines, f'no warning for {problem!r}:\n{log[-3000:]}'
        assert f'{topic}:' in lines[0], lines[0]
    assert proc.proc.poll() is None, 'node died'
    assert len(masks) == n_before + 1, 'a bad message produced output'

    # outputs of the good frame: same header and size as the input image
    m = masks[-1]
    assert conv.stamp_to_sec(m.header.stamp) == pytest.approx(t_good, abs=1e-9)
    assert (m.header.frame_id, m.encoding, m.width, m.height) == ('cam_optical', 'mono8', W, H)
    def last_is_good(msgs, stamp_of=lambda m: m.header.stamp):
        return bool(msgs) and abs(conv.stamp_to_sec(stamp_of(msgs[-1])) - t_good) < 1e-9
    assert ros.wait_for(lambda: all(last_is_good(x) for x in (depths, infos, poses, paths, odoms))
                        and last_is_good(tfs, lambda m: m.transforms[0].header.stamp), 10)
    d = depths[-1]
    assert (d.encoding, d.width, d.height, d.header.frame_id) == ('32FC1', W, H, 'cam_optical')
    assert conv.stamp_to_sec(d.header.stamp) == pytest.approx(t_good, abs=1e-9)
    assert infos[-1].width == W and np.any(infos[-1].k)
    tf = tfs[-1].transforms[0]
    assert (tf.header.frame_id, tf.child_frame_id) == ('map', 'cam_optical')
    assert conv.stamp_to_sec(tf.header.stamp) == pytest.approx(t_good, abs=1e-9)
    q = tf.transform.rotation
    assert math.isclose(q.x ** 2 + q.y ** 2 + q.z ** 2 + q.w ** 2, 1.0, abs_tol=1e-9)
    assert poses[-1].header.frame_id == 'map' and len(paths[-1].poses) == len(masks)


def test_static_map_is_latched_and_save_map_service(ros, node, tmp_path):
    proc, out = node
    late = ros.collect(PointCloud2, '/dynrecon/static_map', MAP_QOS)  # subscribes after it was published
    # the frames of the test above reach the map once the pipeline flushes them (idle_flush, 2 s)
    assert ros.wait_for(lambda: late and late[-1].width > 0, 40), proc.output()[-4000:]
    cloud = late[-1]
    assert cloud.header.frame_id == 'map' and [f.name for f in cloud.fields] == ['x', 'y', 'z', 'rgb']
    assert cloud.width > 0
    client = ros.client(Trigger, '/dynrecon/save_map')
    res = ros.call(client, Trigger.Request())
    assert res.success, res.message
    assert pathlib.Path(res.message.split(' to ')[-1]).is_file()


def test_sigterm_is_clean_and_saves_the_map(ros, node):
    proc, out = node
    rc = proc.stop(signal.SIGTERM)
    assert rc == 0, proc.output()[-3000:]
    assert (out / 'final_map.ply').is_file()
    assert 'Traceback' not in proc.output()
    assert 'frames received' in proc.output()


def test_frame_before_the_first_camera_info_waits_for_it():
    """camera_info and images travel on separate topics: the first frame can arrive before the first camera_info.
    The latest such frame waits for it and is processed; an older one is dropped with a warning naming
    /camera_info (before, every frame before the first camera_info was dropped)."""
    domain = domain_id_for(__name__ + '.camera_info')  # (the module's node, on DOMAIN, has had its camera_info)
    ros = RosHarness(domain)
    proc = NodeProcess(node_command(['-p', 'qos_reliable:=true', '-p', 'queue_size:=50', '-p', 'warn_throttle:=0.0',
                                     '-p', 'idle_flush:=1.0']), domain)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        pub_img = ros.publisher(Image, '/image', RELIABLE_INPUT_QOS)
        pub_depth = ros.publisher(Image, '/depth', RELIABLE_INPUT_QOS)
        pub_info = ros.publisher(CameraInfo, '/camera_info', RELIABLE_INPUT_QOS)
        masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS)
        assert ros.wait_for(lambda: pub_img.get_subscription_count() and pub_depth.get_subscription_count()
                            and pub_info.get_subscription_count()
                            and ros.node.count_publishers('/dynrecon/dynamic_mask') > 0, 20)
        ros.wait_for(lambda: False, 1.0)  # (reliable handshake: see StreamProbe.wait_matched)

        def frame(t, info: bool):
            rgb, depth = scene(int(t * 10))
            if info:
                pub_info.publish(conv.numpy_to_camera_info(K, (W, H), header(t)))
            pub_img.publish(conv.numpy_to_image(rgb, 'rgb8', header(t)))
            pub_depth.publish(conv.numpy_to_image(depth, '32FC1', header(t)))

        frame(20.0, info=False)  # dropped: a newer frame arrives before any camera_info
        ros.wait_for(lambda: False, 0.5)
        frame(20.1, info=False)  # waits for the camera_info
        assert proc.wait_output('no camera_info received yet', 20), proc.output()
        for t in (20.2, 20.3, 20.4):
            frame(t, info=True)
        stamps = lambda: {round(conv.stamp_to_sec(m.header.stamp), 3) for m in masks}  # noqa: E731
        assert ros.wait_for(lambda: {20.1, 20.2, 20.3, 20.4} <= stamps(), 60), (stamps(), proc.output()[-3000:])
        assert 20.0 not in stamps()
        warns = [ln for ln in proc.output().splitlines() if 'no camera_info received yet' in ln]
        assert len(warns) == 1 and '/camera_info:' in warns[0], warns
    finally:
        proc.stop()
        ros.close()
