import numpy as np
import pytest

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.config import BackendConfig, FlowConfig
from dynrecon_ros.flow import FlowCache
from dynrecon_ros.predictors import make_predictor
from dynrecon_ros.geometry import fit_rigid, transform_points, unproject
from dynrecon_ros.predictors.rgbd import RGBDPredictor, RGBDPredictorConfig
from dynrecon_ros.errors import InputError


@pytest.fixture(scope='module')
def seq():
    # frames 60.. have a mover close to the camera (a quarter of the view and more)
    return render_sequence(SyntheticConfig(width=320, height=240, frames=80, seed=0))


def test_fit_rigid_recovers_rigid_motion():
    rng = np.random.default_rng(1)
    Q = rng.normal(size=(50, 3))
    T = np.eye(4)
    a = 0.3
    T[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    T[:3, 3] = [0.1, -0.2, 0.3]
    assert np.allclose(fit_rigid(Q, transform_points(T, Q)), T, atol=1e-9)


@pytest.mark.parametrize('k', [20, 70, 76])
def test_relative_pose_ignores_movers(seq, k):
    a, b = seq.frames[k], seq.frames[k + 1]
    pf = FlowCache(FlowConfig()).get(a.key, a.rgb, b.key, b.rgb)
    pred = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig(stride=2)))  # inliers on a stride-2 grid
    T, inl, n = pred.relative_pose(a, b, pf)
    T_gt = np.linalg.inv(seq.poses[k]) @ seq.poses[k + 1]
    assert np.linalg.norm(T[:3, 3] - T_gt[:3, 3]) < 0.006
    dyn = seq.masks[k]
    assert dyn.mean() > 0.05  # the case is meaningful: movers in view
    g = (slice(None, None, 2), slice(None, None, 2))  # inliers are verified on a stride-2 grid
    assert (inl & dyn).sum() < 0.1 * dyn[g].sum()  # movers are outliers
    assert (inl & ~dyn).sum() > 0.5 * (~dyn)[g].sum()

    full = pred.predict(a, b, pf)
    assert full.pts_i.shape == (240, 320, 3) and full.pts_j_in_i.shape == (240, 320, 3)
    assert full.conf_i.min() >= 1.0 and full.conf_j.min() >= 1.0
    # j's points expressed in i's frame agree with the GT transform of j's points
    ref = transform_points(T_gt, unproject(b.depth, b.K))
    err = np.linalg.norm(full.pts_j_in_i - ref, axis=-1)
    assert np.nanmedian(err) < 0.01


def test_make_predictor_errors_are_clear():
    with pytest.raises(InputError, match='dust3r needs a checkpoint'):
        make_predictor('dust3r', BackendConfig())
    with pytest.raises(InputError, match='unknown backend'):
        make_predictor('nope', BackendConfig())


def test_refinement_normal_equations_are_those_of_its_residuals():
    """The stacked Gauss-Newton system equals J^T W J, J^T W r with J by finite differences of the
    residuals (linear images: their sampled gradients are exact), Huber weights, no depth rows where
    j has no depth."""
    from dynrecon_ros.geometry import se3_increment
    from dynrecon_ros.predictors.rgbd import _normal_equations
    rng = np.random.default_rng(3)
    fx, fy, cx, cy = 100.0, 110.0, 32.0, 24.0
    img = lambda u, v: 100 + 1.5 * u + 0.8 * v  # noqa: E731  (grey levels of j)
    dep = lambda u, v: 2.0 + 0.01 * u - 0.005 * v  # noqa: E731  (depth of j, metres)
    X = np.stack([rng.uniform(-0.5, 0.5, 40), rng.uniform(-0.4, 0.4, 40), rng.uniform(1.8, 2.4, 40)], -1)
    T = se3_increment(np.array([0.01, -0.02, 0.03, 0.01, -0.005, 0.02]))  # T_j_i
    ref = rng.uniform(90, 200, 40)  # gain-corrected grey levels of i
    no_depth = np.arange(40) % 7 == 0
    s_i, s_d, huber = 4.0, 0.01, 1.5

    def project(xi):
        Y = X @ (se3_increment(xi) @ T)[:3, :3].T + (se3_increment(xi) @ T)[:3, 3]
        return Y, fx * Y[:, 0] / Y[:, 2] + cx, fy * Y[:, 1] / Y[:, 2] + cy

    Y0, u0, v0 = project(np.zeros(6))
    keep = ~no_depth
    sd = 1.0 / (s_d * Y0[keep, 2])  # sigma held at the linearisation point, as Gauss-Newton does

    def residuals(xi):
        Y, u, v = project(xi)
        return np.concatenate([(img(u, v) - ref) / s_i, (dep(u, v) - Y[:, 2])[keep] * sd])

    r0 = residuals(np.zeros(6))
    eps = 1e-6
    J = np.stack([(residuals(e * eps) - residuals(-e * eps)) / (2 * eps) for e in np.eye(6)], 1)
    w = np.minimum(1.0, huber / np.abs(r0))
    assert (w < 1).any() and (w == 1).any()  # both sides of the Huber kink
    D = np.where(no_depth, 0.0, dep(u0, v0))
    H, g = _normal_equations(Y0, (img(u0, v0), np.full(40, 1.5), np.full(40, 0.8)),
                             (D, np.full(40, 0.01), np.full(40, -0.005)), ref, fx, fy, s_i, s_d, huber)
    assert np.allclose(H, (J * w[:, None]).T @ J, rtol=1e-6, atol=1e-6 * np.abs(H).max())
    assert np.allclose(g, (J * w[:, None]).T @ r0, rtol=1e-6, atol=1e-6 * np.abs(g).max())
