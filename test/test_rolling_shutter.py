"""The RGB-D pose step under a rolling shutter (dynrecon_ros/rolling_shutter.py, backend.rolling_shutter_s)."""
import numpy as np
import pytest

from dynrecon_ros.config import BackendConfig, FlowConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.flow import FlowCache
from dynrecon_ros.predictors.rgbd import RGBDPredictor, RGBDPredictorConfig
from dynrecon_ros.rolling_shutter import ShutterModel, from_frame_instant, to_frame_instant


@pytest.fixture(scope='module')
def shaken():
    # static room, 25 ms readout, hand-held jitter (angular rates 8-23 deg/s): the pair poses of a
    # global-shutter model are off by 1-4 cm
    return render_sequence(SyntheticConfig(width=160, height=120, frames=8, movers=0, seed=11,
                                           rolling_shutter=0.025, jitter=1.0))


def pair_errors(seq, readout):
    """Translation errors (mm) of the chained adjacent pair poses with the given readout time."""
    pred = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig(rolling_shutter_s=readout)))
    flows = FlowCache(FlowConfig())
    errs = []
    for k in range(len(seq.frames) - 1):
        a, b = seq.frames[k], seq.frames[k + 1]
        T, _, _ = pred.relative_pose(a, b, flows.get(a.key, a.rgb, b.key, b.rgb))
        T_gt = np.linalg.inv(seq.poses[k]) @ seq.poses[k + 1]
        errs.append(1000 * np.linalg.norm(T[:3, 3] - T_gt[:3, 3]))
    return np.array(errs)


def test_rolling_shutter_model_recovers_the_pair_poses(shaken):
    modelled, global_ = pair_errors(shaken, 0.025), pair_errors(shaken, 0.0)
    assert global_.mean() > 12.0, global_  # the case is meaningful: a global shutter model fails
    assert modelled.mean() < 0.5 * global_.mean() and modelled.mean() < 6.0, (modelled, global_)


def test_row_instants_and_their_motion():
    m = ShutterModel(0.03)
    s = m.row_offsets(np.array([-0.5, 99.5, 199.5]), 200)  # top edge, middle, bottom edge
    assert np.allclose(s, [-0.015, 0.0, 0.015])
    assert not ShutterModel(0.0).active and np.all(ShutterModel(0.0).row_offsets(np.arange(5), 5) == 0)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3)) + [0, 0, 3]
    tw = np.array([0.1, -0.05, 0.02, 0.3, -0.2, 0.1])
    s = rng.uniform(-0.015, 0.015, 20)
    Y = to_frame_instant(X, s, tw)
    assert np.abs(Y - X).max() > 1e-3  # the camera moved between the row's instant and the frame's
    assert np.allclose(from_frame_instant(Y, s, tw), X, atol=1e-4)  # inverse to first order


def test_ego_flow_sees_each_row_at_its_instant(shaken):
    """With the true poses and body twists, the ego flow of a rolling-shutter pair explains the static
    room (nothing flagged); the global-shutter ego flow flags part of it."""
    from dynrecon_ros.data.synthetic import BASE_STAMP, camera_poses
    from dynrecon_ros.flow_cue import pair_probability
    from dynrecon_ros.rolling_shutter import pair_twist
    from dynrecon_ros.segmentation import SegmentationConfig

    cfg = SyntheticConfig(width=160, height=120, frames=8, movers=0, seed=11, rolling_shutter=0.025, jitter=1.0)
    t = np.array([f.stamp for f in shaken.frames]) - BASE_STAMP
    twists = [pair_twist(np.linalg.inv(a) @ b, 1e-4) for a, b in zip(camera_poses(cfg, t), camera_poses(cfg, t + 1e-4))]
    flows, seg = FlowCache(FlowConfig()), SegmentationConfig()
    flagged = {False: 0, True: 0}
    for k in range(3, 7):
        a, b = shaken.frames[k], shaken.frames[k + 1]
        pf = flows.get(a.key, a.rgb, b.key, b.rgb)
        T_j_i = np.linalg.inv(shaken.poses[k + 1]) @ shaken.poses[k]
        for model in (False, True):
            sh = (ShutterModel(0.025), twists[k], twists[k + 1]) if model else None
            p, _, _ = pair_probability(a.depth, a.K, T_j_i, pf.fwd, pf.valid_fwd, seg, b.K, shutter=sh)
            flagged[model] += int(np.count_nonzero(p > seg.threshold))
    assert flagged[False] > 200, flagged  # the case is meaningful: a global-shutter ego flow flags the room
    assert flagged[True] < 0.1 * flagged[False], flagged
