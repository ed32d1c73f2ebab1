"""The dust3r backend: pointmap geometry of the predictor (exact pointmaps from a stand-in network),
`dynrecon run --backend dust3r` end to end with a tiny random-weight checkpoint, its error paths,
and the ROS node with backend:=dust3r."""
import json
import os
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dynrecon_ros.cli import main
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence, write_tum
from dynrecon_ros.data.tum import read_trajectory
from dynrecon_ros.frames import Frame
from dynrecon_ros.network import preprocess_image
from dynrecon_ros.predictors.dust3r import Dust3rConfig, Dust3rPredictor, estimate_focal, umeyama_sim3

sys.path.insert(0, os.path.dirname(__file__))
from dust3r_tiny import write_tiny_checkpoint  # noqa: E402

W, H = 64, 48
LOOSE = """checks:
  max_translation_m: 1000.0
  max_rotation_deg: 180.0
  max_speed_m_s: 100000.0
  max_angular_speed_deg_s: 100000.0
  min_inlier_ratio: 0.0
"""  # random weights: meaningless geometry, so the jump / tracking-lost rules are opened wide


def unproject(depth, K):
    v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]].astype(np.float64)
    return np.stack([(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth], -1)


def test_focal_estimate_and_sim3():
    K = np.array([[55.0, 0, 31.5], [0, 55.0, 23.5], [0, 0, 1]])
    rng = np.random.default_rng(0)
    pts = unproject(1.0 + rng.random((H, W)), K)
    bad = rng.random((H, W)) < 0.2
    pts[bad] *= rng.uniform(0.5, 2.0, (bad.sum(), 3))  # 20 % outliers
    f = estimate_focal(pts, np.ones((H, W)), (31.5, 23.5))
    assert abs(f - 55.0) < 0.5, f
    Q = rng.standard_normal((200, 3))
    R = Rotation.from_euler('xyz', [10, -20, 5], degrees=True).as_matrix()
    P = 2.5 * Q @ R.T + [0.1, -0.3, 1.0]
    s, R2, t = umeyama_sim3(P, Q, np.ones(200))
    assert abs(s - 2.5) < 1e-9 and np.allclose(R2, R, atol=1e-9) and np.allclose(t, [0.1, -0.3, 1.0])


class ExactNet:
    """Stand-in for PairNetwork: exact pointmaps of a rendered sequence at the network input size
    (frame ids = frame keys), each pair in its own arbitrary scale like DUSt3R."""

    def __init__(self, seq):
        self.cfg = SimpleNamespace(img_size=(128, 128))
        self.cache_frames = 16
        self.by_key = {}
        for f, pose, d in zip(seq.frames, seq.poses, seq.depth_gt):
            r = preprocess_image(f.rgb, 128)
            Kn = seq.K.copy()
            Kn[0] *= r.scale_x
            Kn[1] *= r.scale_y
            Kn[0, 2] += 0.5 * r.scale_x - 0.5 - r.crop_x0  # pixel centres, as the resize maps them
            Kn[1, 2] += 0.5 * r.scale_y - 0.5 - r.crop_y0
            dn = cv2.resize(d, r.rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
            self.by_key[f.key] = (unproject(dn, Kn), pose)
        self.calls = 0

    def predict_pairs(self, images, pairs, frame_ids=None):
        out = {k: [] for k in ('pts3d_1', 'conf_1', 'pts3d_2_in_1', 'conf_2')}
        for i, j in pairs:
            self.calls += 1
            pi, Ti = self.by_key[frame_ids[i]]
            pj, Tj = self.by_key[frame_ids[j]]
            T = np.linalg.inv(Ti) @ Tj
            s = 0.3 + 0.1 * self.calls  # arbitrary per-pair scale
            out['pts3d_1'].append(s * pi)
            out['pts3d_2_in_1'].append(s * (pj @ T[:3, :3].T + T[:3, 3]))
            out['conf_1'].append(np.full(pi.shape[:2], 3.0))
            out['conf_2'].append(np.full(pj.shape[:2], 3.0))
        return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


@pytest.mark.parametrize('metric', [False, True])
def test_predictor_geometry_on_exact_pointmaps(metric):
    """Depth on one scale along the stream, K when missing, poses of j in i: checked against the
    renderer's truth (static scene: no movers)."""
    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=5, seed=3, movers=0, camera_motion=3.0))
    pred = Dust3rPredictor(ExactNet(seq), Dust3rConfig(min_inliers=20))
    frames = [Frame(stamp=f.stamp, rgb=f.rgb, depth=f.depth.copy() if metric else None, K=None, key=f.key,
                    meta={}) for f in seq.frames]
    scale = None
    prev = None
    for k, f in enumerate(frames):
        assert pred.prepare_frame(f, prev) == ''
        assert f.K is not None and abs(f.K[0, 0] - seq.K[0, 0]) < 0.03 * seq.K[0, 0], (f.K, seq.K)
        gt = seq.depth_gt[k]
        inner = (slice(2, -2), slice(2, -2))
        ratio = f.depth[inner] / gt[inner]
        if scale is None:
            scale = np.median(ratio)
            assert (abs(scale - 1) < 1e-3) if metric else (abs(np.median(f.depth) - 1) < 1e-3)
        assert np.median(np.abs(ratio / scale - 1)) < 0.01, (k, np.median(ratio), scale)
        if prev is not None:
            T, inl, n = pred.relative_pose(prev, f, None, None)
            gtT = np.linalg.inv(seq.poses[k - 1]) @ seq.poses[k]
            assert inl.shape == (H, W) and inl.sum() > 0.5 * n
            assert np.degrees(np.arccos(np.clip((np.trace(T[:3, :3].T @ gtT[:3, :3]) - 1) / 2, -1, 1))) < 0.3
            assert np.linalg.norm(T[:3, 3] - scale * gtT[:3, 3]) < 0.05 * scale * np.linalg.norm(gtT[:3, 3]) + 1e-3
            pp = pred.predict(prev, f)
            truth = scale * (unproject(seq.depth_gt[k], seq.K) @ gtT[:3, :3].T + gtT[:3, 3])
            err = np.linalg.norm(pp.pts_j_in_i - truth, axis=-1)[inner] / truth[inner][..., 2]
            assert pp.pts_i.shape == pp.pts_j_in_i.shape == (H, W, 3) and np.median(err) < 0.01
        prev = f


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny.pth')


@pytest.fixture(scope='module')
def seq_dir(tmp_path_factory):
    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=7, seed=1))
    d = tmp_path_factory.mktemp('seq') / 'data'
    write_tum(seq, d)
    mono = tmp_path_factory.mktemp('mono') / 'data'
    write_tum(seq, mono)
    (mono / 'depth.txt').unlink()  # monocular: colour + calibration only
    loose = d.parent / 'loose.yaml'
    loose.write_text(LOOSE)
    return d, mono, loose, seq


@pytest.mark.parametrize('mono', [True, False])
def test_run_dust3r_end_to_end(ckpt, seq_dir, tmp_path, mono):
    d, m, loose, seq = seq_dir
    out = tmp_path / 'out'
    rc = main(['run', '--input', str(m if mono else d), '--output', str(out), '--backend', 'dust3r',
               '--checkpoint', ckpt, '--config', str(loose)])
    assert rc == 0
    s = json.loads((out / 'summary.json').read_text())
    assert s['backend'] == 'dust3r' and s['input_frames'] == 7
    stamps, poses = read_trajectory(out / 'trajectory.tum')
    assert len(stamps) == s['frames'] == 7 - len(s['skipped']) and s['frames'] >= 5, s['skipped']
    assert np.isfinite(poses).all() and np.allclose(poses[0], np.eye(4), atol=1e-6)
    quats = [ln.split()[4:8] for ln in (out / 'trajectory.tum').read_text().splitlines() if not ln.startswith('#')]
    assert np.allclose(np.linalg.norm(np.array(quats, float), axis=1), 1, atol=1e-6)
    by_stamp = {f.stamp: f.key for f in seq.frames}
    for t in stamps:
        key = min(by_stamp.items(), key=lambda kv: abs(kv[0] - t))[1]
        mask = cv2.imread(str(out / 'masks' / f'{key}.png'), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (H, W) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        dep = cv2.imread(str(out / 'depth' / f'{key}.png'), cv2.IMREAD_UNCHANGED)
        assert dep.shape == (H, W) and dep.dtype == np.uint16 and (dep > 0).mean() > 0.9
    assert len(list((out / 'masks').glob('*.png'))) == s['frames']
    if not mono:  # metric scale from the depth images: the network depth is in metres
        key = seq.frames[0].key
        dep = cv2.imread(str(out / 'depth' / f'{key}.png'), cv2.IMREAD_UNCHANGED) / 5000.0
        ok = (dep > 0) & (seq.frames[0].depth > 0)
        assert abs(np.median(dep[ok] / seq.frames[0].depth[ok]) - 1) < 0.2
    assert (out / 'static_map.ply').read_bytes().startswith(b'ply\n')
    img = cv2.imread(str(out / 'preview.png'))
    assert img is not None and img.shape[0] >= H


def test_run_dust3r_checkpoint_errors(seq_dir, tmp_path, capsys):
    d, m, _, _ = seq_dir
    base = ['run', '--input', str(m), '--output', str(tmp_path / 'o'), '--backend', 'dust3r']
    assert main(base) == 2
    err = capsys.readouterr().err
    assert 'checkpoint' in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1
    assert main(base + ['--checkpoint', str(tmp_path / 'nope.pth')]) == 2
    assert 'not found' in capsys.readouterr().err
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint at all')
    assert main(base + ['--checkpoint', str(junk)]) == 2
    err = capsys.readouterr().err
    assert 'checkpoint' in err and len(err.strip().splitlines()) == 1


def test_ros_node_backend_dust3r(ckpt, seq_dir):
    """recon_node with backend:=dust3r, monocular (use_depth:=false): rgb + camera_info in, poses on
    /tf and masks out, one per accepted image, finite with unit quaternions."""
    pytest.importorskip('rclpy')
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header
    from tf2_msgs.msg import TFMessage

    from dynrecon_ros.ros import conversions as conv
    from dynrecon_ros.ros.qos import OUTPUT_QOS, RELIABLE_INPUT_QOS, TF_QOS
    from dynrecon_ros.ros.testing import NodeProcess, RosHarness, domain_id_for, node_command

    _, _, _, seq = seq_dir
    domain = domain_id_for(__name__ + '.node')
    loose = ['-p', 'pipeline.checks.max_translation_m:=1000.0', '-p', 'pipeline.checks.max_rotation_deg:=180.0',
             '-p', 'pipeline.checks.max_speed_m_s:=100000.0', '-p', 'pipeline.checks.max_angular_speed_deg_s:=100000.0',
             '-p', 'pipeline.checks.min_inlier_ratio:=0.0']
    proc = NodeProcess(node_command(['-p', 'backend:=dust3r', '-p', f'checkpoint:={ckpt}', '-p', 'use_depth:=false',
                                     '-p', 'qos_reliable:=true', '-p', 'queue_size:=50', *loose]), domain)
    ros = RosHarness(domain)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        pub_img = ros.publisher(Image, '/image', RELIABLE_INPUT_QOS)
        pub_info = ros.publisher(CameraInfo, '/camera_info', RELIABLE_INPUT_QOS)
        masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS)
        tfs = ros.collect(TFMessage, '/tf', TF_QOS)
        assert ros.wait_for(lambda: pub_img.get_subscription_count() and pub_info.get_subscription_count(), 20)
        assert ros.wait_for(lambda: ros.node.count_publishers('/dynrecon/dynamic_mask') > 0, 20)
        sent = 0
        for k, f in enumerate(seq.frames):
            hdr = Header(stamp=conv.sec_to_stamp(f.stamp), frame_id='cam_optical')
            pub_info.publish(conv.numpy_to_camera_info(seq.K, (W, H), hdr))
            if k == 0:  # the first frame may race discovery on the node's side: resend until it lands
                for _ in range(10):
                    pub_img.publish(conv.numpy_to_image(f.rgb, 'rgb8', hdr))
                    if ros.wait_for(lambda: masks, 5):
                        break
            else:
                pub_img.publish(conv.numpy_to_image(f.rgb, 'rgb8', hdr))
            sent += 1
        assert ros.wait_for(lambda: len(masks) >= sent and len(tfs) >= sent, 60), proc.output()[-3000:]
        assert proc.proc.poll() is None, proc.output()[-3000:]
        for m in masks:
            assert (m.encoding, m.width, m.height) == ('mono8', W, H)
        for msg in tfs:
            tr = msg.transforms[0].transform
            v = np.array([tr.translation.x, tr.translation.y, tr.translation.z,
                          tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w])
            assert np.isfinite(v).all() and abs(np.linalg.norm(v[3:]) - 1) < 1e-6
        assert 'Traceback' not in proc.output()
    finally:
        ros.close()
        proc.stop()


def test_reconstructor_with_pointmap_predictor_skips_non_finite():
    """The Reconstructor on a monocular stream with the dust3r predictor over exact pointmaps:
    trajectory = truth up to the stream scale; a frame whose network output is NaN is skipped with
    a reason and no NaN reaches any output."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.reconstructor import Reconstructor

    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=6, seed=3, movers=0, camera_motion=3.0))
    net = ExactNet(seq)
    bad_key = seq.frames[3].key
    pts, pose = net.by_key[bad_key]
    net.by_key[bad_key] = (np.full_like(pts, np.nan), pose)
    pred = Dust3rPredictor(net, Dust3rConfig(min_inliers=20))
    rec = Reconstructor(ReconConfig(), predictor=pred)
    results = []
    for f in seq.frames:
        results += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=None, K=seq.K.copy(), key=f.key, meta={}))
    results += rec.flush()
    assert [r.key for r in results if r.status != 'ok'] == [bad_key]
    assert 'finite' in results[3].reason
    ok = [r for r in results if r.status == 'ok']
    idx = [k for k, f in enumerate(seq.frames) if f.key != bad_key]
    scale = np.median(ok[0].depth[2:-2, 2:-2] / seq.depth_gt[0][2:-2, 2:-2])
    for r, k in zip(ok, idx):
        assert np.isfinite(r.pose).all() and np.isfinite(r.depth).all() and np.isfinite(r.confidence).all()
        gt = np.linalg.inv(seq.poses[0]) @ seq.poses[k]
        assert np.linalg.norm(r.pose[:3, 3] - scale * gt[:3, 3]) < 0.02 * scale + 1e-3, (k, r.pose, gt)
