import numpy as np
import pytest

from dynrecon_ros.alignment import PairConstraint, WindowAligner
from dynrecon_ros.geometry import so3_exp
from dynrecon_ros.config import AlignmentConfig


def _aligner(**kw) -> WindowAligner:
    """The aligner with the pipeline's alignment settings, ``kw`` replacing some."""
    return WindowAligner(AlignmentConfig(**kw), 'cpu')


def _problem(seed=0, F=4, n=800, outliers=0.0, pairs=((0, 1), (1, 2), (2, 3), (0, 2), (0, 3))):
    rng = np.random.default_rng(seed)
    K = np.array([[260.0, 0, 160], [0, 260.0, 120], [0, 0, 1]])
    gt = [np.eye(4)]
    for _ in range(1, F):
        T = np.eye(4)
        T[:3, :3] = so3_exp(rng.normal(0, 0.02, 3))
        T[:3, 3] = rng.normal(0, 0.03, 3)
        gt.append(gt[-1] @ T)
    gt = np.array(gt)
    W = rng.uniform([-2, -1.5, 2], [2, 1.5, 5], (n, 3))
    cons = []
    for a, b in pairs:
        Pa = (W - gt[a][:3, 3]) @ gt[a][:3, :3]
        Pb = (W - gt[b][:3, 3]) @ gt[b][:3, :3]
        uv = np.stack([K[0, 0] * Pb[:, 0] / Pb[:, 2] + K[0, 2], K[1, 1] * Pb[:, 1] / Pb[:, 2] + K[1, 2]], -1)
        Pb = Pb + rng.normal(0, 0.002, Pb.shape)
        uv = uv + rng.normal(0, 0.1, uv.shape)
        m = int(outliers * n)
        Pb[:m] += rng.normal(0, 0.3, (m, 3))  # gross outliers (a mover that slipped through)
        uv[:m] += rng.normal(0, 10, (m, 2))
        cons.append(PairConstraint(a, b, Pa, Pb, uv, np.ones(n)))
    init = gt.copy()
    for k in range(1, F):
        init[k][:3, 3] += rng.normal(0, 0.01, 3)
        init[k][:3, :3] = init[k][:3, :3] @ so3_exp(rng.normal(0, 0.01, 3))
    return gt, init, cons, np.stack([K] * F)


@pytest.mark.parametrize('flow_weight', [0.0, 1.0])
def test_alignment_converges_and_holds_fixed_frames(flow_weight):
    gt, init, cons, K = _problem()
    fixed = np.array([True, False, False, False])
    res = _aligner(iterations=5, flow_weight=flow_weight).align(init, fixed, cons, K)
    err0 = np.linalg.norm(init[:, :3, 3] - gt[:, :3, 3], axis=1)
    err = np.linalg.norm(res.poses[:, :3, 3] - gt[:, :3, 3], axis=1)
    assert err0[1:].min() > 0.005
    assert err.max() < 0.001
    assert np.array_equal(res.poses[0], init[0])
    assert res.cost_final < res.cost_initial
    for R in res.poses[:, :3, :3]:
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-9)


def test_alignment_is_robust_to_outliers():
    gt, init, cons, K = _problem(seed=3, outliers=0.2)
    res = _aligner(iterations=8).align(init, np.array([True, False, False, False]), cons, K)
    err = np.linalg.norm(res.poses[:, :3, 3] - gt[:, :3, 3], axis=1)
    assert err.max() < 0.002


def test_holding_two_frames_keeps_the_gauge():
    # with frames 0 and 1 held at their (exact) values, frames 2, 3 are pulled to GT
    gt, init, cons, K = _problem(seed=5)
    init[1] = gt[1]
    res = _aligner(iterations=5).align(init, np.array([True, True, False, False]), cons, K)
    assert np.allclose(res.poses[:2], gt[:2])
    assert np.linalg.norm(res.poses[2:, :3, 3] - gt[2:, :3, 3], axis=1).max() < 0.001


def test_smoothness_term_runs_and_nothing_free_is_a_no_op():
    gt, init, cons, K = _problem(seed=7)
    res = _aligner(iterations=3, smooth_weight=1e-3).align(init, np.array([True, False, False, False]), cons, K)
    assert np.linalg.norm(res.poses[:, :3, 3] - gt[:, :3, 3], axis=1).max() < 0.002
    same = _aligner().align(init, np.ones(4, bool), cons, K)
    assert np.array_equal(same.poses, init)
