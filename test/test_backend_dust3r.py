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
from dynrecon_ros.config import BackendConfig
from dynrecon_ros.predictors.dust3r import Dust3rConfig, Dust3rPredictor

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

    def predict_pairs(self, images, pairs, frame_ids=None, return_attention=False, cross_attn_zero=None):
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
def test_monocular_geometry_on_exact_pointmaps(metric):
    """The dust3r backend on exact pointmaps of a 128x96 stream resized to the 128-pixel network
    (resolution mapping of depth and K): depth on one scale (metres when depth images come in),
    focal estimated, trajectory = truth up to that scale (static scene: no movers)."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.reconstructor import Reconstructor
    seq = render_sequence(SyntheticConfig(width=96, height=72, frames=5, seed=3, movers=0, camera_motion=3.0))
    rec = Reconstructor(ReconConfig.from_dict({'backend': {'align_iterations': 150}}),
                        predictor=Dust3rPredictor(ExactNet(seq), Dust3rConfig.from_backend(BackendConfig())))
    res = []
    for f in seq.frames:
        res += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=f.depth.copy() if metric else None, K=None,
                              key=f.key, meta={}))
    res += rec.flush()
    assert [r.status for r in res] == ['ok'] * 5, [r.reason for r in res]
    inner = (slice(3, -3), slice(3, -3))
    scale = np.median(res[0].depth[inner] / seq.depth_gt[0][inner])
    assert (abs(scale - 1) < 0.02) if metric else (abs(np.median(res[0].depth) - 1) < 0.05)
    for k, r in enumerate(res):
        assert abs(r.K[0, 0] / seq.K[0, 0] - 1) < 0.03, (r.K, seq.K)
        ratio = r.depth[inner] / seq.depth_gt[k][inner]
        assert np.median(np.abs(ratio / scale - 1)) < 0.02, (k, np.median(ratio), scale)
        gt = np.linalg.inv(seq.poses[0]) @ seq.poses[k]
        # loose: the model's principal point is the image centre, the renderer's is 1.5 px off
        assert np.linalg.norm(r.pose[:3, 3] - scale * gt[:3, 3]) < 0.25 * scale * max(np.linalg.norm(gt[:3, 3]), 0.02)


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


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['attention', 'both'])
def test_run_dust3r_segmentation_modes(ckpt, seq_dir, tmp_path, mode):
    """segmentation.mode attention / both end to end with the tiny checkpoint (Easi3R masks from the
    cross-attention of the same pass, re-weighted second pass aligned): every output, finite."""
    _, m, loose, seq = seq_dir
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(loose.read_text() + f'segmentation:\n  mode: {mode}\n')
    out = tmp_path / 'out'
    assert main(['run', '--input', str(m), '--output', str(out), '--backend', 'dust3r', '--checkpoint', ckpt,
                 '--config', str(cfg)]) == 0
    s = json.loads((out / 'summary.json').read_text())
    assert s['config']['segmentation']['mode'] == mode and s['frames'] >= 5, s['skipped']
    stamps, poses = read_trajectory(out / 'trajectory.tum')
    assert len(stamps) == s['frames'] and np.isfinite(poses).all()
    masks = sorted((out / 'masks').glob('*.png'))
    assert len(masks) == s['frames']
    for p in masks:
        mk = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert mk.shape == (H, W) and set(np.unique(mk)) <= {0, 255}
    assert (out / 'static_map.ply').read_bytes().startswith(b'ply\n')


def test_rgbd_with_attention_segmentation_is_an_input_error(seq_dir, tmp_path, capsys):
    d, _, _, _ = seq_dir
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('segmentation:\n  mode: attention\n')
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'o'), '--config', str(cfg)]) == 2
    err = capsys.readouterr().err
    assert 'segmentation.mode' in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1


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
    pred = Dust3rPredictor(net, Dust3rConfig.from_backend(BackendConfig()))
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


def test_pair_cache_entry_made_once_non_finite_zero_weight_and_bound():
    """A pair's cached entry is made once when it enters the cache: float32, a non-finite pixel
    fixed with log-confidence weight 0 and the view flagged (finite_views), the weights
    log(max(conf, 1)); later steps reuse it without the network; the cache keeps the last call's
    ordered pairs (pair_cache at least), no more; tensor_device keeps the same arrays as tensors."""
    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=4, seed=3, movers=0))
    net = ExactNet(seq)
    pts, pose = net.by_key[seq.frames[2].key]
    pts = pts.copy()
    pts[5, 7, 1] = np.nan
    net.by_key[seq.frames[2].key] = (pts, pose)
    pred = Dust3rPredictor(net, Dust3rConfig.from_backend(BackendConfig(pair_cache=2)))
    pred.tensor_device = 'cpu'
    frames = [Frame(stamp=f.stamp, rgb=f.rgb, depth=None, K=None, key=f.key, meta={}) for f in seq.frames]
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    out = pred.predict_window(frames, pairs)
    assert net.calls == 4 and out['pts3d_1'].dtype == np.float32
    np.testing.assert_array_equal(out['finite'], [[True, True], [True, True], [True, False], [False, True]])
    assert pred.finite_views(out, pairs, 1) and not pred.finite_views(out, pairs, 2)
    for e, name, v in ((2, 'pts3d_2_in_1', 2), (3, 'pts3d_1', 1)):
        assert np.isfinite(out[name][e]).all() and out[f'logw_{v}'][e, 5, 7] == 0 and out[f'conf_{v}'][e, 5, 7] == 1
        assert np.allclose(out[f'logw_{v}'][e, 0, 0], np.log(3.0))
        np.testing.assert_array_equal(out[name + '_t'][e].numpy(), out[name][e])
    again = pred.predict_window(frames, pairs[:2])
    assert net.calls == 4 and np.array_equal(again['pts3d_2_in_1'], out['pts3d_2_in_1'][:2])
    assert len(pred._pairs) == 2  # the last call's pairs (pair_cache 2)
    pred.predict_window(frames, pairs + [(0, 2), (2, 0)])
    assert net.calls == 8 and len(pred._pairs) == 6
    # the PairPredictor interface still reports the network's non-finite pixels as such (NaN)
    assert not np.isfinite(pred.predict(frames[1], frames[2]).pts_j_in_i).all()
