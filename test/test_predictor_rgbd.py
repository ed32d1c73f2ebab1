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
