"""The monocular path through the product (Reconstructor + dust3r predictor + monocular window step)
with an oracle network whose pairwise pointmaps come from the synthetic sequence's ground truth
(random per-pair scale, noise, movers placed where a static-scene network would put them), no depth
and no K given: trajectory, focal and the effect of the masks; the segmentation.mode errors."""
from types import SimpleNamespace

import numpy as np
import pytest

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.errors import InputError
from dynrecon_ros.evaluation import trajectory_metrics
from dynrecon_ros.frames import Frame
from dynrecon_ros.pointmap_alignment import mover_ids_from_sequence, pairs_from_ground_truth
from dynrecon_ros.predictors.dust3r import Dust3rPredictor
from dynrecon_ros.reconstructor import Reconstructor

W, H = 64, 48  # the network input of a 64-pixel model is the image itself (no resize, no crop)


class OracleNet:
    """Stand-in for PairNetwork: pairs_from_ground_truth for each ordered pair (deterministic per pair)."""

    def __init__(self, seq, noise=0.002):
        self.seq, self.noise = seq, noise
        self.cfg = SimpleNamespace(img_size=(W, W), patch_size=16)
        self.cache_frames = 16
        self.index = {f.key: k for k, f in enumerate(seq.frames)}
        self.ids = mover_ids_from_sequence(seq) if seq.masks.any() else None
        self.pairs_run = 0

    def predict_pairs(self, images, pairs, frame_ids=None, return_attention=False, cross_attn_zero=None):
        assert images.shape[1:3] == (H, W)
        s = self.seq
        outs = []
        for i, j in pairs:
            gi, gj = self.index[frame_ids[i]], self.index[frame_ids[j]]
            outs.append(pairs_from_ground_truth(s.depth_gt, s.poses, s.K, [(gi, gj)], self.ids, s.mover_centers,
                                                noise=self.noise, seed=1000 * gi + gj))
            self.pairs_run += 1
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@pytest.fixture(scope='module')
def seq():
    return render_sequence(SyntheticConfig(width=W, height=H, frames=14, seed=0, movers=2, fps=10.0,
                                           mover_speed=2.0))


def _run(seq, segmentation=True, **backend):
    cfg = ReconConfig.from_dict({'window': {'size': 6, 'neighbours': 2, 'keyframes': 2, 'output_lag': 2},
                                 'segmentation': {'enabled': segmentation}, 'backend': backend})
    net = OracleNet(seq)
    rec = Reconstructor(cfg, predictor=Dust3rPredictor(net))
    res = []
    for f in seq.frames:  # monocular: no depth, no K
        res += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=None, K=None, key=f.key, meta={}))
    res += rec.flush()
    return res, net


def test_oracle_pointmaps_through_the_pipeline(seq):
    res, net = _run(seq)
    assert [r.status for r in res] == ['ok'] * len(seq.frames), [r.reason for r in res]
    poses = np.stack([r.pose for r in res])
    m = trajectory_metrics(seq.stamps, poses, seq.stamps, seq.poses)
    f_gt = 0.5 * (seq.K[0, 0] + seq.K[1, 1])
    focal = np.array([r.K[0, 0] for r in res])
    print(f"ATE sim3 {m['ate_rmse_sim3'] * 1000:.2f} mm, focal {focal.mean():.3f} vs {f_gt:.3f}")
    assert m['ate_rmse_sim3'] <= 0.01
    assert np.all(np.abs(focal / f_gt - 1) <= 0.02)
    # depth on one scale: the median ratio to the truth is the same for every frame (static pixels)
    ratios = [np.median(r.depth[~seq.masks[k] & (r.depth > 0)] / seq.depth_gt[k][~seq.masks[k] & (r.depth > 0)])
              for k, r in enumerate(res)]
    assert np.std(ratios) / np.mean(ratios) < 0.02, ratios
    assert abs(np.median(res[0].depth) - 1) < 0.05  # no metric information: first frame median depth = 1
    # the masks come from the pipeline's flow segmentation and lie mostly on the movers
    hit = sum((r.mask > 0)[seq.masks[k]].sum() for k, r in enumerate(res))
    flagged = sum((r.mask > 0).sum() for r in res)
    print(f'masks: {flagged} pixels flagged, {hit / max(flagged, 1):.2f} of them on movers')
    assert flagged > 0 and hit / flagged > 0.5
    # the network ran once per ordered pair (outputs cached across window steps)
    assert net.pairs_run <= 2 * 3 * len(seq.frames)
    # without masks the movers corrupt the alignment
    res_off, _ = _run(seq, segmentation=False)
    m_off = trajectory_metrics(seq.stamps, np.stack([r.pose for r in res_off]), seq.stamps, seq.poses)
    print(f"ATE sim3 without masks {m_off['ate_rmse_sim3'] * 1000:.2f} mm")
    # (the robust initialisation already rejects most mover points, so the gap is modest here)
    assert m_off['ate_rmse_sim3'] > 1.1 * m['ate_rmse_sim3']


def test_metric_scale_parameter_and_given_K(seq):
    """metric_scale: metres per network unit (the oracle's pointmaps are metres times a per-pair
    scale); a given K is kept fixed."""
    cfg = ReconConfig.from_dict({'window': {'size': 5, 'neighbours': 2, 'output_lag': 1},
                                 'backend': {'metric_scale': 2.0}})
    rec = Reconstructor(cfg, predictor=Dust3rPredictor(OracleNet(seq)))
    res = []
    for f in seq.frames[:6]:
        res += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=None, K=seq.K.copy(), key=f.key, meta={}))
    res += rec.flush()
    assert all(r.status == 'ok' for r in res)
    for r in res:
        np.testing.assert_allclose(r.K, seq.K)
    # pair scales are exp(U(log 0.5, log 2)): geometric mean 1 -> 2 m per unit is ~ twice the truth
    k = np.median([np.median(r.depth[r.depth > 0] / seq.depth_gt[i][r.depth > 0]) for i, r in enumerate(res)])
    assert 1.4 < k < 2.8, k


def test_segmentation_mode_validation():
    with pytest.raises(InputError, match='segmentation.mode'):
        ReconConfig.from_dict({'segmentation': {'mode': 'magic'}})
    for mode in ('attention', 'both'):
        cfg = ReconConfig.from_dict({'segmentation': {'mode': mode}, 'backend': {'name': 'rgbd'}})
        with pytest.raises(InputError, match='segmentation.mode'):
            Reconstructor(cfg)
    Reconstructor(ReconConfig.from_dict({'segmentation': {'mode': 'flow'}, 'backend': {'name': 'rgbd'}}))
