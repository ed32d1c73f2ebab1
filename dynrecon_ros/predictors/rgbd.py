"""RGB-D pair predictor: no weights, metric.

Points come from depth and intrinsics. The pose of j in i comes from dense correspondences (DIS flow
i->j, forward-backward consistent, depth valid on both ends, taken on a pixel grid of stride
``stride``) by RANSAC over 3-point Umeyama/Kabsch fits, then a direct photometric + depth
refinement on the inliers; moving objects are a minority and end up outliers (under a rolling shutter
the hypotheses are refined with the pair's row skew and judged at the flow's noise scale, so that a
close mover cannot join the background's consensus: :func:`ransac_rigid`). Per-frame data
(grey, gradients, grid points) is computed once per frame and shared by its pairs.
Confidence is 1 + a positive score where depth is valid and the flow is consistent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.geometry import (fit_rigid, fit_similarity, pixel_grid, se3_increment, to_matrix, transform_points,
                                   unproject)
from dynrecon_ros.photometric import exposure_gain
from dynrecon_ros.predictors.base import PairPrediction, PairPredictor
from dynrecon_ros.predictors.row_skew import local_fits, shutter_reprojection_errors
from dynrecon_ros.rolling_shutter import PairShutter, ShutterModel

if TYPE_CHECKING:
    from dynrecon_ros.config import BackendConfig


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
    rolling_shutter_s: float  # row readout time (0 = global shutter); see rolling_shutter.py
    depth_delay_s: float  # depth image taken this long after the colour one

    @classmethod
    def from_backend(cls, backend: BackendConfig) -> 'RGBDPredictorConfig':
        """The fields of ``backend`` (a :class:`dynrecon_ros.config.BackendConfig`) with these names."""
        return cls(**{f.name: getattr(backend, f.name) for f in dataclasses.fields(cls)})


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


def _msac(epx: np.ndarray, ez: np.ndarray, px_threshold: float, rel_depth_threshold: float) -> np.ndarray:
    """MSAC cost per point (same shape as epx, ez): (epx / px_threshold)^2 for an inlier (both errors under
    their thresholds), 1 otherwise; its sum prefers the tightest consensus over a mere count."""
    return np.where((epx < px_threshold) & (ez < rel_depth_threshold), (epx / px_threshold) ** 2, 1.0)


def ransac_rigid(P: np.ndarray, Q: np.ndarray, uv: np.ndarray, K: np.ndarray, iterations: int,
                 px_threshold: float, rel_depth_threshold: float, rng: np.random.Generator,
                 refine: int = 3, min_px_threshold: float = 0.3, rows_s: np.ndarray | None = None,
                 base_px_threshold: float = 0.75,
                 top: int = 8) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """Robust rigid fit P ≈ T Q over (N, 3) correspondences (uv: (N, 2) pixel of Q in j, K: j's).

    3-point Kabsch hypotheses scored by inlier count (reprojection < px_threshold and relative depth
    error < rel_depth_threshold), then weighted Umeyama refits on the inliers (weights 1/z^2, the
    information of a point with a fixed pixel error) while the pixel threshold shrinks to 3 robust
    sigmas of the inliers. Returns (T (4, 4), inlier (N,) bool, final pixel threshold, row skew (3,)
    or None).

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
        # candidates: the best by the wide score and the best by a global-shutter threshold (hypotheses from
        # background-only samples rank low by the wide score, below those the mover joins)
        tight = _msac(epx, ez, base_px_threshold, rel_depth_threshold)
        ranked = np.stack([np.argsort(cost.sum(1), kind='stable'), np.argsort(tight.sum(1), kind='stable')], 1)
        _, first = np.unique(ranked.reshape(-1), return_index=True)
        b = ranked.reshape(-1)[np.sort(first)][:top]
        T, skew, e, ez, med, count = local_fits(to_matrix(R[b], t[b]), P, Q, uv, K, rows_s, px_threshold,
                                                rel_depth_threshold, refine + 1, min_px_threshold)
        # the noise scale from the fits that kept a consensus (not a handful of points that happen to agree)
        scale = 2.0 * med[count >= max(6, count.max() // 4)].min()
        k = int(np.argmin(_msac(e, ez, scale, rel_depth_threshold).sum(1)))
        thr = float(np.clip(3.0 * 1.4826 * med[k], min_px_threshold, px_threshold))
        return T[k], (e[k] < thr) & (ez[k] < rel_depth_threshold), thr, skew[k]
    best = int(np.argmin(cost.sum(1)))
    inl = (epx[best] < px_threshold) & (ez[best] < rel_depth_threshold)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R[best], t[best]
    thr = px_threshold
    w = 1.0 / np.maximum(P[:, 2], 0.1) ** 2
    for _ in range(refine):
        if inl.sum() < 3:
            break
        T = fit_rigid(Q[inl], P[inl], w[inl])
        epx, ez = reprojection_errors(T[None, :3, :3], T[None, :3, 3], P, Q, uv, K)
        epx, ez = epx[0], ez[0]
        thr = float(np.clip(3.0 * 1.4826 * np.median(epx[inl]), min_px_threshold, thr))
        inl = (epx < thr) & (ez < rel_depth_threshold)
    return T, inl, thr, None


_PREPARED = '_rgbd_prepared'  # a frame's attribute: the per-frame data stage A derived for the pose step


class _FrameCache:
    """Per-frame images the predictor derives once and reuses across pairs (small, LRU by identity).

    Each frame is in several pairs (its neighbour, the keyframe anchors); grey levels, gradients
    and the stack sampled by the direct refinement are computed once per frame, not once per pair.
    """

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
        self._cache = _FrameCache()
        self.shutter = ShutterModel(self.cfg.rolling_shutter_s, self.cfg.depth_delay_s)

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
        d['stack'] = _sampling_stack(d['gray'], *d['grad'], frame.depth)
        d['valid_depth'] = self._valid_depth_of(frame.depth)
        st = max(1, self.cfg.stride)
        d[('pts', st)] = _grid_points(frame.depth, frame.K, st, self.cfg.min_depth_m, self.cfg.max_depth_m)
        frame.__dict__[_PREPARED] = d

    def _valid_depth_of(self, z: np.ndarray) -> np.ndarray:
        return np.where((z > self.cfg.min_depth_m) & (z < self.cfg.max_depth_m), z, np.nan).astype(np.float32)

    def _sample_stack(self, frame) -> np.ndarray:
        """(H, W, 6) float32 [grey, d grey/dx, d grey/dy, depth, d depth/dx, d depth/dy] of a frame,
        sampled in one remap per iteration by :func:`photometric_refine` (cached per frame)."""
        d = self._frame_data(frame)
        if 'stack' not in d:
            gx, gy = d['grad']
            d['stack'] = _sampling_stack(d['gray'], gx, gy, frame.depth)
        return d['stack']

    def _valid_depth(self, frame) -> np.ndarray:
        """(H, W) float32 depth, NaN outside [min_depth_m, max_depth_m] (cached per frame)."""
        d = self._frame_data(frame)
        if 'valid_depth' not in d:
            d['valid_depth'] = self._valid_depth_of(frame.depth)
        return d['valid_depth']

    def _grid(self, frame, st: int) -> np.ndarray:
        d = self._frame_data(frame)
        key = ('pts', st)
        if key not in d:
            d[key] = _grid_points(frame.depth, frame.K, st, self.cfg.min_depth_m, self.cfg.max_depth_m)
        return d[key]

    def relative_pose(self, frame_i, frame_j, flow, static_i: np.ndarray | None = None,
                      init: np.ndarray | None = None):
        """(T_i_j (4,4), inliers_i (H,W) bool, n verified correspondences) from flow + depth, or (None, ...).

        Correspondences are taken on the pixel grid of stride ``cfg.stride`` (RANSAC samples, the
        verification and the inliers; every pixel's flow is there, a denser set only costs time).
        ``init``: a predicted T_i_j (e.g. from already tracked poses); RANSAC is then skipped and the
        prediction only verified and refined (cheaper, used for the long pairs to keyframes).
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
        rows_s = self.shutter.row_offsets((sel // gw) * st, h) if self.shutter.readout > 0 else None

        def errors(T):
            if skew is not None:  # the rolling-shutter fit's residuals (ransac_rigid)
                return shutter_reprojection_errors(T, skew, rows_s, P_s.astype(np.float64), Q_s.astype(np.float64),
                                                   uv_s.astype(np.float64), K_j)
            epx, ez = reprojection_errors(T[None, :3, :3], T[None, :3, 3], P_s, Q_s, uv_s, K_j)
            return epx[0], ez[0]

        if init is None:
            sub = cand if len(cand) <= c.ransac_samples else self.rng.choice(cand, c.ransac_samples, replace=False)
            T, inl, thr, skew = ransac_rigid(P_s[sub].astype(np.float64), Q_s[sub].astype(np.float64), uv_s[sub], K_j,
                                             c.ransac_iterations, self._px_threshold(K_j), c.ransac_depth_threshold,
                                             self.rng, c.ransac_refits, c.min_px_threshold,
                                             None if rows_s is None else rows_s[sub], c.ransac_px_threshold)
            n_fit = inl.sum()
            epx, ez = errors(T)
        else:
            # verify the prediction on all candidates; the count is scaled to a RANSAC sample's
            T, thr = np.asarray(init, dtype=np.float64), self._px_threshold(K_j)
            epx, ez = errors(T)
            fit = (epx[cand] < thr) & (ez[cand] < c.ransac_depth_threshold)
            n_fit = fit.sum() * min(1.0, c.ransac_samples / len(cand))
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
            use = keep & (epx < thr) & (ez < c.ransac_depth_threshold)
            idx = np.flatnonzero(use)
            if len(idx) < c.min_inliers:
                break
            if len(idx) > c.ransac_samples * 4:
                idx = self.rng.choice(idx, c.ransac_samples * 4, replace=False)
            T = fit_rigid(Q_s[idx].astype(np.float64), P_s[idx].astype(np.float64), wz[idx])
            epx, ez = errors(T)
            thr = float(np.clip(3.0 * 1.4826 * np.median(epx[use]), c.min_px_threshold, thr))
        inl_sel = keep & (epx < max(thr, 2 * c.min_px_threshold)) & (ez < c.ransac_depth_threshold)
        if c.photometric_iterations > 0:
            T = self._refine(frame_i, frame_j, sel[inl_sel], P_s[inl_sel], st, T, adjacent=init is None)
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

    def _refine(self, frame_i, frame_j, grid_idx, pts, st, T, adjacent: bool = True):
        """Direct photometric + depth refinement on textured static inlier pixels of i.

        grid_idx: (n,) flat indices of the inliers on i's stride-``st`` grid; pts: (n, 3) their points.
        adjacent: the pair of j with its previous frame (under a rolling shutter j's velocity is then
        taken from it and kept for j's other pairs).
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
            shutter = self._pair_shutter(frame_i, frame_j, rows, adjacent)
        T = photometric_refine(gray_i, pts[cand], None, frame_j.depth, frame_j.K, T, c.photometric_iterations,
                               stack=self._sample_stack(frame_j), shutter=shutter)
        if shutter is not None:  # the frames' fitted twists, for their later pairs
            if adjacent:
                self._frame_data(frame_j)['twist'] = shutter.twist_j
            if self._frame_data(frame_i).get('twist') is None:
                self._frame_data(frame_i)['twist'] = shutter.twist_i
        return T

    def frame_twist(self, frame) -> np.ndarray | None:
        """(6 shutter_order,) in-frame motion of ``frame`` fitted by the rolling-shutter refinement (the first
        6: its body twist; :func:`~dynrecon_ros.rolling_shutter.motion_offsets`), or None."""
        return self._frame_data(frame).get('twist') if self.shutter.active else None

    def _pair_shutter(self, frame_i, frame_j, rows: np.ndarray, adjacent: bool) -> PairShutter:
        """The pair's rolling shutter, with the frames' twists fitted in their earlier pairs (j's only
        from the adjacent pair: the other pairs of j come after it). A depth delay alone keeps a constant
        twist (order 1): the colour rows share one instant and the rate over 10 ms is hardly seen
        (close_crossing seed 102: 2.57 mm ATE with order 2, 2.11 before)."""
        tw_i = self._frame_data(frame_i).get('twist')
        tw_j = None if adjacent else self._frame_data(frame_j).get('twist')
        return PairShutter(self.shutter, rows, frame_i.depth.shape[0], frame_j.K, frame_j.stamp - frame_i.stamp,
                           tw_i, tw_j, order=self.shutter_order if self.shutter.readout > 0 else 1)

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


def _sampling_stack(gray: np.ndarray, gx: np.ndarray, gy: np.ndarray, depth: np.ndarray):
    """Two (H, W, 4) float32 stacks [grey, d/dx, d/dy, 0] and [depth, d/dx, d/dy, 0] of an image j for
    :func:`photometric_refine` (intensity gradients per pixel, Scharr / 32; OpenCV remaps up to 4
    channels with exact float coordinates, more channels are quantised to 1/32 pixel: hence two)."""
    dj = depth.astype(np.float32)
    dgx = cv2.Sobel(dj, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    dgy = cv2.Sobel(dj, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    zero = np.zeros_like(dj)  # a 4th channel: OpenCV's 4-channel remap is vectorised, 2x faster than 3
    return np.dstack([gray, gx, gy, zero]), np.dstack([dj, dgx, dgy, zero])


def _gram(Jw: np.ndarray, J: np.ndarray) -> np.ndarray:
    """Jw^T J of (n, k) arrays. Beyond 6 columns in blocks of rows: OpenBLAS threads a product of
    more than 2^18 multiply-adds, which on a busy 2-core machine costs 50 ms instead of 0.6."""
    if J.shape[1] <= 6:
        return Jw.T @ J
    b = 800 if J.shape[1] <= 18 else max(16, (1 << 18) // J.shape[1] ** 2)  # under OpenBLAS's threading threshold
    return sum(Jw[k:k + b].T @ J[k:k + b] for k in range(0, len(J), b))


def photometric_refine(gray_i: np.ndarray, pts_i: np.ndarray, gray_j: np.ndarray | None, depth_j: np.ndarray,
                       K_j: np.ndarray, T_i_j: np.ndarray, iterations: int = 6, sigma_intensity: float = 4.0,
                       sigma_depth_rel: float = 0.01, huber: float = 1.5, stack=None,
                       shutter: PairShutter | None = None) -> np.ndarray:
    """Direct RGB-D refinement of T_i_j (pose of j in i) on selected pixels of i.

    Minimises, over a left increment of T_j_i, the robust sum of photometric residuals
    I_j(pi(T_j_i X)) - I_i(p) / sigma_intensity and depth residuals (D_j(pi(..)) - z) /
    (sigma_depth_rel z) (the hybrid term of dense RGB-D odometry, Kerl et al. / Open3D). Flow-based
    poses are limited by the flow's sub-pixel bias; direct alignment on the raw intensities removes it.

    Args:
        gray_i: (n,) float32 intensities of the selected pixels of i; pts_i: (n, 3) their points.
        gray_j: (H, W) float32 image j; depth_j: (H, W) float32 metres (0 invalid); K_j (3, 3).
        stack: optional precomputed :func:`_sampling_stack` of j (then gray_j may be None).
        shutter: rolling shutter / depth delay (:class:`~dynrecon_ros.rolling_shutter.PairShutter`):
            the points are moved by the camera's motion between the frames' instants and their rows'
            (colour for the photometric term, depth for the depth term), and the two frames' twists
            are refined with the pose (their Jacobian columns are the shutter's).
    Returns the refined (4, 4) T_i_j.
    """
    if stack is None:
        gj = gray_j.astype(np.float32)
        stack = _sampling_stack(gj, cv2.Scharr(gj, cv2.CV_32F, 1, 0) / 32.0,
                                cv2.Scharr(gj, cv2.CV_32F, 0, 1) / 32.0, depth_j)
    s_int, s_dep = stack
    h, w = s_int.shape[:2]
    fx, fy, cx, cy = K_j[0, 0], K_j[1, 1], K_j[0, 2], K_j[1, 2]
    T_j_i = np.linalg.inv(T_i_j)
    X = pts_i.astype(np.float64)
    gi = np.asarray(gray_i, dtype=np.float64)
    if shutter is not None:
        shutter.start(T_i_j)
    for _ in range(iterations):
        if shutter is None:
            Y = Yd = X @ T_j_i[:3, :3].T + T_j_i[:3, 3]
        else:  # colour and depth seen at their rows' instants (the depth image's may be later)
            Y, Yd = shutter.points(X, T_j_i)
        Z = Y[:, 2]
        u = fx * Y[:, 0] / Z + cx
        v = fy * Y[:, 1] / Z + cy
        ok = (Z > 0.05) & (u >= 1) & (u <= w - 2) & (v >= 1) & (v <= h - 2)
        if ok.sum() < 50:
            break
        if shutter is not None:  # rows seen at their own instants, the frames' twists fitted too
            xi = _shutter_step(shutter, Y, Yd, ok, gi, (s_int, s_dep), (fx, fy, cx, cy), sigma_intensity,
                               sigma_depth_rel, huber)
        else:
            # every sample projects inside j in the usual case: then no boolean selection (copies)
            Yo, uo, vo, gio = (Y, u, v, gi) if ok.all() else (Y[ok], u[ok], v[ok], gi[ok])
            # one row of sample positions: OpenCV then runs the remap on one thread (splitting a few
            # thousand samples over threads costs more than it saves, a lot more on a busy machine)
            m = np.empty((1, len(uo), 2), np.float32)
            m[0, :, 0], m[0, :, 1] = uo, vo
            # (4, k) float64 rows [value, d/du, d/dv, 0], contiguous
            Ij, Gx, Gy, _ = cv2.remap(s_int, m, None, cv2.INTER_LINEAR)[0].T.astype(np.float64, order='C')
            Dj, DGx, DGy, _ = cv2.remap(s_dep, m, None, cv2.INTER_LINEAR)[0].T.astype(np.float64, order='C')
            # one gain for the pair: auto-exposure changes between frames would bias the pose otherwise
            gain = exposure_gain(Ij, gio)
            H, g = _normal_equations(Yo, (Ij, Gx, Gy), (Dj, DGx, DGy), gain * gio, fx, fy, sigma_intensity,
                                     sigma_depth_rel, huber)
            xi = -np.linalg.solve(H + 1e-9 * np.eye(6), g)
        T_j_i = se3_increment(xi) @ T_j_i
        if np.abs(xi).max() < 5e-6:  # converged: steps of a few micrometres / microradians
            break
    return np.linalg.inv(T_j_i)


def _shutter_step(shutter: PairShutter, Y: np.ndarray, Yd: np.ndarray, ok: np.ndarray, gi: np.ndarray, stack,
                  K: tuple, sigma_intensity: float, sigma_depth_rel: float, huber: float) -> np.ndarray:
    """One Gauss-Newton step of :func:`photometric_refine` under a rolling shutter / depth delay: returns
    the pose increment xi (6,) and moves ``shutter.nu`` (the frames' twists) by theirs.

    Y, Yd: (n, 3) i's points in the cameras of j's colour / depth rows (:meth:`PairShutter.points`);
    ok: (n,) bool those projecting inside j; gi: (n,) i's intensities; stack: j's two sampling stacks;
    K: (fx, fy, cx, cy) of j. The residuals are :func:`_normal_equations`'s; the depth rows are sampled
    where the depth camera sees the point; the twists' columns and prior come from the shutter.
    """
    s_int, s_dep = stack
    fx, fy, cx, cy = K
    Yo = Y[ok]
    Ydo = Yo if Yd is Y else Yd[ok]

    def pix(P):  # (k, 3) -> (1, k, 2) float32 sample positions in j
        iz = 1.0 / P[:, 2]
        return np.stack([fx * P[:, 0] * iz + cx, fy * P[:, 1] * iz + cy], -1).astype(np.float32)[None]

    m = pix(Yo)
    Ij, Gx, Gy = cv2.remap(s_int, m, None, cv2.INTER_LINEAR)[0, :, :3].astype(np.float64).T
    Dj, DGx, DGy = cv2.remap(s_dep, m if Yd is Y else pix(Ydo), None, cv2.INTER_LINEAR)[0, :, :3].astype(np.float64).T

    def jac(a0, a1, a2, P):  # (k,) x 3 d/dY at points P (k, 3) -> (k, 6) d/dxi
        x, y, z = P.T
        return np.stack([a0, a1, a2, y * a2 - z * a1, z * a0 - x * a2, x * a1 - y * a0], 1)

    def dpix(gu, gv, P):  # d/dY of g(u, v) at points P given its image gradient (gu, gv)
        x, y, iz = P[:, 0], P[:, 1], 1.0 / P[:, 2]
        return gu * fx * iz, gv * fy * iz, -(gu * fx * x + gv * fy * y) * iz * iz

    gain = exposure_gain(Ij, gi[ok])
    Jp = jac(*dpix(Gx, Gy, Yo), Yo) / sigma_intensity
    rp = (Ij - gain * gi[ok]) / sigma_intensity
    Zd = Ydo[:, 2]
    dok = (Dj > 0) & (np.abs(DGx) + np.abs(DGy) < 0.05 * Zd)  # no depth residual across edges
    a0, a1, a2 = dpix(DGx, DGy, Ydo)
    sd = sigma_depth_rel * Zd
    Jd = jac(a0, a1, a2 - 1.0, Ydo)[dok] / sd[dok, None]
    rd = (Dj - Zd)[dok] / sd[dok]
    Jp = np.hstack([Jp, shutter.columns(np.stack(dpix(Gx, Gy, Yo), 1), ok) / sigma_intensity])
    Jd = np.hstack([Jd, shutter.columns(np.stack([a0, a1, a2 - 1.0], 1)[dok], np.flatnonzero(ok)[dok],
                                        depth=True) / sd[dok, None]])
    J = np.concatenate([Jp, Jd])
    r = np.concatenate([rp, rd])
    a = np.abs(r)
    wgt = np.where(a < huber, 1.0, huber / np.maximum(a, 1e-12))
    Jw = J * wgt[:, None]
    H = _gram(Jw, J) + 1e-9 * np.eye(J.shape[1])
    g = Jw.T @ r
    Hp, gp = shutter.normal_prior()
    H[6:, 6:] += Hp
    g[6:] += gp
    if len(H) > 18:  # Jacobi scaling: the rate terms' columns are s^2 / 2 ~ 1e-4 times the pose's
        d = 1.0 / np.sqrt(np.diag(H))
        step = -d * np.linalg.solve(H * d[:, None] * d[None], g * d)
    else:  # a constant twist per frame: the solve as before
        step = -np.linalg.solve(H, g)
    shutter.nu = shutter.nu + step[6:]
    return step[:6]


def _normal_equations(Y: np.ndarray, intensity, depth, ref_i: np.ndarray, fx: float, fy: float,
                      sigma_intensity: float, sigma_depth_rel: float, huber: float):
    """Gauss-Newton system (H (6, 6), g (6,)) of :func:`photometric_refine`'s robust objective at one
    linearisation: a left increment xi = [v, omega] of T_j_i, the step is -H^-1 g.

    Y: (k, 3) float64 i's points in camera j; intensity = (I_j, dI_j/du, dI_j/dv) and depth =
    (D_j, dD_j/du, dD_j/dv), three (k,) float64 each, j sampled at the projections; ref_i: (k,) the
    gain-corrected intensities of i. Rows: a photometric and a depth residual per sample, each divided
    by its sigma; the depth row has weight 0 where j has no depth or a depth edge (sum of |gradient|
    >= 5 % of z). Huber weights. Both kinds go through one (6, 2k) Jacobian (a zero row is cheaper
    than selecting rows): d(u, v)/dY = [[fx/z, 0, -fx x/z^2], [0, fy/z, -fy y/z^2]] and
    dY/dxi = [I, -[Y]x], so a row a = (a0, a1, a2) of d/dY is (a, Y x a) in d/dxi.
    """
    Ij, Gx, Gy = intensity
    Dj, DGx, DGy = depth
    k = len(Y)
    Yt = Y.T  # (3, k)
    z = Yt[2]
    dok = (Dj > 0) & (np.abs(DGx) + np.abs(DGy) < 0.05 * z)  # no depth residual across edges
    sd = np.where(dok, 1.0 / (sigma_depth_rel * z), 0.0)  # inverse sigma of the depth rows, 0 = unused
    x, y, zz = np.concatenate([Yt, Yt], axis=1)  # (2k,) each: photometric rows, then depth rows
    iz = 1.0 / zz
    sc = np.concatenate([np.full(k, 1.0 / sigma_intensity), sd])
    s_iz = sc * iz
    J = np.empty((6, 2 * k))
    a0, a1, a2 = J[0], J[1], J[2]
    np.multiply(np.concatenate([Gx, DGx]), s_iz * fx, out=a0)
    np.multiply(np.concatenate([Gy, DGy]), s_iz * fy, out=a1)
    np.multiply(a0 * x + a1 * y, -iz, out=a2)
    a2[k:] -= sd  # the depth residual D_j(u, v) - z: d(-z)/dY = (0, 0, -1)
    np.subtract(y * a2, zz * a1, out=J[3])
    np.subtract(zz * a0, x * a2, out=J[4])
    np.subtract(x * a1, y * a0, out=J[5])
    r = np.concatenate([Ij - ref_i, np.where(dok, Dj - z, 0.0)]) * sc
    wgt = np.minimum(1.0, huber / np.maximum(np.abs(r), 1e-12))
    Jw = J * wgt
    return Jw @ J.T, Jw @ r
