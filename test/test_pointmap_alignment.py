"""Global pointmap alignment on pairwise pointmaps made from the synthetic sequence's ground truth."""
import numpy as np
import pytest

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.errors import InputError
from dynrecon_ros.evaluation import trajectory_metrics
from dynrecon_ros.pointmap_alignment import (AlignConfig, PointmapAligner, metric_scale_from_depth,
                                             mover_ids_from_sequence, pairs_from_ground_truth, scale_state,
                                             weighted_procrustes, window_pairs)

# 32x24, 4 fast movers (~30 % dynamic pixels), 10 fps so the camera moves a few cm per frame
CFG = dict(width=32, height=24, movers=4, seed=0, fps=10.0, mover_speed=3.0)


@pytest.fixture(scope='module')
def seq12():
    return render_sequence(SyntheticConfig(frames=12, **CFG))


def _window(seq, lo, hi, seed=1):
    pairs = window_pairs(hi - lo, 3)
    ids = mover_ids_from_sequence(seq)[lo:hi]
    out = pairs_from_ground_truth(seq.depth_gt[lo:hi], seq.poses[lo:hi], seq.K, pairs, ids,
                                  seq.mover_centers[lo:hi], seed=seed, mover_conf=20.0)
    return pairs, out


def _ate(seq, poses, lo=0):
    n = len(poses)
    return trajectory_metrics(seq.stamps[lo:lo + n], poses, seq.stamps[lo:lo + n], seq.poses[lo:lo + n])


def _aligner(**kw):
    kw.setdefault('smooth_weight', 0.0)
    return PointmapAligner(AlignConfig(iterations=100, cpu_threads=1, **kw))


def test_recovers_trajectory_and_focal_and_degrades_without_mask(seq12):
    pairs, out = _window(seq12, 0, 8)
    pp = seq12.K[:2, 2]  # the renderer's principal point is 0.4-0.8 px off the image centre
    f_gt = 0.5 * (seq12.K[0, 0] + seq12.K[1, 1])  # the model has one focal; fx, fy differ by 0.7 %
    good = _aligner().align(pairs, out, masks=seq12.masks[:8], pp=pp)
    m = _ate(seq12, good.poses)
    assert m['ate_rmse_sim3'] <= 0.01
    assert abs(good.focals[0] / f_gt - 1) <= 0.02
    assert good.poses.shape == (8, 4, 4) and good.depths.shape == (8, 24, 32) and good.pair_scales.shape == (len(pairs),)
    assert np.isclose(np.exp(np.log(good.pair_scales).mean()), 0.5, rtol=1e-4)  # the scale gauge
    bad = _aligner().align(pairs, out, masks=None, pp=pp)
    mb = _ate(seq12, bad.poses)
    assert mb['ate_rmse_sim3'] > 2 * m['ate_rmse_sim3'] and mb['ate_rmse_sim3'] > 0.01
    # static-pixel depth also recovered up to the one global scale
    st = ~seq12.masks[:8]
    ratio = seq12.depth_gt[:8][st] / good.depths[st]
    assert np.median(np.abs(ratio / np.median(ratio) - 1)) < 0.01


def test_warm_start_keeps_frame_and_scale_and_metric_scale(seq12):
    al = _aligner(warm_mode='freeze')
    pairs, out_a = _window(seq12, 0, 8, seed=1)
    a = al.align(pairs, out_a, masks=seq12.masks[0:8], pp=seq12.K[:2, 2], frame_ids=list(range(0, 8)))
    _, out_b = _window(seq12, 4, 12, seed=2)
    b = al.align(pairs, out_b, masks=seq12.masks[4:12], pp=seq12.K[:2, 2], frame_ids=list(range(4, 12)),
                 init=a)
    assert b.iterations == al.cfg.warm_iterations
    np.testing.assert_allclose(b.poses[:4], a.poses[4:8], atol=1e-6)  # overlap frames held
    traj = np.concatenate([a.poses, b.poses[4:]])
    m = _ate(seq12, traj)
    assert m['ate_rmse_sim3'] <= 0.01  # both windows in one frame and one scale
    # metric scale from a depth topic: robust median ratio (with 20 % garbage readings)
    sensor = seq12.depth_gt[0:8].astype(np.float64).copy()
    rng = np.random.default_rng(0)
    sensor[rng.random(sensor.shape) < 0.2] = 0.3
    k = metric_scale_from_depth(a.depths, sensor, seq12.masks[0:8])
    metric = scale_state(a, k)
    st = ~seq12.masks[0:8]
    assert abs(np.median(metric.depths[st] / seq12.depth_gt[0:8][st]) - 1) < 0.01
    span_est = np.linalg.norm(metric.poses[-1, :3, 3] - metric.poses[0, :3, 3])
    span_gt = np.linalg.norm(seq12.poses[7, :3, 3] - seq12.poses[0, :3, 3])
    assert abs(span_est / span_gt - 1) < 0.1  # metres now (the path is only ~10 cm, hence 10 %)
    with pytest.raises(InputError):
        al.align(pairs, out_b, init=a, frame_ids=list(range(20, 28)))
    # 'refine' (closed-form sweeps): the held frame keeps its pose, the others are refined, one frame
    ref = _aligner(warm_mode='refine').align(pairs, out_b, masks=seq12.masks[4:12], pp=seq12.K[:2, 2],
                                             frame_ids=list(range(4, 12)), init=a, frozen_ids=[4, 5])
    np.testing.assert_allclose(ref.poses[:2], a.poses[4:6], atol=1e-9)
    assert not np.allclose(ref.poses[2:4], a.poses[6:8], atol=1e-9)
    assert _ate(seq12, np.concatenate([a.poses, ref.poses[4:]]))['ate_rmse_sim3'] <= 0.01


def test_flow_term_and_fixed_focal(seq12):
    pairs, out = _window(seq12, 0, 8)
    n, h, w = 8, 24, 32
    K, poses, depth = seq12.K, seq12.poses, seq12.depth_gt
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    flows = {}
    for i, j in pairs:  # ego flow from ground truth (what a perfect optical flow gives on static pixels)
        cam = np.stack([(u - K[0, 2]) * depth[i] / K[0, 0], (v - K[1, 2]) * depth[i] / K[1, 1], depth[i]], -1)
        rel = np.linalg.inv(poses[j]) @ poses[i]
        pc = cam @ rel[:3, :3].T + rel[:3, 3]
        flows[(i, j)] = np.stack([pc[..., 0] / pc[..., 2] * K[0, 0] + K[0, 2] - u,
                                  pc[..., 1] / pc[..., 2] * K[1, 1] + K[1, 2] - v], -1)
    f_gt = 0.5 * (K[0, 0] + K[1, 1])
    st = _aligner().align(pairs, out, masks=seq12.masks[:8], flows=flows, pp=K[:2, 2], fixed_focal=f_gt)
    assert np.allclose(st.focals, f_gt)
    assert _ate(seq12, st.poses)['ate_rmse_sim3'] <= 0.01
    # a wrong flow (all pixels claim 30 px motion) is rejected by the 50 px cut / guard, not followed
    per = _aligner(shared_focal=False).align(pairs, out, masks=seq12.masks[:8], pp=K[:2, 2], iterations=30)
    assert per.focals.shape == (8,) and len(set(per.focals.round(6))) > 1
    assert np.all(np.abs(per.focals / f_gt - 1) < 0.03)
    wrong = {p: f + 30.0 for p, f in flows.items()}
    st2 = _aligner(flow_weight=1.0).align(pairs, out, masks=seq12.masks[:8], flows=wrong, pp=K[:2, 2], fixed_focal=f_gt)
    assert np.isfinite(st2.loss)


def test_weighted_procrustes_and_input_errors():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((50, 3))
    from scipy.spatial.transform import Rotation
    R = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    dst = 2.5 * src @ R.T + [1, 2, 3]
    dst[:5] += 10  # outliers with zero weight
    wgt = np.ones(50)
    wgt[:5] = 0
    s, R2, t = weighted_procrustes(src, dst, wgt)
    assert np.isclose(s, 2.5) and np.allclose(R2, R) and np.allclose(t, [1, 2, 3])
    with pytest.raises(InputError):
        PointmapAligner().align([(0, 1)], {'pts3d_1': np.zeros((1, 4, 4, 3))})
    out = {'pts3d_1': np.ones((2, 4, 4, 3)), 'pts3d_2_in_1': np.ones((2, 4, 4, 3)),
           'conf_1': np.full((2, 4, 4), 2.0), 'conf_2': np.full((2, 4, 4), 2.0)}
    with pytest.raises(InputError, match='connect'):
        PointmapAligner().align([(0, 1), (2, 3)], out)
