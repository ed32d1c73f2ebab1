"""Navigation-stack mode (REP-105): recon_node publishes odom -> base_link on /tf and ~/odom for a known
base_link -> camera extrinsic, consistent with ~/pose and with the ground-truth motion of the base."""
import math

import numpy as np
import pytest

pytest.importorskip('rclpy')
from geometry_msgs.msg import PoseStamped  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence  # noqa: E402
from dynrecon_ros.ros import conversions as conv  # noqa: E402
from dynrecon_ros.ros.qos import OUTPUT_QOS, RELIABLE_INPUT_QOS, TF_QOS  # noqa: E402
from dynrecon_ros.ros.testing import NodeProcess, RosHarness, domain_id_for, node_command  # noqa: E402

DOMAIN = domain_id_for(__name__)
EXTRINSIC = [0.2, -0.05, 0.5, -math.pi / 2, 0.0, -math.pi / 2]  # base_link -> camera optical frame
POSE_VAR = [0.02, 0.02, 0.03, 0.001, 0.002, 0.003]
N = 16


def test_navigation_mode_publishes_consistent_odom_chain():
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=N, movers=1, seed=2))
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(node_command([
        '-p', 'publish_tf_mode:=navigation', '-p', f'base_to_camera:={EXTRINSIC}', '-p', 'odom_frame:=odom',
        '-p', 'base_frame:=base_link', '-p', 'camera_frame:=camera_optical', '-p', 'qos_reliable:=true',
        '-p', 'queue_size:=100', '-p', 'idle_flush:=1.0', '-p', f'odom_pose_variance:={POSE_VAR}']), DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        tfs = ros.collect(TFMessage, '/tf', TF_QOS)
        odoms = ros.collect(Odometry, '/dynrecon/odom', OUTPUT_QOS)
        poses = ros.collect(PoseStamped, '/dynrecon/pose', OUTPUT_QOS)
        pubs = [ros.publisher(t, n, RELIABLE_INPUT_QOS) for t, n in
                ((Image, '/image'), (Image, '/depth'), (CameraInfo, '/camera_info'))]
        assert ros.wait_for(lambda: all(p.get_subscription_count() for p in pubs)
                            and ros.node.count_publishers('/dynrecon/odom'), 30)
        import time
        time.sleep(1.0)  # let the node's side of discovery finish too (reliable from here on)
        for f in seq.frames:
            h = Header(stamp=conv.sec_to_stamp(f.stamp), frame_id='ignored_frame')
            pubs[2].publish(conv.numpy_to_camera_info(f.K, (160, 120), h))
            pubs[0].publish(conv.numpy_to_image(f.rgb, 'rgb8', h))
            pubs[1].publish(conv.numpy_to_image(f.depth, '32FC1', h))
            time.sleep(0.03)
        assert proc.wait_output('input idle: flushed', 180), proc.output()[-3000:]
        assert ros.wait_for(lambda: len(poses) == len(odoms) == sum(len(m.transforms) for m in tfs) > N // 2, 10)
    finally:
        proc.stop()
        ros.close()

    T_b_c = conv.xyz_rpy_to_matrix(EXTRINSIC)
    tf_list = [t for m in tfs for t in m.transforms]
    assert all((t.header.frame_id, t.child_frame_id) == ('odom', 'base_link') for t in tf_list)
    by_stamp = {conv.stamp_to_sec(t.header.stamp): conv.transform_to_matrix(t.transform) for t in tf_list}
    stamps = sorted(by_stamp)
    # odom starts where base_link was at the first frame
    assert np.allclose(by_stamp[stamps[0]], np.eye(4), atol=1e-6)
    # ~/pose is the camera in odom = odom->base_link . base_link->camera
    for p in poses:
        t = conv.stamp_to_sec(p.header.stamp)
        assert p.header.frame_id == 'odom'
        assert np.allclose(conv.transform_to_matrix(p.pose), by_stamp[t] @ T_b_c, atol=1e-5)
    # ~/odom: same pose as /tf, child base_link, the configured covariance
    for o in odoms:
        assert (o.header.frame_id, o.child_frame_id) == ('odom', 'base_link')
        assert np.allclose(conv.transform_to_matrix(o.pose.pose), by_stamp[conv.stamp_to_sec(o.header.stamp)],
                           atol=1e-6)
        assert np.allclose(np.diag(np.asarray(o.pose.covariance).reshape(6, 6)), POSE_VAR)
    # against ground truth: the base moved as the camera did, seen through the extrinsic
    gt = {round(s, 6): P for s, P in zip(seq.stamps, seq.poses)}
    i0 = round(stamps[0], 6)
    errs, rot_errs = [], []
    for s in stamps:
        want = T_b_c @ np.linalg.inv(gt[i0]) @ gt[round(s, 6)] @ np.linalg.inv(T_b_c)
        got = by_stamp[s]
        errs.append(np.linalg.norm(got[:3, 3] - want[:3, 3]))
        rot_errs.append(np.degrees(np.arccos(np.clip((np.trace(got[:3, :3].T @ want[:3, :3]) - 1) / 2, -1, 1))))
    moved = np.linalg.norm(T_b_c[:3, :3] @ (np.linalg.inv(gt[i0]) @ gt[round(stamps[-1], 6)])[:3, 3])
    print(f'\nnavigation mode: {len(stamps)} poses, base moved {moved:.3f} m, max error {max(errs):.4f} m '
          f'{max(rot_errs):.2f} deg')
    assert max(errs) < 0.05 and max(rot_errs) < 3.0
