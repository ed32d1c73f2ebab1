"""RGB-D pair predictor: no weights, metric.

Points come from depth and intrinsics. The pose of j in i comes from dense correspondences (DIS flow
i->j, forward-backward consistent, depth valid on both ends) by RANSAC over 3-point Umeyama/Kabsch
fits, then a weighted refit on the inliers; moving objects are a minority and end up outliers.
Confidence is 1 + a positive score where depth is valid and the flow is consistent.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dynrecon_ros.flow import pixel_grid
from dynrecon_ros.predictors.base import PairPrediction, PairPredictor


@dataclass
class RGBDPredictorConfig:
    ransac_iterations: int = 64
    ransac_px_threshold: float = 0.75
    ransac_depth_threshold: float = 0.02  # relative depth error
    ransac_samples: int = 1500
    refine_iterations: int = 4
    min_px_threshold: float = 0.3
    min_depth_m: float = 0.1
    max_depth_m: float = 10.0
    min_inliers: int = 60
    halo_fraction: float = 0.03  # band excluded around motion outliers, fraction of image width
    seed: int = 0


def unproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H, W) metres + (3, 3) -> (H, W, 3) float32 camera-frame points (NaN where depth invalid)."""
    h, w = depth.shape
    g = pixel_grid(h, w)
    z = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan).astype(np.float32)
    x = (g[..., 0] - K[0, 2]) / K[0, 0] * z
    y = (g[..., 1] - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, z], axis=-1)


def transform(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) transform to (..., 3) points."""
    return pts @ T[:3, :3].T.astype(pts.dtype) + T[:3, 3].astype(pts.dtype)


def umeyama(P: np.ndarray, Q: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Rigid (4, 4) T minimising sum w |P - (R Q + t)|^2, P, Q (N, 3) (Kabsch/Umeyama, no scale)."""
    if w is None:
        w = np.ones(len(P))
    w = w / w.sum()
    mp, mq = w @ P, w @ Q
    C = ((P - mp) * w[:, None]).T @ (Q - mq)
    U, _, Vt = np.linalg.svd(C)
    S = np.eye(3)
    S[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ S @ Vt
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = mp - R @ mq
    return T


def batched_kabsch(P: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P, Q (M, n, 3) -> R (M, 3, 3), t (M, 3) with P ≈ R Q + t for each of M hypotheses."""
    mp, mq = P.mean(1, keepdims=True), Q.mean(1, keepdims=True)
    C = np.einsum('mni,mnj->mij', P - mp, Q - mq)
    U, _, Vt = np.linalg.svd(C)
    d = np.sign(np.linalg.det(U @ Vt))
    U[:, :, 2] *= d[:, None]
    R = U @ Vt
    t = mp[:, 0] - np.einsum('mij,mj->mi', R, mq[:, 0])
    return R, t


def reprojection_errors(R: np.ndarray, t: np.ndarray, P: np.ndarray, Q: np.ndarray, uv: np.ndarray,
                        K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Errors of hypotheses P ≈ R Q + t, R (M, 3, 3), t (M, 3), over (N, 3) points.

    P (points of i) is moved into j (R^T (P - t)) and projected with K (j's intrinsics); returns
    (pixel error to the flow target uv (M, N), relative depth error to Q's depth (M, N)). Pixel space
    makes the test independent of depth (3D errors grow with z^2 for a fixed flow error).
    """
    X = np.matmul((P[None] - t[:, None]).astype(np.float32), R.astype(np.float32))  # (M, N, 3)
    z = np.maximum(X[..., 2], 1e-6)
    du = K[0, 0] * X[..., 0] / z + K[0, 2] - uv[:, 0]
    dv = K[1, 1] * X[..., 1] / z + K[1, 2] - uv[:, 1]
    return np.sqrt(du * du + dv * dv), np.abs(z - Q[:, 2]) / Q[:, 2]


def ransac_rigid(P: np.ndarray, Q: np.ndarray, uv: np.ndarray, K: np.ndarray, iterations: int,
                 px_threshold: float, rel_depth_threshold: float, rng: np.random.Generator,
                 refine: int = 3, min_px_threshold: float = 0.3) -> tuple[np.ndarray, np.ndarray, float]:
    """Robust rigid fit P ≈ T Q over (N, 3) correspondences (uv: (N, 2) pixel of Q in j, K: j's).

    3-point Kabsch hypotheses scored by inlier count (reprojection < px_threshold and relative depth
    error < rel_depth_threshold), then weighted Umeyama refits on the inliers (weights 1/z^2, the
    information of a point with a fixed pixel error) while the pixel threshold shrinks to 3 robust
    sigmas of the inliers. Returns (T (4, 4), inlier (N,) bool, final pixel threshold).
    """
    n = len(P)
    idx = rng.integers(0, n, size=(iterations, 3))
    R, t = batched_kabsch(P[idx], Q[idx])
    epx, ez = reprojection_errors(R, t, P, Q, uv, K)
    # MSAC score: truncated quadratic, prefers the tightest consensus over a mere count
    cost = np.where((epx < px_threshold) & (ez < rel_depth_threshold), (epx / px_threshold) ** 2, 1.0)
    best = int(np.argmin(cost.sum(1)))
    inl = (epx[best] < px_threshold) & (ez[best] < rel_depth_threshold)
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R[best], t[best]
    thr = px_threshold
    w = 1.0 / np.maximum(P[:, 2], 0.1) ** 2
    for _ in range(refine):
        if inl.sum() < 3:
            break
        T = umeyama(P[inl], Q[inl], w[inl])
        epx, ez = reprojection_errors(T[None, :3, :3], T[None, :3, 3], P, Q, uv, K)
        epx, ez = epx[0], ez[0]
        thr = float(np.clip(3.0 * 1.4826 * np.median(epx[inl]), min_px_threshold, thr))
        inl = (epx < thr) & (ez < rel_depth_threshold)
    return T, inl, thr


def correspondences(depth_i: np.ndarray, K_i: np.ndarray, depth_j: np.ndarray, K_j: np.ndarray,
                    flow_ij: np.ndarray, valid_ij: np.ndarray,
                    min_depth: float = 0.1, max_depth: float = 10.0):
    """Dense correspondences i->j: (pts_i (H,W,3), pts_j (H,W,3) in j's frame, ok (H,W) bool).

    pts_j is j's depth sampled (nearest of the bilinear neighbourhood rejected at depth edges) at
    p + flow(p). ok = flow consistent, both depths valid.
    """
    h, w = depth_i.shape
    g = pixel_grid(h, w) + flow_ij
    dj = np.where((depth_j > min_depth) & (depth_j < max_depth), depth_j, np.nan).astype(np.float32)
    zj = cv2.remap(dj, g[..., 0], g[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=float('nan'))
    # reject interpolation across a depth edge: the bilinear value must agree with the nearest one
    zn = cv2.remap(dj, g[..., 0], g[..., 1], cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=float('nan'))
    pts_i = unproject(np.where((depth_i > min_depth) & (depth_i < max_depth), depth_i, np.nan), K_i)
    x = (g[..., 0] - K_j[0, 2]) / K_j[0, 0] * zj
    y = (g[..., 1] - K_j[1, 2]) / K_j[1, 1] * zj
    pts_j = np.stack([x, y, zj], axis=-1)
    ok = valid_ij & np.isfinite(pts_i[..., 2]) & np.isfinite(zj) & (np.abs(zj - zn) < 0.02 * zj + 0.005)
    return pts_i, pts_j, ok


class RGBDPredictor(PairPredictor):
    metric = True
    needs_depth = True

    def __init__(self, config: RGBDPredictorConfig | None = None):
        self.cfg = config or RGBDPredictorConfig()
        self.rng = np.random.default_rng(self.cfg.seed)

    def relative_pose(self, frame_i, frame_j, flow, static_i: np.ndarray | None = None):
        """(T_i_j (4,4), inliers_i (H,W) bool, n_correspondences) from flow + depth, or (None, ...)."""
        c = self.cfg
        pts_i, pts_j, ok = correspondences(frame_i.depth, frame_i.K, frame_j.depth, frame_j.K,
                                           flow.fwd, flow.valid_fwd, c.min_depth_m, c.max_depth_m)
        cand = ok if static_i is None else ok & static_i
        if cand.sum() < c.min_inliers and static_i is not None:
            cand = ok
        flat = np.flatnonzero(cand)
        if len(flat) < c.min_inliers:
            return None, np.zeros(ok.shape, bool), len(flat)
        sub = flat if len(flat) <= c.ransac_samples else self.rng.choice(flat, c.ransac_samples, replace=False)
        h, w = ok.shape
        uv_all = (pixel_grid(h, w) + flow.fwd).reshape(-1, 2)
        P_all, Q_all = pts_i.reshape(-1, 3), pts_j.reshape(-1, 3)
        T, inl, thr = ransac_rigid(P_all[sub].astype(np.float64), Q_all[sub].astype(np.float64), uv_all[sub],
                                   frame_j.K, c.ransac_iterations, c.ransac_px_threshold,
                                   c.ransac_depth_threshold, self.rng, c.refine_iterations, c.min_px_threshold)
        if inl.sum() < c.min_inliers:
            return None, np.zeros(ok.shape, bool), len(flat)
        sel = np.flatnonzero(ok)

        def errors(T):
            epx, ez = reprojection_errors(T[None, :3, :3], T[None, :3, 3], P_all[sel], Q_all[sel],
                                          uv_all[sel], frame_j.K)
            return epx[0], ez[0]

        # flow near moving objects is dragged along with them (a halo a few px wide): exclude a band
        # around the pixels that clearly violate the rigid motion, then refit on what is left
        epx, ez = errors(T)
        bad_sel = (epx > 3 * thr) | (ez > 3 * c.ransac_depth_threshold)
        bad = np.zeros(h * w, np.uint8)
        bad[sel[bad_sel]] = 1
        bad = cv2.morphologyEx(bad.reshape(h, w), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        halo = max(1, int(round(c.halo_fraction * w)))
        excl = cv2.dilate(bad, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * halo + 1, 2 * halo + 1))) > 0
        keep = ~excl.reshape(-1)[sel]
        if static_i is not None:
            keep_s = keep & static_i.reshape(-1)[sel]
            if keep_s.sum() >= c.min_inliers:
                keep = keep_s
        wz = 1.0 / np.maximum(P_all[sel, 2], 0.1) ** 2
        for _ in range(2):
            use = keep & (epx < thr) & (ez < c.ransac_depth_threshold)
            idx = np.flatnonzero(use)
            if len(idx) < c.min_inliers:
                break
            if len(idx) > c.ransac_samples * 4:
                idx = self.rng.choice(idx, c.ransac_samples * 4, replace=False)
            T = umeyama(P_all[sel[idx]].astype(np.float64), Q_all[sel[idx]].astype(np.float64), wz[idx])
            epx, ez = errors(T)
            thr = float(np.clip(3.0 * 1.4826 * np.median(epx[use]), c.min_px_threshold, thr))
        inl_sel = keep & (epx < max(thr, 2 * c.min_px_threshold)) & (ez < c.ransac_depth_threshold)
        inliers = np.zeros(h * w, bool)
        inliers[sel[inl_sel]] = True
        return T, inliers.reshape(h, w), len(flat)

    def predict(self, frame_i, frame_j, flow, static_i: np.ndarray | None = None) -> PairPrediction:
        T, inliers, _ = self.relative_pose(frame_i, frame_j, flow, static_i)
        pts_i = unproject(frame_i.depth, frame_i.K)
        pts_j = unproject(frame_j.depth, frame_j.K)
        Tij = T if T is not None else np.eye(4)
        conf_i = 1.0 + 2.0 * (np.isfinite(pts_i[..., 2]) & flow.valid_fwd) + 2.0 * inliers
        conf_j = 1.0 + 2.0 * (np.isfinite(pts_j[..., 2]) & flow.valid_bwd)
        if T is None:
            conf_j[:] = 1.0
        return PairPrediction(pts_i=pts_i, pts_j_in_i=transform(Tij, pts_j).astype(np.float32),
                              conf_i=conf_i.astype(np.float32), conf_j=conf_j.astype(np.float32),
                              T_i_j=T, inliers_i=inliers, metric=True)
