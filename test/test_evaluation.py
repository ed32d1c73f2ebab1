"""Evaluation metrics against hand-computed values."""
import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dynrecon_ros.errors import InputError
from dynrecon_ros.evaluation import mask_metrics, plot_trajectories, trajectory_metrics


def _gt(n=40):
    """Ground truth whose positions come in equal pairs (p[2k] == p[2k+1]), so an alternating +-d
    perturbation is uncorrelated with them and Umeyama alignment cannot absorb it. Rotations about z."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(-2, 2, size=(n // 2, 3))
    pts -= pts.mean(axis=0)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, 3] = np.repeat(pts, 2, axis=0)
    poses[:, :3, :3] = Rotation.from_euler('z', np.linspace(0, 90, n)[:, None], degrees=True).as_matrix()
    stamps = 100.0 + np.arange(n) / 30.0
    return stamps, poses


def test_alternating_offset_gives_known_ate_and_rpe():
    stamps, gt = _gt()
    d = 0.03
    sign = (-1.0) ** np.arange(len(gt))
    est = gt.copy()
    est[:, :3, 3] += sign[:, None] * d * np.array([0.6, 0.0, 0.8])  # unit direction, |offset| = d
    m = trajectory_metrics(stamps + 0.001, est, stamps, gt)
    assert m['n_matched'] == len(gt)
    assert m['ate_rmse_se3'] == pytest.approx(d, rel=1e-6)
    # Sim(3) (Umeyama by hand): s = var_p / (var_p + d^2), residual^2 = (1 - s)^2 var_p + s^2 d^2 (in this
    # setting the cross terms vanish: the offsets are uncorrelated with the centred positions).
    var_p = np.mean(np.sum((gt[:, :3, 3] - gt[:, :3, 3].mean(0)) ** 2, axis=1))
    s = var_p / (var_p + d * d)
    assert m['sim3_scale'] == pytest.approx(s, rel=1e-6)
    assert m['ate_rmse_sim3'] == pytest.approx(math.sqrt((1 - s) ** 2 * var_p + s * s * d * d), rel=1e-5)
    # Consecutive offsets differ by 2d and the rotations are exact.
    assert m['rpe_trans_rmse'] == pytest.approx(2 * d, rel=1e-6)
    assert m['rpe_rot_rmse'] == pytest.approx(0.0, abs=1e-5)


def test_alternating_rotation_gives_known_rpe_rotation_and_no_ate():
    stamps, gt = _gt()
    theta = 2.0
    sign = (-1.0) ** np.arange(len(gt))
    est = gt.copy()
    est[:, :3, :3] = gt[:, :3, :3] @ Rotation.from_euler('z', (sign * theta)[:, None], degrees=True).as_matrix()
    m = trajectory_metrics(stamps, est, stamps, gt)
    assert m['ate_rmse_se3'] == pytest.approx(0.0, abs=1e-9)
    assert m['rpe_rot_rmse'] == pytest.approx(2 * theta, rel=1e-6)
    # Relative translation seen from a frame rotated by -s_i*theta: error |(Rz(-s_i theta) - I) R_i^T dp_i|.
    dp = np.diff(gt[:, :3, 3], axis=0)
    local = np.einsum('nji,nj->ni', gt[:-1, :3, :3], dp)
    Rp = Rotation.from_euler('z', (-sign[:-1] * theta)[:, None], degrees=True).as_matrix()
    err = np.einsum('nij,nj->ni', Rp, local) - local
    assert m['rpe_trans_rmse'] == pytest.approx(np.sqrt(np.mean(np.sum(err ** 2, axis=1))), rel=1e-6)


def test_rigid_and_similarity_transforms_are_removed_by_alignment():
    stamps, gt = _gt()
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('xyz', [10, -20, 35], degrees=True).as_matrix()
    T[:3, 3] = [1.0, -2.0, 0.5]
    est = T @ gt
    m = trajectory_metrics(stamps, est, stamps, gt)
    assert m['ate_rmse_se3'] < 1e-9 and m['ate_rmse_sim3'] < 1e-9 and m['sim3_scale'] == pytest.approx(1.0)
    scaled = est.copy()
    scaled[:, :3, 3] *= 0.25
    m = trajectory_metrics(stamps, scaled, stamps, gt)
    assert m['sim3_scale'] == pytest.approx(4.0, rel=1e-9)
    assert m['ate_rmse_sim3'] < 1e-9 < 0.1 < m['ate_rmse_se3']
    assert m['rpe_trans_rmse_sim3'] < 1e-9 < m['rpe_trans_rmse']


def test_association_uses_max_dt_and_reports_too_few_matches():
    stamps, gt = _gt()
    m = trajectory_metrics(stamps[::2] + 0.004, gt[::2], stamps, gt)
    assert m['n_matched'] == len(gt) // 2
    with pytest.raises(InputError, match='match'):
        trajectory_metrics(stamps + 5.0, gt, stamps, gt)
    with pytest.raises(InputError, match='only 2'):
        trajectory_metrics(stamps[:2], gt[:2], stamps, gt)


def test_mask_metrics_pooled_over_frames():
    gt = {'1.000000': np.zeros((4, 5), bool), '2.000000': np.zeros((4, 5), bool)}
    pred = {'1.000000': np.zeros((4, 5), bool), '2.000000': np.zeros((4, 5), bool), '9.0': np.ones((4, 5), bool)}
    gt['1.000000'][0, :4] = True      # 4 gt pixels
    pred['1.000000'][0, 2:5] = True   # 3 predicted: 2 TP, 1 FP, 2 FN
    gt['2.000000'][1:3, 0] = True     # 2 gt pixels, 0 predicted: 2 FN
    m = mask_metrics(pred, gt)
    assert m['n'] == 2
    assert m['iou'] == pytest.approx(2 / (2 + 1 + 4))
    assert m['precision'] == pytest.approx(2 / 3)
    assert m['recall'] == pytest.approx(2 / 6)
    assert m['iou_mean'] == pytest.approx((2 / 5 + 0.0) / 2)
    # numeric keys written differently still match by stamp
    m2 = mask_metrics({'1.0000004': pred['1.000000']}, gt)
    assert m2['n'] == 1 and m2['precision'] == pytest.approx(2 / 3)
    with pytest.raises(InputError, match='size'):
        mask_metrics({'1.000000': np.zeros((3, 5), bool)}, gt)
    with pytest.raises(InputError, match='no predicted mask'):
        mask_metrics({'5.0': pred['1.000000']}, gt)


def test_plot_is_written(tmp_path):
    stamps, gt = _gt()
    out = plot_trajectories(stamps, gt, stamps, gt, tmp_path / 'sub' / 'traj.png')
    data = out.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
