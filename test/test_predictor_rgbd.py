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
    from dynrecon_ros.predictors.direct_refinement import _normal_equations
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


def camouflaged_pair(seed, depth_noise=None):
    """Flow correspondences of one pair at 320x240: the room 2.5-6 m away over the left 55 % of the view and a
    camouflaged rigid mover 1.2-1.6 m away over the right 45 % (its pattern fixed in the world: its flow is the
    room's, the camera's 8 mm step; its measured depth in j is 1.2 % farther, the mover walking away), depth
    without noise. (ransac_rigid's result with the sensor's sigma(z) / z ``depth_noise`` (callable of z) or
    without a depth gate (None), T_i_j, mover (N,))."""
    from dynrecon_ros.geometry import se3_increment
    from dynrecon_ros.predictors.rgbd import ransac_rigid
    rng = np.random.default_rng(seed)
    K = np.array([[267.7, 0, 159.5], [0, 269.6, 123.8], [0, 0, 1]])
    n = 800
    u, v = rng.uniform(0, 320, n), rng.uniform(0, 240, n)
    mover = u > 176
    z = np.where(mover, rng.uniform(1.2, 1.6, n), rng.uniform(2.5, 6.0, n))
    P = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], -1)
    T_j_i = se3_increment(np.array([0.006, -0.003, 0.004, 0.003, -0.004, 0.002]))
    Y = P @ T_j_i[:3, :3].T + T_j_i[:3, 3]
    uv = np.stack([K[0, 0] * Y[:, 0] / Y[:, 2] + K[0, 2], K[1, 1] * Y[:, 1] / Y[:, 2] + K[1, 2]], -1)
    uv += rng.normal(0, 0.15, uv.shape)  # flow noise, px
    zq = Y[:, 2] * np.where(mover, 1.012, 1.0) * (1 + rng.normal(0, 0.0005, n))
    Q = np.stack([(uv[:, 0] - K[0, 2]) / K[0, 0] * zq, (uv[:, 1] - K[1, 2]) / K[1, 1] * zq, zq], -1)
    fit = ransac_rigid(P, Q, uv, K, 64, 0.75, 0.02, np.random.default_rng(seed), 4, 0.3, None, 0.75, 8,
                       None if depth_noise is None else depth_noise(zq), 1.0)
    return fit, np.linalg.inv(T_j_i), mover


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_flow_ransac_keeps_a_camouflaged_mover_out_by_its_depth(seed):
    """A camouflaged mover's flow fits the camera's motion; only its depth tells. Within the flat 2 % relative
    depth gate it joins the consensus, and the weighted 3D refits follow its 1.2 % depth offset (17 mm; over the
    far room the 18 mm translation they end at is hidden by a rotation: 0.4-0.6 px); the depth gate at the
    consensus's own noise (in units of the sensor's sigma(z), not below 1 sigma), applied from the hypothesis
    on, leaves the mover out."""
    from dynrecon_ros.segmentation import SegmentationConfig
    s = SegmentationConfig()
    (T0, inl0, _, _, gate0), T, mover = camouflaged_pair(seed)
    assert np.linalg.norm(T0[:3, 3] - T[:3, 3]) > 0.01  # the case is meaningful: without the gate the fit follows
    (T1, inl1, _, _, gate), _, _ = camouflaged_pair(
        seed, lambda z: (s.depth_sigma_a + s.depth_sigma_b * (z - 0.4) ** 2) / z)
    assert np.linalg.norm(T1[:3, 3] - T[:3, 3]) < 0.0012
    assert inl1[mover].mean() < 0.05 and inl1[~mover].mean() > 0.9, (inl1[mover].mean(), inl1[~mover].mean())
    assert np.isinf(gate0) and 1.0 <= gate < 3.0


@pytest.mark.slow  # 320x240, 30 frames: ~10 s of CPU; the fast suite has the pair case above
def test_pose_holds_with_camouflaged_movers_covering_half_the_view():
    """camouflage_small seed 511 (the seed the mechanism was found on), 30 frames, 320x240: the movers cover
    37-49 % of the view and the older frame's mask has only 55-75 % of them when the pair poses run. Their
    flow fits the camera's motion, only their depth does not: with the flat 2 % depth gate alone the pair poses
    followed them by 10-30 mm (ATE 5.4 mm); with the depth gate at the consensus's noise 1.6 mm."""
    seq, ok, ate = _scenario_run('camouflage_small', 511, 30)
    assert np.mean([m.mean() for m in seq.masks[5:27]]) > 0.35  # the condition: movers over much of the view
    assert len(ok) == 30
    assert ate < 0.003, ate


def _scenario_run(name: str, seed: int, frames: int, seq=None, segmentation: dict | None = None, **backend):
    """(sequence, results with status ok, ATE m) of the default pipeline (with the scenario's sensor timing; ``backend``
    fields set, and ``segmentation``'s) on scenario ``name`` rendered with ``frames`` frames (or on ``seq``, that
    rendering made before)."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.evaluation import trajectory_metrics
    from dynrecon_ros.reconstructor import Reconstructor
    scfg = scenario_config(name, seed=seed, frames=frames)
    seq = render_sequence(scfg) if seq is None else seq
    cfg = ReconConfig()
    cfg.backend.rolling_shutter_s, cfg.backend.depth_delay_s = scfg.rolling_shutter, scfg.depth_delay
    for k, v in backend.items():
        setattr(cfg.backend, k, v)
    for k, v in (segmentation or {}).items():
        setattr(cfg.segmentation, k, v)
    rec = Reconstructor(cfg)
    out = [r for f in seq.frames for r in rec.push(f)] + rec.flush()
    ok = [r for r in out if r.status == 'ok']
    tm = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps, seq.poses)
    return seq, ok, tm['ate_rmse_se3']


def near_mover_pair(seed, layered, mover_share=0.6, step=0.04, readout=0.0):
    """Flow correspondences of a stream's first pair at 320x240 (no mask prior yet): the room 3.5-6 m away over
    the left of the view and a rigid mover 0.9-1.3 m away over the right ``mover_share`` of it, walking ``step`` m
    across the view between the two frames while the camera steps 3 mm; flow noise 0.15 px, depth noise 0.03 %.
    ``readout`` > 0: fitted by the rolling-shutter branch (rows read over that many s; the 2 px threshold it
    starts from). (ransac_rigid's T_i_j with or without ``layered``, the camera's true T_i_j)."""
    from dynrecon_ros.geometry import se3_increment
    from dynrecon_ros.predictors.rgbd import ransac_rigid
    rng = np.random.default_rng(seed)
    K = np.array([[267.7, 0, 159.5], [0, 269.6, 123.8], [0, 0, 1]])
    n = 800
    u, v = rng.uniform(0, 320, n), rng.uniform(0, 240, n)
    mover = u > 320 * (1 - mover_share)
    z = np.where(mover, rng.uniform(0.9, 1.3, n), rng.uniform(3.5, 6.0, n))
    P = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], -1)
    T_j_i = se3_increment(np.array([0.002, -0.001, 0.002, 0.001, -0.002, 0.001]))
    X = np.where(mover[:, None], P + step * np.array([1.0, 0.0, 0.125]), P)  # the mover's step, in i's frame
    Y = X @ T_j_i[:3, :3].T + T_j_i[:3, 3]
    uv = np.stack([K[0, 0] * Y[:, 0] / Y[:, 2] + K[0, 2], K[1, 1] * Y[:, 1] / Y[:, 2] + K[1, 2]], -1)
    uv += rng.normal(0, 0.15, uv.shape)
    zq = Y[:, 2] * (1 + rng.normal(0, 0.0003, n))
    Q = np.stack([(uv[:, 0] - K[0, 2]) / K[0, 0] * zq, (uv[:, 1] - K[1, 2]) / K[1, 1] * zq, zq], -1)
    rows = v / 240 * readout if readout > 0 else None
    T = ransac_rigid(P, Q, uv, K, 64, 2.0 if readout > 0 else 0.75, 0.02, np.random.default_rng(seed), 4, 0.3,
                     rows, 0.75, 8, None, 1.0, layered=layered)[0]
    return T, np.linalg.inv(T_j_i)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_a_first_pair_with_a_close_mover_over_most_of_the_view_finds_the_room(seed):
    """With no mask prior, a close rigid mover over 60 % of the view outnumbers the room behind it: the best
    hypothesis by the wide score is the camera following the mover (40-47 mm off). The layered judgment
    (refined hypotheses at the noise scale, the motion behind preferred) finds the room's; with the mover a
    minority it finds the room as the wide score does, and a near object that does not move changes nothing.
    Under either shutter."""
    T_wide, T = near_mover_pair(seed, False)
    assert np.linalg.norm(T_wide[:3, 3] - T[:3, 3]) > 0.02  # the case is meaningful
    T_layered, _ = near_mover_pair(seed, True)
    assert np.linalg.norm(T_layered[:3, 3] - T[:3, 3]) < 0.002
    for layered in (False, True):
        T_few, T = near_mover_pair(seed, layered, mover_share=0.3)
        assert np.linalg.norm(T_few[:3, 3] - T[:3, 3]) < 0.002
    # a near object that stands still is one motion with the room: its points are not a layer of their own
    T_still, T = near_mover_pair(seed, True, step=0.0)
    assert np.linalg.norm(T_still[:3, 3] - T[:3, 3]) < 0.002
    # under a rolling shutter (its branch refines the hypotheses under the row skew): the same
    T_wide, T = near_mover_pair(seed, False, readout=0.025)
    assert np.linalg.norm(T_wide[:3, 3] - T[:3, 3]) > 0.02
    T_layered, _ = near_mover_pair(seed, True, readout=0.025)
    assert np.linalg.norm(T_layered[:3, 3] - T[:3, 3]) < 0.004


@pytest.mark.slow  # 320x240, 20 frames: ~3 s; the fast suite has the pair case above
def test_stream_that_starts_with_a_close_mover_over_half_the_view():
    """The default sequence, seed 906 (where it was found), first 20 frames: a rigid mover 1 m away covers 43-50 %
    of the view from the first frame. Its first pair, with no mask yet, followed the mover (48 mm off, and the
    next pairs too as their masks came from it: ATE 37 mm, IoU 0.68); the layered judgment: ~1 mm, IoU 0.99."""
    from dynrecon_ros.evaluation import mask_metrics
    seq, ok, ate = _scenario_run('default', 906, 20)
    assert seq.masks[0].mean() > 0.45  # the condition: the mover over half the first view
    assert len(ok) == 20
    assert ate < 0.003, ate
    assert mask_metrics({r.key: r.mask > 0 for r in ok}, dict(zip(seq.keys, seq.masks)))['iou'] > 0.9


def test_point_depth_cuts_the_depth_noise_and_keeps_edges_and_holes():
    """The older frame's 3D points under a rolling shutter: the readings smoothed in inverse depth (slope_depth,
    the default) or their 5 x 5 median (point_depth, with backend.refine_slope_sigmas 0): on a wall 3 m away with
    Kinect-like noise (sigma(z) ~ 13 mm) the readings' noise is cut ~3x without a bias; a depth edge (a person
    1.5 m in front) and the holes stay as read; a global-shutter predictor uses the readings as they are."""
    from dynrecon_ros.predictors.depth_smoothing import point_depth, slope_depth
    from dynrecon_ros.segmentation import SegmentationConfig
    c = SegmentationConfig()
    rng = np.random.default_rng(0)
    true = np.full((120, 160), 3.0, np.float32)
    true[:, 80:] = 1.5
    sigma = np.float32(c.depth_sigma_a + c.depth_sigma_b * (true - 0.4) ** 2)
    depth = true + rng.normal(0, 1, true.shape).astype(np.float32) * sigma
    depth[40:44, 20:24] = 0
    median = point_depth(depth, c.depth_sigma_a, c.depth_sigma_b)
    smoothed = slope_depth(depth, 3 * c.depth_sigma_b)
    inner = np.zeros(true.shape, bool)
    inner[5:115, 5:70] = True
    inner[36:48, 16:28] = False  # away from the hole
    for out in (median, smoothed):
        assert np.std(out[inner] - true[inner]) < 0.45 * np.std(depth[inner] - true[inner])
        assert abs(np.mean(out[inner] - true[inner])) < 0.001
        assert (out[40:44, 20:24] == 0).all()
        assert (np.abs(out[:, 76:84] - true[:, 76:84]) < 0.5).all()  # no pixel took the other side's depth (1.5 m off)
    gs = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig()))
    rs = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig(rolling_shutter_s=0.025)))
    rs_median = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig(rolling_shutter_s=0.025,
                                                                            refine_slope_sigmas=0.0)))
    from types import SimpleNamespace
    frame = SimpleNamespace(depth=depth)
    assert np.array_equal(gs._point_depth(frame, {}), depth)
    assert np.array_equal(rs._point_depth(frame, {}), smoothed)
    assert np.array_equal(rs_median._point_depth(frame, {}), median)


class _FlowOnRows:
    """A PairFlow whose forward flow is valid only on image rows [r0, r1) (as where the rest is occluded)."""

    def __init__(self, flow, r0: int, r1: int):
        self.fwd, self._flow, self._rows = flow.fwd, flow, (r0, r1)

    def valid_fwd_on_grid(self, st: int) -> np.ndarray:
        v = self._flow.valid_fwd_on_grid(st)
        r = np.arange(v.shape[0])[:, None] * st
        return v & (r >= self._rows[0]) & (r < self._rows[1])


def test_long_pair_is_dropped_when_its_inliers_cannot_pin_the_translation():
    """A long pair (refined from the tracked poses) whose valid flow is left on a thin band of far wall (as
    near a close person in close_crossing and every_effect) refines ~80 mm away from a start 6 mm off:
    translation and rotation look alike there. It is dropped (no pose); the same pair with its whole flow is
    kept and accurate."""
    s = render_sequence(SyntheticConfig(width=160, height=120, frames=11, movers=0, seed=3))
    a, b = s.frames[0], s.frames[10]
    flow = FlowCache(FlowConfig()).get(a.key, a.rgb, b.key, b.rgb)
    T_gt = np.linalg.inv(s.poses[0]) @ s.poses[10]
    init = T_gt.copy()
    init[:3, 3] += [0.004, -0.003, 0.003]
    band = _FlowOnRows(flow, 15, 27)  # 4 grid rows of the far wall, ~5 m away
    pred = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig()))
    T_full, _, _ = pred.relative_pose(a, b, flow, init=init)
    assert np.linalg.norm(T_full[:3, 3] - T_gt[:3, 3]) < 0.008
    T_band, inl, n = pred.relative_pose(a, b, band, init=init)
    assert n > 150 and T_band is None and not inl.any()
    # the case is meaningful: kept, the band's pose would be far off
    never = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig(long_pair_max_sigma_m=np.inf,
                                                                         long_pair_max_move_m=np.inf)))
    T_kept, _, _ = never.relative_pose(a, b, band, init=init)
    assert np.linalg.norm(T_kept[:3, 3] - T_gt[:3, 3]) > 0.03
    # the second test alone drops it too: its refinement moves it > long_pair_max_move_m off the prediction
    moved = RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig(long_pair_max_sigma_m=np.inf)))
    T_moved, inl, _ = moved.relative_pose(a, b, band, init=init)
    assert T_moved is None and not inl.any()
    assert np.linalg.norm(T_kept[:3, 3] - init[:3, 3]) > BackendConfig().long_pair_max_move_m
    # and it keeps the pairs whose refinement stays near the prediction (the whole flow)
    assert moved.relative_pose(a, b, flow, init=init)[0] is not None


def test_translation_sigma_is_the_rigid_fits_translation_uncertainty():
    """translation_sigma's moment sums equal its definition: the 6x6 information sum_k J_k^T W_k J_k of a left
    increment (t, omega), J_k = [I, -[X_k]x], the translation's covariance its inverse's top-left block; a far
    thin band pins the translation far worse than a room's depth spread."""
    from dynrecon_ros.geometry import translation_sigma
    K = np.array([[260.0, 0, 160], [0, 250.0, 120], [0, 0, 1]])
    rng = np.random.default_rng(4)

    def by_definition(P, sigma_px=0.5, sigma_rel=0.01):
        H = np.zeros((6, 6))
        for X in P:
            J = np.hstack([np.eye(3), -np.array([[0, -X[2], X[1]], [X[2], 0, -X[0]], [-X[1], X[0], 0]])])
            W = np.diag([(K[0, 0] / (sigma_px * X[2])) ** 2, (K[1, 1] / (sigma_px * X[2])) ** 2,
                         1 / (sigma_rel * X[2]) ** 2])
            H += J.T @ W @ J
        return np.sqrt(np.linalg.eigvalsh(np.linalg.inv(H)[:3, :3]).max())

    room = np.c_[rng.uniform(-2, 2, (400, 2)), rng.uniform(1, 5, 400)]
    band = np.c_[rng.uniform(-2, 2, 80), rng.uniform(-1.5, -1.4, 80), rng.uniform(4.5, 5.0, 80)]
    for P in (room, band, room[:3]):
        assert translation_sigma(P, K) == pytest.approx(by_definition(P), rel=1e-9)
    assert translation_sigma(band, K) > 20 * translation_sigma(room, K)
    assert translation_sigma(room[:2], K) == np.inf


def test_long_pairs_that_agree_against_the_adjacent_pair_are_kept():
    """The long pairs' move test drops a long pair that moves the newest frame more than long_pair_max_move_m from
    where the adjacent pair put it (a thin band of far wall refines far off). But when two long pairs move it to the
    same place, the adjacent pair is the one off (every_effect seed 882: one adjacent pair 22 mm off under the
    rolling shutter, every long pair of the next frames dropped, 29 mm ATE; 16 mm with this rule): they are kept.
    A lone far pair is still dropped, and a pair near the adjacent one's pose kept. A lone far pair that spans a
    frame whose adjacent pair had no mask prior (a stream's first pair) is kept too, unless its own older frame's
    pose rests on such a pair (``backend.startup_long_pairs``)."""
    from types import SimpleNamespace
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.rgbd_step import RGBDStep

    def entry(x, index=0):
        pose = np.eye(4)
        pose[0, 3] = x
        return SimpleNamespace(pose=pose, index=index)

    def pair_to(old, x_new):  # the pair's T_old_new that puts the newest frame at x_new
        return np.linalg.inv(old.pose) @ entry(x_new).pose

    step = SimpleNamespace(cfg=ReconConfig(), _unmasked={})
    step._skips_unmasked = lambda old: RGBDStep._skips_unmasked(step, old)
    assert step.cfg.backend.long_pair_max_move_m == 0.015
    prev, old1, old2 = entry(0.0, 2), entry(-0.05, 1), entry(-0.10, 0)
    new = entry(0.0, 3)
    pairs = [(prev, new), (old1, new), (old2, new)]
    inl = np.ones((2, 2), bool)

    def run(x_adjacent, x1, x2):
        rel = [(pair_to(prev, x_adjacent), inl, 4), (pair_to(old1, x1), inl, 4), (pair_to(old2, x2), inl, 4)]
        return [r[0] is not None for r in RGBDStep._long_pair_moves(step, pairs, rel)[0]]

    assert run(0.030, 0.010, 0.012) == [True, True, True]  # 20 / 18 mm off the adjacent pair, 2 mm apart: kept
    assert run(0.030, 0.010, -0.020) == [True, False, False]  # each far and alone: dropped
    assert run(0.030, 0.025, -0.020) == [True, True, False]  # 5 mm off the adjacent pair: kept; the other dropped
    assert run(0.030, 0.010, 0.000) == [True, False, False]  # both far, 10 mm apart (over half the limit): dropped
    step._unmasked = {2: 1}  # the previous frame's adjacent pair had no mask prior: both long pairs span it
    assert run(0.030, 0.010, -0.020) == [True, True, True]
    step._unmasked = {1: 0}  # old1's own pose rests on such a pair: only old2's pair spans one
    assert run(0.030, 0.010, -0.020) == [True, False, True]
    step.cfg.backend.startup_long_pairs = False
    assert run(0.030, 0.010, -0.020) == [True, False, False]


@pytest.mark.slow  # 640x480, 12 frames, twice: ~10 s
def test_a_stream_that_starts_among_slow_people_is_corrected_by_its_first_long_pairs():
    """walking_people seed 1866 (found on never-run seeds): three people 2-3 m away walk slowly (under a pixel a
    frame at 320 wide) before a wall 5 m away, over 22 % of the first view. The stream's first pair, with no mask
    yet, cannot tell them from the camera's motion: every hypothesis lands 20-30 mm off (the wall alone leaves the
    translation free), 12 mm after the refinement, and the next pair, with the first frame's near-empty mask, 6 mm.
    The long pair 0 -> 2, where the people moved twice as far, came out 2 mm off but was dropped as a lone pair
    far from the chain, and the whole trajectory stayed 25 mm off frame 0 (ATE 3.2 mm over 90 frames). Now a lone
    long pair that spans a frame whose adjacent pair had no mask prior is kept, and those pairs are verified again
    where the alignment puts them."""
    from dynrecon_ros.data.scenarios import scenario_config
    seq = render_sequence(scenario_config('walking_people', seed=1866, frames=12))
    assert seq.masks[0].mean() > 0.2  # the condition: people over a fifth of the first view

    def last_error(on: bool) -> float:
        _, ok, _ = _scenario_run('walking_people', 1866, 12, seq=seq, startup_long_pairs=on)
        assert len(ok) == 12
        est = np.linalg.inv(ok[0].pose) @ ok[-1].pose
        true = np.linalg.inv(seq.poses[0]) @ seq.poses[11]
        return float(np.linalg.norm(est[:3, 3] - true[:3, 3]))

    assert last_error(False) > 0.015  # the rule's own case: off, the first pairs' error stays
    assert last_error(True) < 0.003


def _rule_effect(seq, monkeypatch, rule: str, off, perturb, where=None) -> tuple[float, float]:
    """(mm off, mm on): frame 10's final pose error (relative to frame 0) over the first 14 frames of ``seq`` with
    the pair poses changed by ``perturb(fi, fj, init, T, inliers, n) -> (T, inliers)`` (or ``(T, inliers, n)``), with
    the step's module constant ``rule`` (or that attribute of ``where``) set to ``off`` and at its default."""
    from dynrecon_ros import rgbd_step
    where = rgbd_step if where is None else where
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.reconstructor import Reconstructor
    frames, target = seq.frames[:14], 10
    orig = RGBDPredictor.relative_pose

    def changed(self, fi, fj, flow, static=None, init=None, move_gate=True):
        T, inl, n = orig(self, fi, fj, flow, static, init=init, move_gate=move_gate)
        if T is not None:
            T, inl, *rest = perturb(fi, fj, init, T, inl, n)
            n = rest[0] if rest else n
        return T, inl, n

    def error(value):
        monkeypatch.setattr(where, rule, value)
        rec = Reconstructor(ReconConfig())
        out = [r for f in frames for r in rec.push(f)] + rec.flush()
        P = {r.key: r.pose for r in out if r.status == 'ok'}
        est = np.linalg.inv(P[frames[0].key]) @ P[frames[target].key]
        true = np.linalg.inv(seq.poses[0]) @ seq.poses[target]
        return 1000 * np.linalg.norm(est[:3, 3] - true[:3, 3])

    monkeypatch.setattr(RGBDPredictor, 'relative_pose', changed)
    default = getattr(where, rule)
    return error(off), error(default)


def _adjacent_pushed(seq):
    """A ``perturb`` for :func:`_rule_effect`: the adjacent pair 9 -> 10, when fitted from scratch, pushed 40 mm."""
    k9, k10 = seq.frames[9].key, seq.frames[10].key

    def push(fi, fj, init, T, inl, n):
        if init is None and (fi.key, fj.key) == (k9, k10):
            T = T.copy()
            T[:3, 3] += [0.04, 0.0, 0.0]
        return T, inl
    return push


def test_a_long_pair_that_fails_at_an_off_adjacent_pose_is_fitted_from_scratch(seq, monkeypatch):
    """A long pair is verified at the pose the adjacent pair gives the newest frame. When that pair is off (here pushed
    40 mm; close_crossing seed 905: 12 mm beside a close person) nothing verifies there, and before, every long pair was
    lost and the frame kept the adjacent pair's error. A long pair with enough correspondences is now fitted from
    scratch; the two long pairs agree, so the move test keeps them, and the window alignment brings the frame back."""
    without, with_ = _rule_effect(seq, monkeypatch, 'FALLBACK_MIN', np.inf, _adjacent_pushed(seq))
    assert without > 25.0, without  # the push stays: every long pair failed at the pushed start
    assert with_ < 0.3 * without, (with_, without)


def test_an_adjacent_pair_the_agreeing_long_pairs_contradict_is_verified_again(seq, monkeypatch):
    """When long pairs agree on where the newest frame is and the adjacent pair put it far from there (here pushed
    40 mm; default seed 1191: 40 mm, a mover partly outside the mask), the adjacent pair is verified and refined
    again from the long pairs' pose. Before, it stayed in the alignment at its error, as heavy as any long pair."""
    from dynrecon_ros.rgbd_step import RGBDStep
    without, with_ = _rule_effect(seq, monkeypatch, '_refit_adjacent', lambda *a: None, _adjacent_pushed(seq), RGBDStep)
    assert without > 3.0, without  # the case is meaningful: the long pairs alone leave the frame ~6 mm off
    assert with_ < 0.3 * without, (with_, without)  # ~0.4 mm


def test_a_long_pair_with_few_inliers_is_dropped(seq, monkeypatch):
    """A long pair that verifies only a few of its correspondences (a keyframe that barely overlaps: close_crossing
    seed 906, 117 of 1006, refined 16 mm off) would weigh in the alignment like a good pair and pull the frame; under
    LONG_PAIR_MIN_INLIERS of its verified correspondences it is dropped. Here one long pair is pushed 12 mm (inside
    the move test's 15 mm) with a tenth of its inliers kept."""
    k0, k10 = seq.frames[0].key, seq.frames[10].key

    def thin_long_pair(fi, fj, init, T, inl, n):
        if init is not None and (fi.key, fj.key) == (k0, k10):
            T = T.copy()
            T[:3, 3] += [0.012, 0.0, 0.0]
            ys, xs = np.nonzero(inl)
            inl = np.zeros_like(inl)
            keep = max(1, int(0.1 * n))
            inl[ys[:keep], xs[:keep]] = True
        return T, inl

    from dynrecon_ros import rgbd_step
    monkeypatch.setattr(rgbd_step, 'LONG_PAIR_MIN_SHARE', 0.0)  # this rule alone (its tenth is also under that share)
    kept, dropped = _rule_effect(seq, monkeypatch, 'LONG_PAIR_MIN_INLIERS', 0.0, thin_long_pair)
    assert kept > 2.0 * dropped, (kept, dropped)


def test_a_long_pair_with_few_inliers_beside_the_adjacent_pairs_is_dropped(seq, monkeypatch):
    """A long pair whose inliers are under LONG_PAIR_MIN_SHARE of the adjacent pair's is dropped, even when they are
    most of its own correspondences: the alignment takes as many points of it as of the adjacent pair, so it would weigh
    as much on a fraction of the evidence (every_effect seed 1321: 182 inliers against 4211, 16 mm off, pulled two
    frames 6 and 15 mm). Here the long pair 0 -> 10 is pushed 12 mm (inside the move test's 15 mm) and keeps a tenth of
    the adjacent pair's inlier count, half of the correspondences it reports (LONG_PAIR_MIN_INLIERS does not fire)."""
    k0, k9, k10 = seq.frames[0].key, seq.frames[9].key, seq.frames[10].key
    adjacent = {}

    def weak_long_pair(fi, fj, init, T, inl, n):
        if init is None and (fi.key, fj.key) == (k9, k10):
            adjacent['inliers'] = int(inl.sum())
        if init is not None and (fi.key, fj.key) == (k0, k10):
            T = T.copy()
            T[:3, 3] += [0.012, 0.0, 0.0]
            keep = max(1, adjacent['inliers'] // 10)
            ys, xs = np.nonzero(inl)
            inl = np.zeros_like(inl)
            inl[ys[:keep], xs[:keep]] = True
            return T, inl, 2 * keep
        return T, inl

    kept, dropped = _rule_effect(seq, monkeypatch, 'LONG_PAIR_MIN_SHARE', 0.0, weak_long_pair)
    assert adjacent['inliers'] > 200, adjacent  # the case is meaningful: the kept pair has tens of inliers
    assert kept > 2.0 * dropped, (kept, dropped)


def test_static_prior_leaves_a_band_around_the_mask():
    """A pair's pose uses the older frame's pixels outside its mask and a band of PRIOR_MARGIN of the width around it
    (3 px at 320, 6 px at 640); no mask: no prior; an empty mask: every pixel."""
    from dynrecon_ros.rgbd_step import static_prior
    for w, band in ((320, 3), (640, 6)):
        h = w * 3 // 4
        yy, xx = np.mgrid[:h, :w]
        r = np.hypot(xx - w / 2, yy - h / 2)
        mask = r < w / 8
        prior = static_prior(mask)
        assert not prior[mask].any()
        assert not prior[(r >= w / 8) & (r < w / 8 + band - 0.5)].any()  # the band is left out
        assert prior[r > w / 8 + band + 1].all()  # the rest is used
    assert static_prior(None) is None
    assert static_prior(np.zeros((240, 320), bool)).all()


@pytest.mark.slow  # every_effect at 320x240, 90 frames rendered once and run twice: ~45 s
def test_a_person_whose_mask_stops_short_of_its_border_does_not_pull_the_poses(monkeypatch):
    """every_effect seed 1305 (where it was found): a person 2.5 m away before a wall 5 m away, with every sensor
    effect. The newest frame's mask stops 1-10 px short of the person's silhouette; those border pixels, in front of
    the room, were 2-6 % of the adjacent pairs' inliers and pulled them 10-17 mm sideways (ATE 34.6 mm). With the band
    PRIOR_MARGIN left out of every pair's prior the run is 2.4 mm. (A later guard, the pair two frames back when every
    long pair is dropped, RGBDStep._span_pair, also rescues the run without the band: 2.8 mm, and so does the second
    refinement with the trajectory's in-frame motions, backend.shutter_smoothing_frames: 2.5 mm; and the segmenter's
    verdict on a whole surface seen through, segmentation.seen_through_share, whose masks reach the silhouette: 3.8
    mm, and so does the far keyframes' verdict, segmentation.seen_empty_share: 3.0 mm, and the fit points from the
    readings smoothed in inverse depth, backend.refine_slope_sigmas: 2.3 mm; all are off for that run here, so that
    the band's own effect is what is tested.)"""
    from dynrecon_ros import rgbd_step
    from dynrecon_ros.data.scenarios import scenario_config
    seq = render_sequence(scenario_config('every_effect', seed=1305))
    monkeypatch.setattr(rgbd_step, 'PRIOR_MARGIN', 0.0)
    monkeypatch.setattr(rgbd_step.RGBDStep, '_span_pair', lambda self, *a: None)
    _, _, without = _scenario_run('every_effect', 1305, len(seq.frames), seq, shutter_smoothing_frames=0,
                                  refine_slope_sigmas=0.0,
                                  segmentation={'seen_through_share': 0.0, 'seen_empty_share': 0.0})
    monkeypatch.undo()
    _, ok, with_ = _scenario_run('every_effect', 1305, len(seq.frames), seq)
    assert len(ok) == len(seq.frames)
    assert without > 0.015, without  # the case is meaningful: the border pulls the run off
    assert with_ < 0.005, with_


def test_pixels_whose_flow_the_segmenter_found_wrong_stay_out_of_the_pose(seq, monkeypatch):
    """The segmenter's ``flow_mismatch`` (a flow match to scenery shown elsewhere, or to a point the other frame
    hides) is no motion, but no correspondence either: a pair's pose prior leaves those pixels of its older frame
    out (default seeds: ATE 0.92 mm with them out, 1.02 when the pose used them)."""
    from dynrecon_ros import segmentation as S
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.reconstructor import Reconstructor
    h, w = seq.frames[0].depth.shape
    block = np.zeros((h, w), bool)
    block[20:60, 20:80] = True  # on the static wall, away from the mover
    orig_segment, orig_pose = S.MotionSegmenter.segment, RGBDPredictor.relative_pose

    def segment(self, keys, *a, **k):
        out = orig_segment(self, keys, *a, **k)
        self.flow_mismatch = {key: block for key in keys}
        return out

    priors = []

    def relative_pose(self, fi, fj, flow, static=None, **k):
        priors.append(static)
        return orig_pose(self, fi, fj, flow, static, **k)

    monkeypatch.setattr(S.MotionSegmenter, 'segment', segment)
    monkeypatch.setattr(RGBDPredictor, 'relative_pose', relative_pose)
    rec = Reconstructor(ReconConfig())
    for f in seq.frames[:6]:
        rec.push(f)
    seen = [p for p in priors if p is not None]
    assert len(seen) >= 4
    for p in seen:
        assert not p[block].any() and p[~block].mean() > 0.5
