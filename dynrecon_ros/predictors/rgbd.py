"""RGB-D pair predictor: no weights, metric.

Points come from depth and intrinsics. The pose of j in i comes from dense correspondences (DIS flow
i->j, forward-backward consistent, depth valid on both ends, taken on a pixel grid of stride
``stride``) by RANSAC over 3-point Umeyama/Kabsch fits, then a direct photometric + depth
refinement on the inliers; moving objects are a minority and end up outliers (a correspondence whose
measured depth disagrees with the fit by more than the consensus's own depth noise is one even when its
flow agrees: a camouflaged mover, :func:`depth_gate`; under a rolling shutter the hypotheses are refined with the
pair's row skew and judged at the flow's noise scale, so that a close mover cannot join the background's consensus:
:func:`ransac_rigid`). Per-frame data (grey, gradients, grid points) is computed once per frame and shared by its
pairs. The direct refinement is :mod:`dynrecon_ros.predictors.direct_refinement`. A long pair (verified and
refined from a predicted pose) gives no pose when its inliers cannot pin its translation (:func:`translation_sigma`
> ``long_pair_max_sigma_m``) or when its refinement moves it more than ``long_pair_max_move_m`` from that prediction
(``move_gate``; the RGB-D window step applies that test itself, keeping long pairs that agree with each other
against the adjacent pair). Confidence is 1 + a positive score where depth is valid and the flow is consistent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.depth_cue import depth_sigma
from dynrecon_ros.geometry import (fit_rigid, fit_similarity, pixel_grid, to_matrix, transform_points, translation_sigma,
                                   unproject)
from dynrecon_ros.predictors.base import PairPrediction, PairPredictor
from dynrecon_ros.predictors.depth_smoothing import point_depth, slope_depth
from dynrecon_ros.predictors.direct_refinement import _sampling_stack, photometric_refine
from dynrecon_ros.predictors.row_skew import local_fits, shutter_reprojection_errors
from dynrecon_ros.rolling_shutter import PairShutter, ShutterModel

if TYPE_CHECKING:
    from dynrecon_ros.config import BackendConfig
    from dynrecon_ros.segmentation_config import SegmentationConfig


@dataclass
class RGBDPredictorConfig:
    """The RGB-D predictor's settings: the same-named fields of the pipeline's ``backend`` section
    (:class:`dynrecon_ros.config.BackendConfig`, which documents them and holds the defaults); build
    it with :meth:`from_backend`. stride: the fit is verified on every stride-th pixel in x and y
    (inliers are on that grid); halo_fraction: band excluded around motion outliers (fraction of the
    image width); photometric_iterations: direct RGB-D refinement after the flow fit (0 = off);
    min_gradient: grey levels per pixel for pixels used by the refinement."""

    ransac_iterations: int
    ransac_px_threshold: float
    ransac_depth_threshold: float  # relative depth error
    ransac_samples: int
    ransac_refits: int
    ransac_seed: int
    min_px_threshold: float
    min_depth_m: float
    max_depth_m: float
    min_inliers: int
    stride: int
    halo_fraction: float
    photometric_iterations: int
    photometric_samples: int
    min_gradient: float
    refine_slope_sigmas: float  # rolling shutter: fit points and depth slopes smoothed, in depth_sigma_b (0 = off)
    rolling_shutter_s: float  # row readout time (0 = global shutter); see rolling_shutter.py
    depth_delay_s: float  # depth image taken this long after the colour one
    shutter_smoothing_frames: int  # see BackendConfig
    ransac_depth_sigmas: float  # the depth gate's floor, in sigma(z) of the depth noise model (depth_gate)
    long_pair_max_sigma_m: float  # a long pair's largest translation_sigma (m) for a pose
    long_pair_max_move_m: float  # a long pair's largest refinement away from its predicted pose (m)
    depth_sigma_a: float  # the sensor's depth noise model sigma(z) = a + b (z - 0.4)^2 (segmentation's)
    depth_sigma_b: float

    @classmethod
    def from_backend(cls, backend: BackendConfig,
                     segmentation: SegmentationConfig | None = None) -> 'RGBDPredictorConfig':
        """The fields of ``backend`` (a :class:`dynrecon_ros.config.BackendConfig`) with these names; the
        depth noise model (``depth_sigma_a``, ``depth_sigma_b``) from ``segmentation`` (the pipeline's
        :class:`~dynrecon_ros.segmentation.SegmentationConfig`, its one source; None: its defaults)."""
        if segmentation is None:
            from dynrecon_ros.segmentation_config import SegmentationConfig
            segmentation = SegmentationConfig()
        sensor = {'depth_sigma_a': segmentation.depth_sigma_a, 'depth_sigma_b': segmentation.depth_sigma_b}
        return cls(**{f.name: sensor[f.name] if f.name in sensor else getattr(backend, f.name)
                      for f in dataclasses.fields(cls)})


# backend.long_pair_max_sigma_m (default 6 mm): a long pair (the newest frame to an older keyframe, refined from
# the tracked poses) is kept only when its inliers can pin its translation: translation_sigma below it. Near a
# close person the long pairs whose valid flow is left on a thin band of far wall (76-600 inliers in rows 0-60 of
# 240, 4-6 m away, where the person and the baseline invalidate the rest) refine 20-100 mm away from a start 2-24
# mm off, whatever the masks (ground-truth masks of both frames: as far off) or the in-frame motions: translation
# and rotation look alike there, and the window alignment takes every pair's points as exact. close_crossing
# (global shutter) seed 621: pair 40 -> 55, 76 inliers in rows 3-30, refined from 14 mm off to 84 mm off, frame 55
# then 28 mm off; ATE 5.52 -> 2.79 mm with the gate; held-out seeds 630-634 mean 2.39 -> 1.63 mm. The 6 mm was set
# on every_effect (branch scale-gate, where it alone was no clear gain under the rolling shutter: its adjacent
# pairs come out short), not on close_crossing.
# backend.long_pair_max_move_m (default 15 mm): some such pairs pass that test (a few hundred inliers left beside
# the close person) and still refine far from their start: every_effect seed 700, pairs 41 -> 49 / 41 -> 50 (296 /
# 185 inliers) moved 23 / 20 mm from starts 4 / 10 mm off and ended 24 / 30 mm off; over that run's 176 long pairs
# the refinement moves a pair 3.4 mm (median), 6.3 (90 %), 16.4 (99 %) from its start, which the tracked poses
# predict to a few mm (0.5-14 mm off there). The limit is above the tracked poses' error, so a pair whose start
# is off and whose data is good (41 -> 51: 22 mm -> 10 mm off) can be lost too.


def reprojection_errors(R: np.ndarray, t: np.ndarray, P: np.ndarray, Q: np.ndarray, uv: np.ndarray,
                        K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Errors of hypotheses P ≈ R Q + t, R (M, 3, 3), t (M, 3), over (N, 3) points.

    P (points of i) is moved into j (R^T (P - t)) and projected with K (j's intrinsics); returns
    (pixel error to the flow target uv (M, N), relative depth error to Q's depth (M, N)). Pixel space
    makes the test independent of depth (3D errors grow with z^2 for a fixed flow error).
    """
    X = np.matmul((P[None] - t[:, None].astype(P.dtype)).astype(np.float32), R.astype(np.float32))  # (M, N, 3)
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])  # weak: stays float32
    iz = 1.0 / np.maximum(X[..., 2], np.float32(1e-6))
    du = fx * X[..., 0] * iz + cx - uv[:, 0]
    dv = fy * X[..., 1] * iz + cy - uv[:, 1]
    return np.sqrt(du * du + dv * dv), np.abs(X[..., 2] - Q[:, 2]) / Q[:, 2]


def depth_gate(rz: np.ndarray, inl: np.ndarray, floor: float, widest: float = np.inf) -> float:
    """The depth gate of a rigid fit, in units of the sensor's depth noise: 3 robust sigmas (1.4826 x the
    median) of the consensus's normalised depth residuals ``rz`` (N,) over ``inl`` (N,) bool, not below
    ``floor``, not above ``widest``; a correspondence with rz above it is no inlier, whatever its flow.

    Why: a camouflaged mover (a pattern like the background's, fixed in the world, or no texture) has flow
    that fits the camera's motion, but its measured depth moves with it. Within the flat relative gate
    (``ransac_depth_threshold``, 2 %) a mover covering 40-50 % of the view keeps ~1 % of depth residual
    and pulls the 3D fit by 10-30 mm per pair (camouflage_small seed 511, 320x240, frames 6-26); the
    static background's residual is the sensor's noise (Kinect: 3 robust sigmas ~ 4 sigma(z), a gate
    the z^2 model keeps uniform over depth) or, with noise-free depth, far below it: then ``floor``
    (``ransac_depth_sigmas`` x sigma(z)) holds the gate."""
    m = np.median(rz[inl]) if inl.any() else np.inf
    return float(np.clip(3.0 * 1.4826 * m, floor, widest))


def _msac(epx: np.ndarray, ez: np.ndarray, px_threshold: float, rel_depth_threshold: float) -> np.ndarray:
    """MSAC cost per point (same shape as epx, ez): (epx / px_threshold)^2 for an inlier (both errors under
    their thresholds), 1 otherwise; its sum prefers the tightest consensus over a mere count."""
    return np.where((epx < px_threshold) & (ez < rel_depth_threshold), (epx / px_threshold) ** 2, 1.0)


def ransac_rigid(P: np.ndarray, Q: np.ndarray, uv: np.ndarray, K: np.ndarray, iterations: int,
                 px_threshold: float, rel_depth_threshold: float, rng: np.random.Generator,
                 refine: int = 3, min_px_threshold: float = 0.3, rows_s: np.ndarray | None = None,
                 base_px_threshold: float = 0.75, top: int = 8, depth_noise: np.ndarray | None = None,
                 min_depth_sigmas: float = 1.0,
                 layered: bool = False) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None, float]:
    """Robust rigid fit P ≈ T Q over (N, 3) correspondences (uv: (N, 2) pixel of Q in j, K: j's).

    3-point Kabsch hypotheses scored by inlier count (reprojection < px_threshold and relative depth
    error < rel_depth_threshold), then weighted Umeyama refits on the inliers (weights 1/z^2, the
    information of a point with a fixed pixel error) while the pixel threshold shrinks to 3 robust
    sigmas of the inliers. With ``depth_noise`` ((N,) the sensor's sigma(z) / z of Q's depths) the best
    hypothesis's consensus and each refit's are also gated on the relative depth error in those units
    (:func:`depth_gate`, shrinking, not below ``min_depth_sigmas``; the rolling-shutter path below has
    none). Returns (T (4, 4), inlier (N,) bool, final pixel threshold, row skew (3,) or None, the depth
    gate in sigmas (inf: none)). ``layered`` (a pair without a mask prior): every hypothesis is refined, and
    :func:`~dynrecon_ros.predictors.layered_motion.layered_choice` picks the scene's motion among them.

    Under a rolling shutter (``rows_s``: (N,) the points' row instants in s) the global-shutter model
    leaves the background px_threshold (~2 px) of row skew, and within so wide a threshold a close mover
    covering much of the view joins the consensus: over a background metres away a translation of a few
    cm is compensated by a rotation to a fraction of a pixel, so "the camera moved with the mover" keeps
    the background and adds the mover (every_effect, 30 frames, seed 0, 320x240: 40-55 mm off per pair,
    the mover 20-55 % inlier). Then the ``top`` hypotheses (the best by the wide score and by the
    global-shutter base_px_threshold, in turn) are each refined under the pair's row skew
    (:func:`~dynrecon_ros.predictors.row_skew.local_fits`), which leaves the background at the flow's
    noise, and the one that wins is the one with the least MSAC cost at 2 x the smallest median residual
    of their consensus sets (the noise scale): at that scale the background's parallax decides, and the
    mover no longer fits (same case: 2.6-12 mm off in 9 of the first 10 pairs, the mover 0-3 % inlier, 32 mm
    and 8 % in one; the inliers are those within 3 robust sigmas of the winner, ~0.6-0.9 px: the direct
    refinement follows a few % of mover pixels, a 1-2 px band lets them back in). At 160x120 the room's
    parallax over a pair is near the flow's noise and this decides less often (ATE 19.5 -> 17 mm).
    """
    n = len(P)
    idx = rng.integers(0, n, size=(iterations, 3))
    _, R, t = fit_similarity(Q[idx], P[idx], scale=False)  # 3-point Kabsch hypotheses
    epx, ez = reprojection_errors(R, t, P, Q, uv, K)
    # MSAC score: truncated quadratic, prefers the tightest consensus over a mere count
    cost = _msac(epx, ez, px_threshold, rel_depth_threshold)
    if rows_s is not None:
        if layered:  # every hypothesis is a candidate
            b = np.arange(len(R))
        else:
            # candidates: the best by the wide score and the best by a global-shutter threshold (hypotheses from
            # background-only samples rank low by the wide score, below those the mover joins)
            tight = _msac(epx, ez, base_px_threshold, rel_depth_threshold)
            ranked = np.stack([np.argsort(cost.sum(1), kind='stable'), np.argsort(tight.sum(1), kind='stable')], 1)
            _, first = np.unique(ranked.reshape(-1), return_index=True)
            b = ranked.reshape(-1)[np.sort(first)][:top]
        T, skew, e, ez, med, medz, count = local_fits(to_matrix(R[b], t[b]), P, Q, uv, K, rows_s, px_threshold,
                                                      rel_depth_threshold, refine + 1, min_px_threshold)
        if layered:
            from dynrecon_ros.predictors.layered_motion import layered_choice  # (it uses this module's errors)
            k = layered_choice(e, ez, med, medz, count, P[:, 2])
        else:
            # the noise scale from the fits that kept a consensus (not a handful of points that happen to agree);
            # when none kept 6 points (no rigid motion in the correspondences), from the largest, not below the
            # threshold's floor (3 points fit exactly): the caller then finds too few inliers, a failed pair
            kept = count >= max(6, count.max() // 4)
            if kept.any():
                scale = 2.0 * med[kept].min()
            else:
                scale = max(2.0 * med[count == count.max()].min(), min_px_threshold)
            k = int(np.argmin(_msac(e, ez, scale, rel_depth_threshold).sum(1)))
        thr = float(np.clip(3.0 * 1.4826 * med[k], min_px_threshold, px_threshold))
        return T[k], (e[k] < thr) & (ez[k] < rel_depth_threshold), thr, skew[k], np.inf
    best = int(np.argmin(cost.sum(1)))
    T, e0, ez0 = to_matrix(R[best], t[best]), epx[best], ez[best]
    if layered:
        from dynrecon_ros.predictors.layered_motion import layered_hypothesis  # (it uses this module's errors)
        T = layered_hypothesis(to_matrix(R, t), P, Q, uv, K, px_threshold, rel_depth_threshold, refine + 1,
                               min_px_threshold)
        e0, ez0 = (a[0] for a in reprojection_errors(T[None, :3, :3], T[None, :3, 3], P, Q, uv, K))
    inl = (e0 < px_threshold) & (ez0 < rel_depth_threshold)
    thr, zthr = px_threshold, np.inf
    if depth_noise is not None:  # gated before the first fit: a weighted 3D fit follows a mover's depth
        rz = ez0 / depth_noise
        zthr = depth_gate(rz, inl, min_depth_sigmas)
        inl &= rz < zthr
    w = 1.0 / np.maximum(P[:, 2], 0.1) ** 2
    for _ in range(refine):
        if inl.sum() < 3:
            break
        T = fit_rigid(Q[inl], P[inl], w[inl])
        epx, ez = reprojection_errors(T[None, :3, :3], T[None, :3, 3], P, Q, uv, K)
        epx, ez = epx[0], ez[0]
        thr = float(np.clip(3.0 * 1.4826 * np.median(epx[inl]), min_px_threshold, thr))
        if depth_noise is None:
            inl = (epx < thr) & (ez < rel_depth_threshold)
            continue
        rz = ez / depth_noise
        zthr = depth_gate(rz, inl, min_depth_sigmas, zthr)  # from the consensus the fit was made on
        inl = (epx < thr) & (ez < rel_depth_threshold) & (rz < zthr)
    return T, inl, thr, None, zthr


_PREPARED = '_rgbd_prepared'  # a frame's attribute: the per-frame data stage A derived for the pose step


class _FrameCache:
    """Per-frame images the predictor derives once and reuses across pairs (small, LRU by identity): grey levels,
    gradients, the direct refinement's stack, once per frame for its pairs (its neighbour, the keyframe anchors)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: list[tuple[object, dict]] = []

    def get(self, frame) -> dict:
        for k, (f, d) in enumerate(self._items):
            if f is frame:
                if k != len(self._items) - 1:
                    self._items.append(self._items.pop(k))
                return d
        # what stage A derived from the frame (:meth:`RGBDPredictor.prepare_frame`), taken over here
        d = frame.__dict__.pop(_PREPARED, None) or {}
        self._items.append((frame, d))
        if len(self._items) > self.size:
            self._items.pop(0)
        return d


def _grid_points(depth: np.ndarray, K: np.ndarray, st: int, min_depth: float, max_depth: float):
    """Points of the stride-``st`` pixel grid: ((gh, gw, 3) float32 camera points, NaN where the
    depth is outside [min_depth, max_depth])."""
    d = depth[::st, ::st]
    z = np.where((d > min_depth) & (d < max_depth), d, np.nan).astype(np.float32)
    gh, gw = z.shape
    u = (np.arange(gw, dtype=np.float32) * st - np.float32(K[0, 2])) * np.float32(1 / K[0, 0])
    v = (np.arange(gh, dtype=np.float32) * st - np.float32(K[1, 2])) * np.float32(1 / K[1, 1])
    return np.stack([u[None, :] * z, v[:, None] * z, z], axis=-1)


class RGBDPredictor(PairPredictor):
    metric = True
    needs_depth = True
    shutter_order = 2  # terms of each frame's in-frame motion under a rolling shutter (PairShutter's order)

    def __init__(self, config: RGBDPredictorConfig):
        self.cfg = config
        self.rng = np.random.default_rng(self.cfg.ransac_seed)
        self.shutter = ShutterModel(self.cfg.rolling_shutter_s, self.cfg.depth_delay_s)
        # frames after which a frame's pairs are refined again with its smoothed in-frame motion: a rolling shutter
        # only (RGBDStep._smooth_motions; the reconstructor holds results as long); their motions are kept here
        k = self.cfg.shutter_smoothing_frames
        self.smoothing_frames = k if self.shutter.readout > 0 else 0
        self._cache = _FrameCache(8 + self.smoothing_frames)
        # under a rolling shutter: the fit points' and depth slopes' smoothing in inverse depth (1/m; 0 = off)
        slope_sigma = self.cfg.refine_slope_sigmas * self.cfg.depth_sigma_b
        self._slope_sigma = slope_sigma if self.shutter.readout > 0 else 0.0

    def window_step(self, cfg, flows, segmenter, times, device: str):
        """:class:`dynrecon_ros.rgbd_step.RGBDStep` over this predictor."""
        from dynrecon_ros.rgbd_step import RGBDStep
        return RGBDStep(cfg, self, flows, segmenter, times, device)

    def _frame_data(self, frame) -> dict:
        """Cached per-frame data: grey (H, W) float32, gradient magnitude, grid points."""
        return self._derive(self._cache.get(frame), frame)

    @staticmethod
    def _derive(d: dict, frame) -> dict:
        """``d`` with the frame's grey (H, W) float32, gradient magnitude and gradients / 32 filled in."""
        if 'gray' not in d:
            g = cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
            gx = cv2.Scharr(g, cv2.CV_32F, 1, 0)
            gy = cv2.Scharr(g, cv2.CV_32F, 0, 1)
            d['gray'] = g
            d['grad_mag'] = np.abs(gx) + np.abs(gy)
            d['grad'] = (gx / 32.0, gy / 32.0)
        return d

    def prepare_frame(self, frame) -> None:
        """Stage A (:meth:`dynrecon_ros.reconstructor.Reconstructor.prepare`, on the caller's thread while stage
        B works on the previous frame): the per-frame images the pose step derives from a new frame (grey,
        gradients, the refinement's sampling stacks, the valid depth, the grid points), stored on the
        frame; stage B's :meth:`_frame_data` takes them over (the same values, computed off its path)."""
        if frame.depth is None or frame.K is None or _PREPARED in frame.__dict__:
            return
        d = self._derive({}, frame)
        self._stack_in(d, frame)
        d['valid_depth'] = self._valid_depth_of(frame.depth)
        self._points_in(d, frame, max(1, self.cfg.stride))
        frame.__dict__[_PREPARED] = d

    def _smoothed(self, frame, d: dict) -> np.ndarray | None:
        """The frame's readings smoothed in inverse depth (:func:`slope_depth`, made once per frame and kept in
        its data ``d``: the refinement's depth slopes and the fit points), None when ``_slope_sigma`` is 0."""
        if self._slope_sigma > 0 and 'smoothed' not in d:
            d['smoothed'] = slope_depth(frame.depth, self._slope_sigma)
        return d.get('smoothed')

    def _point_depth(self, frame, d: dict) -> np.ndarray:
        """The depth of a frame's fit points (``d``: its data): under a rolling shutter the readings smoothed in
        inverse depth (:meth:`_smoothed`; :func:`point_depth`'s median when ``refine_slope_sigmas`` is 0), else
        as read."""
        if self.shutter.readout <= 0:
            return frame.depth
        if self._slope_sigma > 0:  # as for the refinement's slopes (docs/MEASUREMENTS.md, session 38)
            return self._smoothed(frame, d)
        return point_depth(frame.depth, self.cfg.depth_sigma_a, self.cfg.depth_sigma_b)

    def _stack_in(self, d: dict, frame) -> np.ndarray:
        """The frame's sampling stacks (:func:`_sampling_stack`), made once and kept in its data ``d``."""
        if 'stack' not in d:
            d['stack'] = _sampling_stack(d['gray'], *d['grad'], frame.depth, self._smoothed(frame, d))
        return d['stack']

    def _points_in(self, d: dict, frame, st: int) -> np.ndarray:
        """The frame's stride-``st`` grid points (:func:`_grid_points` of :meth:`_point_depth`), kept in ``d``."""
        key = ('pts', st)
        if key not in d:
            d[key] = _grid_points(self._point_depth(frame, d), frame.K, st, self.cfg.min_depth_m, self.cfg.max_depth_m)
        return d[key]

    def _valid_depth_of(self, z: np.ndarray) -> np.ndarray:
        return np.where((z > self.cfg.min_depth_m) & (z < self.cfg.max_depth_m), z, np.nan).astype(np.float32)

    def _sample_stack(self, frame) -> np.ndarray:
        """(H, W, 6) float32 [grey, d grey/dx, d grey/dy, depth, d depth/dx, d depth/dy] of a frame,
        sampled in one remap per iteration by :func:`photometric_refine` (cached per frame)."""
        return self._stack_in(self._frame_data(frame), frame)

    def _valid_depth(self, frame) -> np.ndarray:
        """(H, W) float32 depth, NaN outside [min_depth_m, max_depth_m] (cached per frame)."""
        d = self._frame_data(frame)
        if 'valid_depth' not in d:
            d['valid_depth'] = self._valid_depth_of(frame.depth)
        return d['valid_depth']

    def _grid(self, frame, st: int) -> np.ndarray:
        return self._points_in(self._frame_data(frame), frame, st)

    def relative_pose(self, frame_i, frame_j, flow, static_i: np.ndarray | None = None,
                      init: np.ndarray | None = None, move_gate: bool | float = True):
        """(T_i_j (4,4), inliers_i (H,W) bool, n verified correspondences) from flow + depth, or (None, ...).

        Correspondences are taken on the pixel grid of stride ``cfg.stride`` (RANSAC samples, the
        verification and the inliers; every pixel's flow is there, a denser set only costs time).
        ``init``: a predicted T_i_j (e.g. from already tracked poses); RANSAC is then skipped and the
        prediction only verified and refined (cheaper, used for the long pairs to keyframes). ``move_gate``:
        with ``init``, no pose when the refinement moves it more than ``long_pair_max_move_m`` (a number: this
        many m instead, the far anchors' pairs; False: the caller tests that,
        :meth:`dynrecon_ros.rgbd_step.RGBDStep._long_pair_moves`).
        """
        c = self.cfg
        h, w = frame_i.depth.shape
        st = max(1, c.stride)
        K_j = frame_j.K
        P = self._grid(frame_i, st)  # (gh, gw, 3)
        gh, gw = P.shape[:2]
        f = flow.fwd[::st, ::st]
        uv = pixel_grid(h, w)[::st, ::st] + f  # (gh, gw, 2) target pixels in j
        dj = self._valid_depth(frame_j)
        zj = cv2.remap(dj, uv, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=float('nan'))
        # reject interpolation across a depth edge: the bilinear value must agree with the nearest one
        zn = cv2.remap(dj, uv, None, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=float('nan'))
        ok = flow.valid_fwd_on_grid(st) & np.isfinite(P[..., 2]) & np.isfinite(zj) & \
            (np.abs(zj - zn) < 0.02 * zj + 0.005)
        sel = np.flatnonzero(ok)  # grid pixels verified against the fit
        P_s = P.reshape(-1, 3)[sel]  # float32: the verification's precision is ample
        uv_s = uv.reshape(-1, 2)[sel]
        z_s = zj.reshape(-1)[sel]
        Q_s = np.stack([(uv_s[:, 0] - np.float32(K_j[0, 2])) * np.float32(1 / K_j[0, 0]) * z_s,
                        (uv_s[:, 1] - np.float32(K_j[1, 2])) * np.float32(1 / K_j[1, 1]) * z_s, z_s], -1)
        static_s = None if static_i is None else static_i[::st, ::st].reshape(-1)[sel]
        cand = np.arange(len(sel)) if static_s is None else np.flatnonzero(static_s)
        if len(cand) < c.min_inliers and static_s is not None:
            cand = np.arange(len(sel))
        empty = np.zeros((h, w), bool)
        if len(cand) < c.min_inliers:
            return None, empty, len(sel)

        skew = None
        # the sensor's depth noise relative to each correspondence's depth in j (depth_gate's unit)
        z64 = z_s.astype(np.float64)
        depth_noise = depth_sigma(z64, c.depth_sigma_a, c.depth_sigma_b) / z64
        rows_s = self.shutter.row_offsets((sel // gw) * st, h) if self.shutter.readout > 0 else None

        def errors(T):
            if skew is not None:  # the rolling-shutter fit's residuals (ransac_rigid)
                return shutter_reprojection_errors(T, skew, rows_s, P_s.astype(np.float64), Q_s.astype(np.float64),
                                                   uv_s.astype(np.float64), K_j)
            epx, ez = reprojection_errors(T[None, :3, :3], T[None, :3, 3], P_s, Q_s, uv_s, K_j)
            return epx[0], ez[0]

        if init is None:
            sub = cand if len(cand) <= c.ransac_samples else self.rng.choice(cand, c.ransac_samples, replace=False)
            T, inl, thr, skew, zthr = ransac_rigid(
                P_s[sub].astype(np.float64), Q_s[sub].astype(np.float64), uv_s[sub], K_j, c.ransac_iterations,
                self._px_threshold(K_j), c.ransac_depth_threshold, self.rng, c.ransac_refits, c.min_px_threshold,
                None if rows_s is None else rows_s[sub], c.ransac_px_threshold, 8, depth_noise[sub],
                c.ransac_depth_sigmas, layered=static_s is None)
            n_fit = inl.sum()
            epx, ez = errors(T)
        else:
            # verify the prediction on all candidates; the count is scaled to a RANSAC sample's
            T, thr = np.asarray(init, dtype=np.float64), self._px_threshold(K_j)
            max_sigma, max_move = c.long_pair_max_sigma_m, c.long_pair_max_move_m  # a long pair's tests (below)
            if not isinstance(move_gate, bool):
                max_move = float(move_gate)
            epx, ez = errors(T)
            fit = (epx[cand] < thr) & (ez[cand] < c.ransac_depth_threshold)
            n_fit = fit.sum() * min(1.0, c.ransac_samples / len(cand))
            zthr = depth_gate(ez[cand] / depth_noise[cand], fit, c.ransac_depth_sigmas)
        if n_fit < c.min_inliers:
            return None, empty, len(sel)
        # flow near moving objects is dragged along with them (a halo a few px wide): exclude a band
        # around the pixels that clearly violate the rigid motion, then refit on what is left
        bad_sel = (epx > 3 * thr) | (ez > 3 * c.ransac_depth_threshold)
        bad = np.zeros(gh * gw, np.uint8)
        bad[sel[bad_sel]] = 1
        bad = cv2.morphologyEx(bad.reshape(gh, gw), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        halo = max(1, int(round(c.halo_fraction * w / st)))
        excl = cv2.dilate(bad, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * halo + 1, 2 * halo + 1))) > 0
        keep = ~excl.reshape(-1)[sel]
        if static_s is not None:
            keep_s = keep & static_s
            if keep_s.sum() >= c.min_inliers:
                keep = keep_s
        wz = 1.0 / np.maximum(P_s[:, 2].astype(np.float64), 0.1) ** 2 if c.photometric_iterations <= 0 else None
        # refits on the flow (skipped when the direct refinement follows: it supersedes them)
        # (and under a rolling shutter: ransac_rigid's fits under the row skew did them)
        for _ in range(0 if c.photometric_iterations > 0 or skew is not None else 2):
            use = keep & (epx < thr) & (ez < c.ransac_depth_threshold) & (ez < zthr * depth_noise)
            idx = np.flatnonzero(use)
            if len(idx) < c.min_inliers:
                break
            if len(idx) > c.ransac_samples * 4:
                idx = self.rng.choice(idx, c.ransac_samples * 4, replace=False)
            T = fit_rigid(Q_s[idx].astype(np.float64), P_s[idx].astype(np.float64), wz[idx])
            epx, ez = errors(T)
            thr = float(np.clip(3.0 * 1.4826 * np.median(epx[use]), c.min_px_threshold, thr))
        inl_sel = keep & (epx < max(thr, 2 * c.min_px_threshold)) & (ez < c.ransac_depth_threshold) & \
            (ez < zthr * depth_noise)
        if init is not None and translation_sigma(P_s[inl_sel], K_j) > max_sigma:
            return None, empty, len(sel)  # a long pair whose inliers cannot pin its translation
        if c.photometric_iterations > 0:
            T = self._refine(frame_i, frame_j, sel[inl_sel], P_s[inl_sel], st, T, adjacent=init is None)
            if init is not None and move_gate and np.linalg.norm(T[:3, 3] - init[:3, 3]) > max_move:
                return None, empty, len(sel)  # a long pair its own data pulled far off the tracked poses
        g = np.zeros(gh * gw, bool)
        g[sel[inl_sel]] = True
        inliers = np.zeros((h, w), bool)
        inliers[::st, ::st] = g.reshape(gh, gw)
        return T, inliers, len(sel)  # n = verified pixels (grid), the base of inlier ratios

    def _px_threshold(self, K_j: np.ndarray) -> float:
        """The flow fit's pixel threshold: ``ransac_px_threshold``, widened under a rolling shutter to the
        rows' distortion a global-shutter fit leaves on the static background (readout x 0.3 rad/s, the
        two frames' angular rates differing like a hand-held camera's, x fx: 2 px at 320x240 and 25 ms;
        the refits then shrink it to 3 robust sigmas). On every_effect seeds 101 / 102 / 202 / 303 / 104
        ATE 3.57 / 4.21 / 3.66 / 5.04 / 5.65 -> 3.30 / 4.26 / 2.56 / 3.48 / 5.57 mm (with the global-shutter
        flow fit of then; now it is the starting threshold of ransac_rigid's fits under the row skew)."""
        thr = self.cfg.ransac_px_threshold
        if self.shutter.readout > 0:
            thr = max(thr, self.shutter.readout * 0.3 * float(K_j[0, 0]))
        return thr

    def _refine(self, frame_i, frame_j, grid_idx, pts, st, T, adjacent: bool = True, held: bool = False):
        """Direct photometric + depth refinement on textured static inlier pixels of i.

        grid_idx: (n,) flat indices of the inliers on i's stride-``st`` grid; pts: (n, 3) their points.
        adjacent: the pair of j with its previous frame (under a rolling shutter j's velocity is then
        taken from it and kept for j's other pairs). held: both frames' in-frame motions as set by
        :meth:`set_frame_motion` (:meth:`refine_held`; no fitted twist is kept).
        """
        c = self.cfg
        di = self._frame_data(frame_i)
        gm = di['grad_mag'][::st, ::st].reshape(-1)[grid_idx]
        cand = np.flatnonzero(gm > 32.0 * c.min_gradient)
        if len(cand) < c.min_inliers:
            return T
        if len(cand) > c.photometric_samples:
            cand = self.rng.choice(cand, c.photometric_samples, replace=False)
        gray_i = di['gray'][::st, ::st].reshape(-1)[grid_idx[cand]]
        shutter = None
        if self.shutter.active:
            rows = (grid_idx[cand] // di['gray'][::st, ::st].shape[1]) * st
            shutter = self._pair_shutter(frame_i, frame_j, rows, adjacent, held)
        T = photometric_refine(gray_i, pts[cand], None, frame_j.depth, frame_j.K, T, c.photometric_iterations,
                               stack=self._sample_stack(frame_j), shutter=shutter)
        if shutter is not None and not held:  # the frames' fitted twists, for their later pairs
            if adjacent:
                self._frame_data(frame_j)['twist'] = shutter.twist_j
            if self._frame_data(frame_i).get('twist') is None:
                self._frame_data(frame_i)['twist'] = shutter.twist_i
        return T

    def frame_twist(self, frame) -> np.ndarray | None:
        """(6 shutter_order,) in-frame motion of ``frame`` fitted by the rolling-shutter refinement (the first
        6: its body twist; :func:`~dynrecon_ros.rolling_shutter.motion_offsets`), or None."""
        return self._frame_data(frame).get('twist') if self.shutter.active else None

    def _pair_shutter(self, frame_i, frame_j, rows: np.ndarray, adjacent: bool, held: bool = False) -> PairShutter:
        """The pair's rolling shutter, with the frames' twists fitted in their earlier pairs (j's only
        from the adjacent pair: the other pairs of j come after it), or ``held`` at :meth:`set_frame_motion`'s.
        A depth delay alone keeps a constant twist (order 1): the colour rows share one instant and the rate
        over 10 ms is hardly seen (close_crossing seed 102: 2.57 mm ATE with order 2, 2.11 before)."""
        if held:
            return PairShutter(self.shutter, rows, frame_i.depth.shape[0], frame_j.K, frame_j.stamp - frame_i.stamp,
                               order=self.shutter_order, held_i=self._frame_data(frame_i)['held'],
                               held_j=self._frame_data(frame_j)['held'])
        tw_i = self._frame_data(frame_i).get('twist')
        tw_j = None if adjacent else self._frame_data(frame_j).get('twist')
        vel_i = vel_j = None
        if not adjacent:  # a long pair: the frames' velocities from the aligned trajectory (set_frame_velocity)
            vel_i, vel_j = self._frame_data(frame_i).get('velocity'), self._frame_data(frame_j).get('velocity')
        return PairShutter(self.shutter, rows, frame_i.depth.shape[0], frame_j.K, frame_j.stamp - frame_i.stamp,
                           tw_i, tw_j, order=self.shutter_order if self.shutter.readout > 0 else 1,
                           velocity_i=vel_i, velocity_j=vel_j)

    def set_frame_motion(self, frame, motion: np.ndarray, spread: np.ndarray) -> None:
        """``frame``'s whole in-frame motion ((6 shutter_order,) and its (6 shutter_order,) spreads), known from
        the smoothed trajectory (:meth:`dynrecon_ros.rgbd_step.RGBDStep._smooth_motions`) for :meth:`refine_held`."""
        self._frame_data(frame)['held'] = (np.asarray(motion, dtype=np.float64), np.asarray(spread, dtype=np.float64))

    def has_frame_motion(self, frame) -> bool:
        return 'held' in self._frame_data(frame)

    def refine_held(self, frame_i, frame_j, T: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        """The pair's pose T_i_j (4, 4) refined again on its inliers ((H, W) bool of i, on the stride grid) with
        both frames' in-frame motions held at :meth:`set_frame_motion`'s -> (4, 4)."""
        st = max(1, self.cfg.stride)
        grid_idx = np.flatnonzero(inliers[::st, ::st])
        pts = self._grid(frame_i, st).reshape(-1, 3)[grid_idx]
        return self._refine(frame_i, frame_j, grid_idx, pts, st, np.asarray(T, dtype=np.float64), adjacent=False,
                            held=True)

    def forget(self, frame) -> None:
        """Drop ``frame``'s cached per-frame data (a frame no later pair uses: a tracked one)."""
        self._cache._items = [it for it in self._cache._items if it[0] is not frame]

    def set_frame_velocity(self, frame, v: np.ndarray, sigma: float) -> None:
        """The camera's velocity at ``frame``'s instant, (3,) m/s in its own axes, known to ``sigma`` m/s from the
        aligned trajectory (:func:`~dynrecon_ros.rolling_shutter.trajectory_velocity`): the frame's later long
        pairs start their rolling-shutter model's in-frame velocity there and hold it within ``sigma``
        (:class:`~dynrecon_ros.rolling_shutter.PairShutter`'s velocity_i / velocity_j). No effect without a
        rolling shutter or a depth delay (no model)."""
        self._frame_data(frame)['velocity'] = (np.asarray(v, dtype=np.float64), float(sigma))

    def predict(self, frame_i, frame_j, flow, static_i: np.ndarray | None = None) -> PairPrediction:
        T, inliers, _ = self.relative_pose(frame_i, frame_j, flow, static_i)
        pts_i = unproject(frame_i.depth, frame_i.K)
        pts_j = unproject(frame_j.depth, frame_j.K)
        Tij = T if T is not None else np.eye(4)
        conf_i = 1.0 + 2.0 * (np.isfinite(pts_i[..., 2]) & flow.valid_fwd) + 2.0 * inliers
        conf_j = 1.0 + 2.0 * (np.isfinite(pts_j[..., 2]) & flow.valid_bwd)
        if T is None:
            conf_j[:] = 1.0
        return PairPrediction(pts_i=pts_i, pts_j_in_i=transform_points(Tij, pts_j).astype(np.float32),
                              conf_i=conf_i.astype(np.float32), conf_j=conf_j.astype(np.float32),
                              T_i_j=T, inliers_i=inliers, metric=True)
