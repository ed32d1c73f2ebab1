"""window.step_every: the frames between window steps are tracked (one pose pair, the mask carried along the flow)."""
import numpy as np
import pytest

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.errors import InputError
from dynrecon_ros.evaluation import trajectory_metrics
from dynrecon_ros.frames import Frame
from dynrecon_ros.reconstructor import Reconstructor
from dynrecon_ros.static_map import VoxelMap


@pytest.fixture(scope='module')
def seq():
    # the default sequence's opening: two movers, about a quarter of the view
    return render_sequence(SyntheticConfig(width=320, height=240, frames=30, seed=0))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope='module')
def tracked_run(seq):
    cfg = ReconConfig()
    cfg.window.step_every = 2
    cfg.map_process = False  # the map on the map thread: its integrations are counted below
    rec = Reconstructor(cfg)
    integrated = []
    orig = VoxelMap.integrate

    def integrate(self, depth, *a, **k):
        integrated.append(depth)
        return orig(self, depth, *a, **k)
    VoxelMap.integrate = integrate
    try:
        out = []
        for f in seq.frames:
            out += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=f.depth.copy(), K=f.K.copy(), key=f.key))
        out += rec.flush()
    finally:
        VoxelMap.integrate = orig
    return rec, out, integrated


def test_every_frame_gets_a_result_in_order_and_the_tracked_ones_are_accurate(seq, tracked_run):
    rec, out, _ = tracked_run
    assert [r.key for r in out] == list(seq.keys)
    assert all(r.status == 'ok' for r in out), [r.reason for r in out if r.status != 'ok']
    assert [r.tracked for r in out] == [k % 2 == 1 for k in range(len(out))]
    assert rec.timings.get('track', 0) > 0
    stamps, poses = np.array([r.stamp for r in out]), np.array([r.pose for r in out])
    tm = trajectory_metrics(stamps, poses, seq.stamps, seq.poses)
    assert tm['ate_rmse_se3'] < 0.002, tm
    # the tracked frames on their own (odd indices): as close to the truth, not the anchor's pose repeated
    odd = slice(1, None, 2)
    tt = trajectory_metrics(stamps[odd], poses[odd], seq.stamps, seq.poses)
    assert tt['ate_rmse_se3'] < 0.002, tt
    steps = [np.linalg.norm(out[k].pose[:3, 3] - out[k - 1].pose[:3, 3]) for k in range(1, len(out), 2)]
    truth = [np.linalg.norm(seq.poses[k][:3, 3] - seq.poses[k - 1][:3, 3]) for k in range(1, len(out), 2)]
    np.testing.assert_allclose(steps, truth, atol=0.002)  # (5-11 mm a frame)


def test_tracked_masks_follow_the_movers(seq, tracked_run):
    """A tracked frame's mask is its anchor's final mask carried along the flow and snapped to its own depth
    edges: closer to its own movers than the anchor's mask as it is."""
    _, out, _ = tracked_run
    carried, held = [], []
    for k in range(3, len(out), 2):  # (the first frames: no mask yet)
        gt = seq.masks[k] > 0
        carried.append(iou(out[k].mask > 0, gt))
        held.append(iou(out[k - 1].mask > 0, gt))
    assert np.mean(carried) > 0.9, carried
    assert np.mean(carried) > np.mean(held) + 0.05, (carried, held)


def test_only_the_stepped_frames_enter_the_map(seq, tracked_run):
    rec, out, integrated = tracked_run
    assert len(integrated) == (len(seq.frames) + 1) // 2
    stepped = [r.depth for r in out[::2]]
    assert all(d is s for d, s in zip(integrated, stepped))


def test_step_every_must_be_at_least_one():
    with pytest.raises(InputError, match='window.step_every'):
        Reconstructor(ReconConfig.from_dict({'window': {'step_every': 0}}))


def test_a_step_that_cannot_track_refuses_step_every():
    class Step:  # a window step without track (the network backends' kind)
        needs_depth, estimates_intrinsics = False, True

        def work_frame(self, frame):
            return frame

        def step(self, window, entry, published, world_pose):
            return ''

    class Predictor:
        def window_step(self, cfg, flows, segmenter, times, device):
            return Step()

    with pytest.raises(InputError, match='step_every 2.*RGB-D only'):
        Reconstructor(ReconConfig.from_dict({'window': {'step_every': 2}}), predictor=Predictor())


@pytest.mark.parametrize('step_every, behind, roles', [
    (1, [False] * 6, 'SSSSSS'),  # keeping up: every frame stepped
    (1, [True] * 6, 'StStSt'),  # behind: at most one tracked in a row, so the window steps on
    (3, [True] * 7, 'SttSttS'),  # behind: up to step_every - 1 in a row
    (3, [False, True, False, False, True, True], 'StSStt'),  # stepped as soon as the caller keeps up
    (2, [None] * 6, 'StStSt'),  # no word from the caller: the fixed rhythm
])
def test_a_caller_that_falls_behind_gets_frames_tracked(seq, step_every, behind, roles):
    rec = Reconstructor(ReconConfig.from_dict({'window': {'step_every': step_every}}))
    out = []
    for f, b in zip(seq.frames, behind):
        out += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=f.depth.copy(), K=f.K.copy(), key=f.key), behind=b)
    out += rec.flush()
    assert all(r.status == 'ok' for r in out)
    assert ''.join('t' if r.tracked else 'S' for r in out) == roles
