"""The flow RANSAC's fits under a rolling shutter's row skew (:func:`dynrecon_ros.predictors.rgbd.ransac_rigid`).

Two rolling-shutter frames of a pair see each row from cameras that moved within the readout; to first
order, and for the far points that pin the rotation, the pair's flow is the global-shutter motion's
plus a rotation that grows linearly with the row's instant s by the difference of the two frames'
angular rates (the row skew; hand tremor: a few tenths of a rad/s, 1-2 px over a 25 ms readout at
320x240). The pose refinement models each frame's in-frame motion in full
(:mod:`dynrecon_ros.rolling_shutter`); the RANSAC only needs the skew, so that its hypotheses can be
judged at the flow's noise rather than at the ~2 px the skew leaves a global-shutter model.

Written by hand: OpenCV's solvers (solvePnPRansac, estimateAffine3D) fit global-shutter motions only,
and these fits are batched over the hypotheses (numpy's per-call overhead dominates at this size).
"""
from __future__ import annotations

import warnings

import numpy as np

from dynrecon_ros.geometry import se3_increment


def _cross(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """w (..., 3) x X (..., N, 3) -> (..., N, 3) (np.cross costs several times more on arrays this small)."""
    w = w[..., None, :]
    x, y, z = X[..., 0], X[..., 1], X[..., 2]
    return np.stack([w[..., 1] * z - w[..., 2] * y, w[..., 2] * x - w[..., 0] * z,
                     w[..., 0] * y - w[..., 1] * x], -1)


def inlier_median(e: np.ndarray, inl: np.ndarray) -> np.ndarray:
    """(k,) median of each row of e (k, N) over its inliers inl (k, N) (inf where a row has none)."""
    with warnings.catch_warnings():  # numpy warns on the rows without inliers (all NaN), set to inf below
        warnings.simplefilter('ignore', RuntimeWarning)
        med = np.nanmedian(np.where(inl, e, np.nan), axis=1)
    return np.where(inl.any(1), med, np.inf)


def shutter_reprojection_errors(T: np.ndarray, skew: np.ndarray, s: np.ndarray, P: np.ndarray, Q: np.ndarray,
                                uv: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~dynrecon_ros.predictors.rgbd.reprojection_errors` of hypotheses T (..., 4, 4) under a rolling
    shutter's row skew: P (N, 3) moved into j, then turned by s x skew (s (N,) the points' row instants in
    s, skew (..., 3) rad/s: the difference of the two frames' angular rates,
    :func:`gauss_newton_under_skew`). Returns (pixel error (..., N), relative depth error (..., N)),
    float64."""
    T, skew = np.asarray(T, np.float64), np.asarray(skew, np.float64)
    X = (P - T[..., None, :3, 3]) @ T[..., :3, :3]
    X = X + s[:, None] * _cross(skew, X)
    iz = 1.0 / np.maximum(X[..., 2], 1e-6)
    du = K[0, 0] * X[..., 0] * iz + K[0, 2] - uv[:, 0]
    dv = K[1, 1] * X[..., 1] * iz + K[1, 2] - uv[:, 1]
    return np.sqrt(du * du + dv * dv), np.abs(X[..., 2] - Q[:, 2]) / Q[:, 2]


def gauss_newton_under_skew(T: np.ndarray, skew: np.ndarray, s: np.ndarray, P: np.ndarray, uv: np.ndarray,
                            K: np.ndarray, w: np.ndarray, iterations: int = 3, sigma_px: float = 0.5,
                            sigma_skew: float = 0.5):
    """Gauss-Newton fits of hypotheses T_i_j (k, 4, 4) and their row skews (k, 3) rad/s to the flow targets
    uv (N, 2) of i's points P (N, 3) with weights w (k, N) (0 / 1: each hypothesis' inliers) under a
    rolling shutter (the model of :func:`shutter_reprojection_errors`; s (N,) the rows' instants).

    A pair seen by two rolling shutters is, to first order and for the far points that pin the
    rotation, the global-shutter motion plus a rotation growing linearly with the row's instant s by
    the difference of the frames' angular rates (hand tremor: a few tenths of a rad/s, 1-2 px over a
    25 ms readout at 320x240). Reprojection residuals (sigma_px px), the skew held to 0 by a Gaussian
    prior (sigma_skew rad/s). Batched over the k hypotheses (one small solve each would cost 10x more
    in numpy's per-call overhead). Returns (T (k, 4, 4), skew (k, 3)).
    """
    T_j_i = np.linalg.inv(T)
    skew = np.array(skew, np.float64)
    fx, fy = float(K[0, 0]), float(K[1, 1])
    k = len(T)
    prior = np.zeros((9, 9))
    prior[6:, 6:] = np.eye(3) * (sigma_px / sigma_skew) ** 2
    for _ in range(iterations):
        Y = P @ T_j_i[:, :3, :3].transpose(0, 2, 1) + T_j_i[:, None, :3, 3]  # (k, N, 3)
        Y = Y + s[:, None] * _cross(skew, Y)
        x, y, z = Y[..., 0], Y[..., 1], Y[..., 2]
        iz = 1.0 / np.maximum(z, 1e-6)
        ru, rv = fx * x * iz + K[0, 2] - uv[:, 0], fy * y * iz + K[1, 2] - uv[:, 1]
        # rows of d pixel / d(left pose increment of T_j_i, skew): d pixel / dY = a, d/d omega = Y x a
        au, av = fx * iz, fy * iz
        cu, cv = -au * x * iz, -av * y * iz
        zero = np.zeros_like(iz)
        Ju = np.stack([au, zero, cu, y * cu, z * au - x * cu, -y * au], -1)
        Jv = np.stack([zero, av, cv, y * cv - z * av, -x * cv, x * av], -1)
        J = np.concatenate([np.concatenate([Ju, s[:, None] * Ju[..., 3:]], -1),
                            np.concatenate([Jv, s[:, None] * Jv[..., 3:]], -1)], 1)  # (k, 2N, 9)
        r = np.concatenate([ru, rv], 1)
        Jw = J * np.concatenate([w, w], 1)[..., None]
        Jwt = Jw.transpose(0, 2, 1)
        H = Jwt @ J + prior + 1e-9 * np.eye(9)
        g = (Jwt @ r[..., None])[..., 0]
        g[:, 6:] += skew * (sigma_px / sigma_skew) ** 2
        step = -np.linalg.solve(H, g[..., None])[..., 0]
        T_j_i = np.stack([se3_increment(step[m, :6]) @ T_j_i[m] for m in range(k)])
        skew = skew + step[:, 6:]
    return np.linalg.inv(T_j_i), skew


def local_fits(T: np.ndarray, P: np.ndarray, Q: np.ndarray, uv: np.ndarray, K: np.ndarray, s: np.ndarray,
               px_threshold: float, rel_depth_threshold: float, rounds: int, min_px_threshold: float):
    """Hypotheses T (k, 4, 4) refined under the row skew (the local optimisation of
    :func:`~dynrecon_ros.predictors.rgbd.ransac_rigid`; s (N,) the points' row instants): ``rounds`` of
    :func:`gauss_newton_under_skew` on each one's inliers while its pixel threshold shrinks (x 0.6
    a round, and to 3 robust sigmas of the inliers, not below min_px_threshold): the shrinking lets a fit
    that started on the background and part of a mover settle on one of them. Returns (T (k, 4, 4),
    skew (k, 3), pixel errors (k, N), relative depth errors (k, N), median pixel and relative depth error of
    the final inliers (k,) each (the thresholds where a row has none), their count (k,))."""
    k = len(T)
    skew, thr = np.zeros((k, 3)), np.full(k, float(px_threshold))
    e, ez = shutter_reprojection_errors(T, skew, s, P, Q, uv, K)
    inl = (e < thr[:, None]) & (ez < rel_depth_threshold)
    for _ in range(rounds):
        T, skew = gauss_newton_under_skew(T, skew, s, P, uv, K, inl.astype(np.float64), 1)
        e, ez = shutter_reprojection_errors(T, skew, s, P, Q, uv, K)
        thr = np.clip(np.minimum(0.6 * thr, 3.0 * 1.4826 * inlier_median(e, inl)), min_px_threshold, thr)
        inl = (e < thr[:, None]) & (ez < rel_depth_threshold)
    med, medz = inlier_median(e, inl), inlier_median(ez, inl)
    return (T, skew, e, ez, np.where(np.isfinite(med), med, float(px_threshold)),
            np.where(np.isfinite(medz), medz, rel_depth_threshold), inl.sum(1))
