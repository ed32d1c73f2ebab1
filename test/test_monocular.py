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
from dynrecon_ros.predictors.dust3r import Dust3rConfig, Dust3rPredictor
from dynrecon_ros.reconstructor import Reconstructor
from pointmap_fixtures import mover_ids_from_sequence, pairs_from_ground_truth

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
        self.zeroed = []

    def predict_pairs(self, images, pairs, frame_ids=None, return_attention=False, cross_attn_zero=None):
        assert images.shape[1:3] == (H, W)
        s = self.seq
        outs = []
        for e, (i, j) in enumerate(pairs):
            gi, gj = self.index[frame_ids[i]], self.index[frame_ids[j]]
            o = pairs_from_ground_truth(s.depth_gt, s.poses, s.K, [(gi, gj)], self.ids, s.mover_centers,
                                        noise=self.noise, seed=1000 * gi + gj)
            if return_attention:  # planted Easi3R behaviour (see attention())
                o['cross_attn_1'], o['cross_attn_2'] = self.attention(gi, gj)
            if cross_attn_zero is not None:  # second pass: record which view-2 tokens were suppressed
                self.zeroed.append((gj, np.asarray(cross_attn_zero[1][e]).reshape(self.tokens(gj).shape)))
            outs.append(o)
            self.pairs_run += 1
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def encoder_features(self, images, frame_ids=None):
        """(N, h, w, 8) encoder tokens as trained features behave: a mover's tokens resemble each
        other (k-means puts them in their own clusters), the background's are varied."""
        out = []
        for k in frame_ids:
            f = self.index[k]
            rng = np.random.default_rng(f)
            out.append(rng.standard_normal((H // 16, W // 16, 8)) + 4.0 * self.tokens(f)[..., None] * np.eye(8)[0])
        return np.stack(out).astype(np.float32)

    def tokens(self, f):
        """(h, w) bool: 16x16 patches of frame f that are mostly mover pixels."""
        m = self.seq.masks[f]
        return m.reshape(H // 16, 16, W // 16, 16).mean(axis=(1, 3)) > 0.3

    def attention(self, i, j, layers=2, heads=2):
        """Decoder logits as Easi3R observes them: view 2's mover tokens are attended little and
        inconsistently across pairs (decoder 1), view 1's mover tokens consistently (decoder 2)."""
        rng = np.random.default_rng(7919 * i + j)
        d1, d2 = self.tokens(j), self.tokens(i)
        a1 = np.where(d1, 0.1 + 0.8 * rng.random(d1.shape), 1.0) + 0.02 * rng.standard_normal((1, layers, heads) + d1.shape)
        a2 = np.where(d2, 1.0, 0.5) + 0.02 * rng.standard_normal((1, layers, heads) + d2.shape)
        return a1.astype(np.float32), a2.astype(np.float32)


@pytest.fixture(scope='module')
def seq():
    return render_sequence(SyntheticConfig(width=W, height=H, frames=14, seed=0, movers=2, fps=10.0,
                                           mover_speed=2.0))


def _run(seq, segmentation=True, mode='flow', seg=None, noise=0.002, give_K=False, **backend):
    cfg = ReconConfig.from_dict({'window': {'size': 6, 'neighbours': 2, 'keyframes': 2, 'output_lag': 2},
                                 'segmentation': {'enabled': segmentation, 'mode': mode, **(seg or {})},
                                 'backend': backend})
    net = OracleNet(seq, noise)
    rec = Reconstructor(cfg, predictor=Dust3rPredictor(net, Dust3rConfig.from_backend(cfg.backend)))
    res = []
    for f in seq.frames:  # monocular: no depth, no K unless give_K
        res += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=None, K=seq.K.copy() if give_K else None, key=f.key,
                              meta={}))
    res += rec.flush()
    return res, net


def test_oracle_pointmaps_through_the_pipeline(seq):
    # 1 % pointmap noise: at 0.2 % the robust initialisation alone rejects most mover points and the
    # masks' effect on the trajectory was within the run-to-run spread (~0.5 mm)
    res, net = _run(seq, noise=0.01)
    assert [r.status for r in res] == ['ok'] * len(seq.frames), [r.reason for r in res]
    poses = np.stack([r.pose for r in res])
    m = trajectory_metrics(seq.stamps, poses, seq.stamps, seq.poses)
    f_gt = 0.5 * (seq.K[0, 0] + seq.K[1, 1])
    focal = np.array([r.K[0, 0] for r in res])
    print(f"ATE sim3 {m['ate_rmse_sim3'] * 1000:.2f} mm, focal {focal.mean():.3f} vs {f_gt:.3f}")
    assert m['ate_rmse_sim3'] <= 0.01
    # the focal of every output frame: estimated on the first window, then held (refining a shared
    # focal in each warm step ratcheted it up by ~0.15 % per frame: 1.99 % at the last frame here)
    assert np.all(np.abs(focal / f_gt - 1) <= 0.005), focal / f_gt - 1
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
    res_off, _ = _run(seq, segmentation=False, noise=0.01)
    m_off = trajectory_metrics(seq.stamps, np.stack([r.pose for r in res_off]), seq.stamps, seq.poses)
    print(f"ATE sim3 without masks {m_off['ate_rmse_sim3'] * 1000:.2f} mm")
    assert m_off['ate_rmse_sim3'] > 2 * m['ate_rmse_sim3']


@pytest.mark.slow
def test_large_mover_does_not_throw_a_new_frame_off():
    """40 frames with fast movers that cover up to ~45 % of some views before their masks exist: the new
    frame's placement (the init's consensus fit) must not be pulled off by them. Before the consensus
    seed, frames 17 and 37 were placed 0.42 / 0.50 m off, left 63 / 203 mm off when published (ATE
    35 mm, K given); now ATE 5.7 mm, largest 11 mm."""
    long_seq = render_sequence(SyntheticConfig(width=W, height=H, frames=40, seed=0, movers=2, fps=10.0,
                                               mover_speed=2.0))
    res, _ = _run(long_seq, give_K=True)
    assert [r.status for r in res] == ['ok'] * 40, [r.reason for r in res]
    from evo.core.trajectory import PoseTrajectory3D
    est = PoseTrajectory3D(poses_se3=[r.pose for r in res], timestamps=np.array(long_seq.stamps))
    gt = PoseTrajectory3D(poses_se3=list(long_seq.poses), timestamps=np.array(long_seq.stamps))
    est.align(gt, correct_scale=True)
    err = np.linalg.norm(est.positions_xyz - gt.positions_xyz, axis=1)
    print(f'ATE {1000 * np.sqrt(np.mean(err ** 2)):.1f} mm, largest {1000 * err.max():.1f} mm (frame {err.argmax()})')
    assert np.sqrt(np.mean(err ** 2)) <= 0.01 and err.max() <= 0.03


def test_flow_failing_the_fb_check_is_not_aligned_on_any_window(seq):
    """Garbage planted in the forward flow of a block fails the forward-backward check; the flows the
    aligner gets are NaN (= no flow) exactly at the pixels failing the check, on the first window
    (Adam schedule) as on the warm steps, so the garbage never enters the flow term."""
    cfg = ReconConfig.from_dict({'window': {'size': 4, 'neighbours': 2, 'output_lag': 1},
                                 'segmentation': {'enabled': False}, 'backend': {'align_iterations': 30}})
    rec = Reconstructor(cfg, predictor=Dust3rPredictor(OracleNet(seq), Dust3rConfig.from_backend(cfg.backend)))
    est, calls = rec.flows.estimator, []
    block = (slice(14, 34), slice(20, 44))

    class Planted:  # FlowCache computes a pair's forward flow, then its backward one
        n = 0

        def compute(self, a, b):
            fl = est.compute(a, b).copy()
            if Planted.n % 2 == 0:
                fl[block] += [9.0, -7.0]
            Planted.n += 1
            return fl

    rec.flows.estimator = Planted()
    got, get = [], rec.flows.get
    rec.flows.get = lambda *a: got.append(get(*a)) or got[-1]
    align = rec.step.aligner.align

    def spy(pairs, out, flows=None, init=None, **kw):
        calls.append((init is None, {k: v.copy() for k, v in flows.items()}, list(got)))
        got.clear()
        return align(pairs, out, flows=flows, init=init, **kw)

    rec.step.aligner.align = spy
    res = []
    for f in seq.frames[:4]:
        res += rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=None, K=None, key=f.key, meta={}))
    res += rec.flush()
    assert [r.status for r in res] == ['ok'] * 4, [r.reason for r in res]
    assert [c[0] for c in calls] == [True, False, False]  # the first window, then warm steps
    for first, flows, pfs in calls:
        invalid = [m for pf in pfs for m in (~pf.valid_fwd, ~pf.valid_bwd)]
        nan = [~np.isfinite(fl).all(-1) for fl in flows.values()]
        assert len(nan) == len(invalid) == 2 * len(pfs) > 0  # (k, t), (t, k) per pair of the new frame t
        assert all(np.array_equal(m, v) for m, v in zip(nan, invalid))  # NaN exactly where invalid
        # the planted block (forward flows: the even ones) failed the check and is NaN; most of the
        # rest passed it (measured: block 100 %, rest 12-39 % NaN)
        rest = np.ones(nan[0].shape, bool)
        rest[block] = False
        assert all(m[block].mean() > 0.9 for m in nan[::2]), [m[block].mean() for m in nan]
        assert all(m[rest].mean() < 0.5 for m in nan), [m[rest].mean() for m in nan]


def test_metric_scale_parameter_and_given_K(seq):
    """metric_scale: metres per network unit (the oracle's pointmaps are metres times a per-pair
    scale); a given K is kept fixed."""
    cfg = ReconConfig.from_dict({'window': {'size': 5, 'neighbours': 2, 'output_lag': 1},
                                 'backend': {'metric_scale': 2.0}})
    rec = Reconstructor(cfg, predictor=Dust3rPredictor(OracleNet(seq), Dust3rConfig.from_backend(cfg.backend)))
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


def test_attention_mode_through_the_pipeline(seq):
    """segmentation.mode attention with an oracle whose decoder attention behaves as Easi3R observes
    (planted on the movers' tokens): the masks come from the attention (token-sized), the second
    pass suppresses exactly the mover tokens of view 2, and the trajectory stays within 1 cm.
    With the optional raw-contrast guard (segmentation.attention_min_contrast 30), so that the frames
    without movers get empty masks (Easi3R itself flags their stretched noise, see below)."""
    res, net = _run(seq, mode='attention', seg={'attention_min_contrast': 30.0})
    assert all(r.status == 'ok' for r in res)
    m = trajectory_metrics(seq.stamps, np.stack([r.pose for r in res]), seq.stamps, seq.poses)
    print(f"attention mode: ATE sim3 {m['ate_rmse_sim3'] * 1000:.2f} mm")
    assert m['ate_rmse_sim3'] <= 0.01
    # frames with movers: token-sized (16 px) masks around them
    moving = [k for k in range(len(seq.frames)) if net.tokens(k).any()]
    hit = sum((res[k].mask > 0)[seq.masks[k]].sum() for k in moving)
    flagged = sum((res[k].mask > 0).sum() for k in moving)
    assert flagged > 0 and hit / flagged > 0.5, hit / flagged
    assert all((res[k].mask > 0).any() for k in moving)
    still = [k for k in range(len(seq.frames)) if k not in moving]  # frames 8.. (movers gone)
    assert still and not any((res[k].mask > 0).any() for k in still), [(res[k].mask > 0).mean() for k in still]
    # second pass: view 2's mover tokens are the ones suppressed (when view 2 has movers)
    calls = [(j, sel) for j, sel in net.zeroed if j in moving]
    covered = sum((sel & net.tokens(j)).sum() for j, sel in calls) / sum(net.tokens(j).sum() for j, _ in calls)
    precise = sum((sel & net.tokens(j)).sum() for j, sel in calls) / max(sum(sel.sum() for _, sel in calls), 1)
    print(f'second pass: {len(net.zeroed)} pairs, {covered:.2f} of the mover tokens suppressed, '
          f'{precise:.2f} of the suppressed tokens are movers')
    assert calls and covered > 0.6 and precise > 0.5


@pytest.mark.parametrize('seed', [0, 1])
def test_attention_masks_empty_without_movers(seed):
    """(c) A sequence without movers (the oracle's attention is noise only): Easi3R's pipeline (the
    default) flags the noise that its per-frame min-max stretches to 0..1; the optional guard
    segmentation.attention_min_contrast 30 rejects it through the product path (empty masks)."""
    still = render_sequence(SyntheticConfig(width=W, height=H, frames=10, seed=seed, movers=0, fps=10.0))
    assert not still.masks.any()
    res, _ = _run(still, mode='attention', seg={'attention_min_contrast': 30.0})
    assert [r.status for r in res] == ['ok'] * len(still.frames), [r.reason for r in res]
    assert not any((r.mask > 0).any() for r in res), [float((r.mask > 0).mean()) for r in res]
    res_off, _ = _run(still, mode='attention')
    flagged = [float((r.mask > 0).mean()) for r in res_off]
    print(f'guard off (default): flagged fraction per frame {np.round(flagged, 2)}')
    assert sum(f > 0 for f in flagged) >= len(flagged) // 2
    if seed == 0:  # the other guard, segmentation.attention_min_separation, reaches the step too; it is
        # weaker here (one window test: a window whose Otsu split separates well keeps its masks)
        sep = [float((r.mask > 0).mean()) for r in _run(still, mode='attention',
                                                        seg={'attention_min_separation': 4.0})[0]]
        print(f'separation guard: flagged fraction per frame {np.round(sep, 2)}')
        assert sum(f > 0 for f in sep) <= sum(f > 0 for f in flagged) // 2


def test_a_first_window_without_positive_depth_is_refused_not_published_as_nan(seq, monkeypatch):
    from dynrecon_ros.pointmap_alignment import PointmapAligner
    real = PointmapAligner.align

    def behind_the_camera(self, *a, **kw):  # what a diverged first alignment can give
        st = real(self, *a, **kw)
        if kw.get('init') is None:
            st.depths = [-np.abs(d) for d in st.depths]
        return st
    monkeypatch.setattr(PointmapAligner, 'align', behind_the_camera)
    res, _ = _run(seq)
    failed = [r for r in res if r.status != 'ok']
    assert failed and all('no pixel of positive depth' in r.reason for r in failed if 'alignment' in r.reason)
    assert any('no pixel of positive depth' in r.reason for r in failed)
    assert all(np.all(np.isfinite(r.pose)) for r in res if r.status == 'ok')


def test_the_network_step_keeps_no_far_anchors(seq):
    """window.far_keyframes (default 20) is the RGB-D step's: the network's window keeps no far anchors (their frames
    would only hold memory); the RGB-D one keeps them."""
    cfg = ReconConfig()
    assert cfg.window.far_keyframes > 0
    mono = Reconstructor(cfg, predictor=Dust3rPredictor(OracleNet(seq), Dust3rConfig.from_backend(cfg.backend)))
    assert mono.window.max_far == 0
    assert Reconstructor(ReconConfig()).window.max_far == cfg.window.far_keyframes
