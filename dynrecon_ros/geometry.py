"""Geometry shared by the stages: pixel grids, pinhole unprojection, rigid transforms, rotations,
rigid and similarity fits (weighted, batched, robust), poses from TUM rows.

Pure functions in kornia.geometry's style: arrays in, arrays out, shapes in the docstrings, no state.
numpy unless the name or the docstring says torch. Two functions exist in both worlds, for a
reason each: :func:`svd_rotation` takes either (it dispatches on the array type: the numpy fits and
the torch ones share it), and the weighted batched similarity fit is numpy (:func:`fit_similarity`:
the RGB-D predictor's RANSAC and the aligner's tree init, small host problems in float64 where a
tensor round trip would cost more than the fit) and torch (:func:`fit_similarity_torch`: the
closed-form alignment sweeps, on the aligner's device, with the moments the sweeps reuse).

Hand-written fits: scipy's ``Rotation.align_vectors`` has no scale, no translation and no batch;
OpenCV's ``estimateAffine3D`` fits an affine map; nothing installed fits a batch of weighted
similarities or one from precomputed moments (Umeyama 1991, the reflection-safe SVD solution).
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch
from scipy.spatial.transform import Rotation

from dynrecon_ros.errors import InputError


# ---------------------------------------------------------------------------------------------
# pixels and points

@lru_cache(maxsize=8)
def pixel_grid(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 pixel coordinates (u, v) = (column, row) of every pixel (integer pixel
    indices, DUSt3R's and OpenCV remap's convention); cached and read-only (callers add to it or
    subtract from it, which copies)."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    g = np.stack([u, v], axis=-1)
    g.setflags(write=False)
    return g


@lru_cache(maxsize=8)
def pixel_axes(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixel grid as a (1, W) float32 row of u and an (H, 1) column of v (``pixel_grid``'s
    convention), which broadcast to it: per-pixel arithmetic on them needs no (H, W, 2) grid and no
    strided views of it; cached and read-only."""
    u = np.arange(width, dtype=np.float32)[None, :]
    v = np.arange(height, dtype=np.float32)[:, None]
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def intrinsics_matrix(focal: float, pp) -> np.ndarray:
    """(3, 3) pinhole K of a square-pixel camera: focal (px) and principal point pp (2,) (px)."""
    return np.array([[focal, 0.0, pp[0]], [0.0, focal, pp[1]], [0.0, 0.0, 1.0]])


def unproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points of a depth image: (..., H, W) depth along z + K (3, 3) or (..., 3, 3) (one
    per image) -> (..., H, W, 3) float64, x = (u - cx) / fx * z, y = (v - cy) / fy * z; NaN where the
    depth is not finite or not positive."""
    depth = np.asarray(depth)
    K = np.asarray(K, dtype=np.float64)
    h, w = depth.shape[-2:]
    g = pixel_grid(h, w)
    z = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)
    fx, fy, cx, cy = (K[..., i, j][..., None, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    return np.stack([(g[..., 0] - cx) / fx * z, (g[..., 1] - cy) / fy * z, z], axis=-1).astype(np.float64)


def unproject_pixels(u: np.ndarray, v: np.ndarray, z: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points (..., 3) float64 of pixels ``(u, v)`` (...) at depths ``z`` (...) through the pinhole
    K (3, 3): :func:`unproject` for a list of pixels (no validity check: the caller picked them), the inverse
    of :func:`project`."""
    z = np.asarray(z, dtype=np.float64)
    return np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=-1)


def project(pts: np.ndarray, K: np.ndarray, z: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v), each (...), of camera-frame points (..., 3) through the pinhole K (3, 3):
    u = fx x / z + cx, v = fy y / z + cy. ``z``: the divisor (...) instead of the points' own z (a caller's
    clamped or masked depth: points at or behind the camera are the caller's to handle)."""
    z = pts[..., 2] if z is None else z
    return K[0, 0] * pts[..., 0] / z + K[0, 2], K[1, 1] * pts[..., 1] / z + K[1, 2]


def transform_points(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(4, 4) rigid (or similarity) transform applied to (..., 3) points, in the points' dtype."""
    return pts @ T[:3, :3].T.astype(pts.dtype) + T[:3, 3].astype(pts.dtype)


def to_matrix(R: np.ndarray, t: np.ndarray, s=1.0) -> np.ndarray:
    """(..., 4, 4) transform x -> s R x + t from R (..., 3, 3), t (..., 3) and a scale s (... or scalar)."""
    T = np.zeros(np.shape(R)[:-2] + (4, 4))
    T[..., :3, :3] = np.asarray(s)[..., None, None] * R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


# ---------------------------------------------------------------------------------------------
# rotations and poses

def hat(w: torch.Tensor) -> torch.Tensor:
    """torch: (..., 3) -> (..., 3, 3) skew-symmetric cross-product matrix [w]x ([w]x v = w x v)."""
    z = torch.zeros_like(w[..., 0])
    return torch.stack([torch.stack([z, -w[..., 2], w[..., 1]], -1),
                        torch.stack([w[..., 2], z, -w[..., 0]], -1),
                        torch.stack([-w[..., 1], w[..., 0], z], -1)], -2)


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rodrigues: (..., 3) axis-angle (rad) -> (..., 3, 3) rotation (scipy's rotation vector)."""
    w = np.asarray(w, dtype=np.float64)
    return Rotation.from_rotvec(w.reshape(-1, 3)).as_matrix().reshape(w.shape[:-1] + (3, 3))


def se3_increment(xi: np.ndarray) -> np.ndarray:
    """(6,) Gauss-Newton step [v, omega] -> (4, 4) [[exp([omega]x), v], [0, 1]]: the rotation by
    Rodrigues, the translation taken as v (the SE(3) exponential's to first order; a refinement that
    iterates to convergence ends where the exact exponential would)."""
    T = np.eye(4)
    # one rotation: OpenCV's Rodrigues (the same formula as so3_exp) costs 2 us, scipy's batch path 30+
    T[:3, :3], T[:3, 3] = cv2.Rodrigues(np.asarray(xi[3:], np.float64))[0], xi[:3]
    return T


def poses_from_tum(rows) -> np.ndarray:
    """(..., 7) TUM rows ``tx ty tz qx qy qz qw`` -> (..., 4, 4) poses (quaternions normalised;
    scipy's quaternion order x y z w is TUM's). InputError when the last axis is not 7 long."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim == 0 or rows.shape[-1] != 7:
        raise InputError(f'a TUM pose is [tx, ty, tz, qx, qy, qz, qw], got shape {rows.shape}')
    flat = rows.reshape(-1, 7)
    T = np.tile(np.eye(4), (len(flat), 1, 1))
    if len(flat):
        T[:, :3, :3] = Rotation.from_quat(flat[:, 3:]).as_matrix()
        T[:, :3, 3] = flat[:, :3]
    return T.reshape(rows.shape[:-1] + (4, 4))


# ---------------------------------------------------------------------------------------------
# fits

def svd_rotation(cov):
    """The rotation R (..., 3, 3) maximising tr(R^T cov) for cov (..., 3, 3) (Umeyama's
    reflection-safe SVD solution, det R = +1), and sum(S * D) (...), the numerator of Umeyama's
    scale. numpy arrays or torch tensors (the result is of the same kind)."""
    xp = torch if isinstance(cov, torch.Tensor) else np
    U, S, Vt = xp.linalg.svd(cov)
    D = xp.ones_like(S)
    D[..., 2] = xp.sign(xp.linalg.det(U) * xp.linalg.det(Vt))
    return (U * D[..., None, :]) @ Vt, (S * D).sum(-1)


def fit_similarity(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None, scale: bool = True):
    """Weighted similarity (s, R, t) minimising sum w ||s R src + t - dst||^2 (Umeyama); rigid
    (s = 1) without ``scale``. src, dst (..., M, 3) (a leading batch of independent fits), w (..., M)
    >= 0 or None (equal weights). Returns s (...) (a float without a batch), R (..., 3, 3), t (..., 3)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if w is None:
        ms, md = src.mean(-2), dst.mean(-2)
        a, b = src - ms[..., None, :], dst - md[..., None, :]
        cov = np.einsum('...mi,...mj->...ij', b, a)  # (sums, not means: s is their ratio)
        var, floor = (a * a).sum((-2, -1)), 1e-30
    else:
        w = np.asarray(w, np.float64)
        w = w / np.maximum(w.sum(-1, keepdims=True), 1e-12)
        ms, md = np.einsum('...m,...mi->...i', w, src), np.einsum('...m,...mi->...i', w, dst)
        a, b = src - ms[..., None, :], dst - md[..., None, :]
        cov = np.einsum('...mi,...mj->...ij', b * w[..., None], a)
        var, floor = np.einsum('...m,...m->...', w, (a * a).sum(-1)), 1e-12
    R, sd = svd_rotation(cov)
    s = sd / np.maximum(var, floor) if scale else np.ones_like(var)
    t = md - s[..., None] * np.einsum('...ij,...j->...i', R, ms)
    return (float(s) if np.ndim(s) == 0 else s), R, t


def fit_rigid(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """(..., 4, 4) rigid T minimising sum w ||T src - dst||^2 (Kabsch/Umeyama without scale):
    :func:`fit_similarity` with s = 1, as a matrix. src, dst (..., M, 3), w (..., M) or None."""
    _, R, t = fit_similarity(src, dst, w, scale=False)
    return to_matrix(R, t)


def consensus_similarity(src: np.ndarray, dst: np.ndarray, w: np.ndarray, quantile: float, cut: float = 3.0,
                         hypotheses: int = 128, sample: int = 2048, seed: int = 0):
    """Consensus similarity from ``hypotheses`` Umeyama fits to 3 points drawn with probability ~ w,
    scored on a sample of the points (w > 0): the residual scale sigma is the smallest ``quantile``
    of the residuals over the hypotheses (the noise of the most consistent group), and the
    hypothesis with the largest weight of points within ``cut`` sigma wins (RANSAC's consensus with
    a scale-free threshold). src, dst (M, 3), w (M,). Returns ((s, R, t), sigma) or None (fewer than
    10 weighted points). It finds the static majority even when a moving object covers a large part
    of the view (any group under half the weight, down to ``quantile`` of it for the scale), where
    a fit to all points is pulled so far that trimming by the median residual cannot recover.
    Hand-written (vectorised over hypotheses; OpenCV's estimateAffine3D fits an affine map or
    needs all points, scikit-image's ransac is not a dependency and needs a metric threshold)."""
    idx = np.flatnonzero(w > 0)
    if len(idx) < 10:
        return None
    rng = np.random.default_rng(seed)
    pts = idx if len(idx) <= sample else rng.choice(idx, sample, replace=False)
    p = w[idx] / w[idx].sum()
    tri = idx[rng.choice(len(idx), (hypotheses, 3), p=p)]
    sc, R, t = fit_similarity(src[tri], dst[tri])  # (K,), (K, 3, 3), (K, 3): one fit per hypothesis
    res = np.linalg.norm(sc[:, None, None] * (R @ src[pts].T) + (t[:, :, None] - dst[pts].T[None]), axis=1)  # (K, M)
    q = np.quantile(res, quantile, axis=1)
    q[~np.isfinite(q)] = np.inf
    sigma = float(q.min())  # residual scale of the most consistent group of points
    if not np.isfinite(sigma):
        return None
    # consensus at that scale (weighted): the largest consistent group wins, not merely one that
    # holds the quantile (a mover over 45 % of the view would hold a 30 % quantile as well)
    score = ((res <= cut * sigma) * w[pts]).sum(1)
    k = int(np.lexsort((q, -score))[0])
    return (float(sc[k]), R[k], t[k]), sigma


def robust_similarity(src: np.ndarray, dst: np.ndarray, w: np.ndarray, scale: bool = True, rounds: int = 2,
                      cut: float = 3.0, quantile: float | None = 0.3, max_points: int = 16384):
    """:func:`fit_similarity` (with Horn's symmetric scale) refitted ``rounds`` times without
    the points whose residual exceeds ``cut`` times the median residual of the points kept (points
    that moved between the views, when no mask has caught them yet). With ``quantile`` the first
    fit is to the consensus set of :func:`consensus_similarity` (robust to a moving object over a
    large part of the view) instead of to all points. src, dst (M, 3), w (M,) >= 0. Above
    ``max_points`` points a regular subsample of them is fitted (an init: 512x384 pointmaps cost
    0.5 s per call in full, a subsample of 16k fits as well). Returns (s, R (3, 3), t (3,))."""
    w = np.asarray(w, np.float64)
    if max_points and len(src) > max_points:
        step = -(-len(src) // max_points)
        src, dst, w = (np.ascontiguousarray(x[::step]) for x in (src, dst, w))
    src2, dst2 = (src ** 2).sum(1), (dst ** 2).sum(1)

    def fit(wt):
        s, R, t = fit_similarity(src, dst, wt, scale)
        if scale:  # Horn's symmetric scale (ratio of spreads): equal to Umeyama's on consistent
            # points, but it does not shrink towards 0 when the two sets are poorly correlated
            wn = wt / max(wt.sum(), 1e-12)
            ms, md = wn @ src, wn @ dst
            # weighted variances (E|x|^2 - |E x|^2); multiply-sum, not a BLAS dot (OpenBLAS threads
            # a long ddot: 5 ms for 16k points on a loaded 2-core box, vs 20 us)
            vs = (wn * src2).sum() - ms @ ms
            vd = (wn * dst2).sum() - md @ md
            s = float(np.sqrt(max(vd, 0) / max(vs, 1e-24)))
            t = md - s * R @ ms
        return s, R, t

    use = w > 0
    seedfit = consensus_similarity(src, dst, w, quantile, cut) if quantile is not None and scale else None
    if seedfit is not None:
        (s, R, t), qr = seedfit
        r = np.linalg.norm(s * src @ R.T + t - dst, axis=1)
        keep = w * (r <= cut * max(qr, 1e-12))
        s, R, t = fit(keep) if (keep > 0).sum() >= 10 else fit(w)
    else:
        keep = w
        s, R, t = fit(w)
    for _ in range(rounds):
        r = np.linalg.norm(s * src @ R.T + t - dst, axis=1)
        if use.sum() < 10:
            break
        med = float(np.median(r[keep > 0])) if (keep > 0).any() else float(np.median(r[use]))
        keep = w * (r <= cut * max(med, 1e-12))
        if keep.sum() <= 0:
            break
        s, R, t = fit(keep)
    return s, R, t


# Batched small products over many points (B batches of M points, 3-vectors). On CPU as bmm / einsum:
# several times faster there than elementwise products and sums. On CUDA bmm runs these shapes (an output of
# 3 or 3x3 per batch, a reduction over M ~ 2e5) on one thread block per batch (5 ms a call on an H200, 2026-12-04
# profile); elementwise products and torch's sum reductions spread over the whole GPU (bench/cuda_products.py).
def _wsum_elementwise(w, X):
    return (w[..., None] * X).sum(1)


def _moment_elementwise(A, B):
    return (A[..., :, None] * B[..., None, :]).sum(1)


def _rotate_elementwise(R, X):  # three fused multiply-adds over the points; row j of Rt = column j of R
    Rt = R.transpose(1, 2)[:, None]  # (B, 1, 3, 3)
    return torch.addcmul(torch.addcmul(X[..., 0:1] * Rt[:, :, 0], X[..., 1:2], Rt[:, :, 1]),
                         X[..., 2:3], Rt[:, :, 2])


def batched_wsum(w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(B, 3): sum_m w (B, M) X (B, M, 3)."""
    return _wsum_elementwise(w, X) if X.is_cuda else torch.bmm(w[:, None], X)[:, 0]


def batched_moment(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3): sum_m A_m B_m^T of A, B (B, M, 3) (= A^T B per batch)."""
    return _moment_elementwise(A, B) if A.is_cuda else torch.bmm(A.transpose(1, 2), B)


def batched_rotate(R: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(B, M, 3): R (B, 3, 3) applied to the points X (B, M, 3)."""
    return _rotate_elementwise(R, X) if X.is_cuda else torch.bmm(X, R.transpose(1, 2))


def batched_rotate_inv(R: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(B, M, 3): R^T (R (B, 3, 3)) applied to the points X (B, M, 3)."""
    return _rotate_elementwise(R.transpose(1, 2), X) if X.is_cuda else torch.bmm(X, R)


def batched_dot(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """(...,): X . Y over the last axis (einsum on CPU: (X * Y).sum(-1) is ~4x slower there)."""
    return (X * Y).sum(-1) if X.is_cuda else torch.einsum('...i,...i->...', X, Y)


def batched_total(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,): sum_m w (B, M) x (B, M)."""
    return (w * x).sum(1) if x.is_cuda else torch.einsum('bm,bm->b', w, x)


def fit_similarity_torch(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor):
    """torch, batched :func:`fit_similarity`: src, dst (B, M, 3), w (B, M) -> s (B,), R (B, 3, 3),
    t (B, 3) with s R src + t ~ dst, and the weighted means of src and dst (B, 3) and the weighted
    variance of src (B,) (weights normalised per batch; the closed-form sweeps reuse them).
    float64: from the raw moments (no centred copies of the points); float32: centred first (the
    moments would lose the precision of world points far from the origin). Batched 3x3 products as
    bmm on CPU, elementwise on CUDA (:func:`batched_moment`)."""
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    ms, md = batched_wsum(w, src), batched_wsum(w, dst)
    if src.dtype == torch.float64:
        ws = src * w[..., None]
        cov = batched_moment(dst, ws) - md[:, :, None] * ms[:, None, :]
        var = torch.einsum('bmi,bmi->b', ws, src) - torch.einsum('bi,bi->b', ms, ms)
    else:
        a, b = src - ms[:, None], dst - md[:, None]
        cov = batched_moment(b * w[..., None], a)
        var = batched_total(w, batched_dot(a, a))
    R, sd = svd_rotation(cov)
    sc = sd / var.clamp_min(1e-30)
    return sc, R, md - sc[:, None] * torch.einsum('bij,bj->bi', R, ms), ms, md, var


def fit_rigid_from_moments(sw: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, sxy: torch.Tensor):
    """torch: rigid (R (B, 3, 3), t (B, 3)) minimising sum w ||R x + t - y||^2 from the weighted
    moments sw (B,) = sum w, sx, sy (B, 3) = sum w x, sum w y, sxy (B, 3, 3) = sum w y x^T (Umeyama
    without scale; for fits whose points are never gathered in one place)."""
    W = sw.clamp_min(1e-30)
    mx, my = sx / W[:, None], sy / W[:, None]
    R, _ = svd_rotation(sxy / W[:, None, None] - my[:, :, None] * mx[:, None, :])
    return R, my - torch.einsum('bij,bj->bi', R, mx)


def translation_sigma(P: np.ndarray, K: np.ndarray, sigma_px: float = 0.5, sigma_depth_rel: float = 0.01) -> float:
    """How well points pin a rigid motion's translation: (n, 3) points in a camera with intrinsics K (3, 3) ->
    the largest standard deviation (m) of the translation of a rigid fit to them, rotation free, each point
    measured to ``sigma_px`` pixels across its ray and ``sigma_depth_rel`` z along it (the direct
    refinement's relative depth sigma); inf for fewer than 3 points.

    The information of a left increment (t, omega) is sum_k J_k^T W_k J_k, J_k = [I, -[X_k]x], W_k = diag(
    (f / (sigma_px z))^2 (x, y), 1 / (sigma_depth_rel z)^2); the translation's covariance is the top-left
    3x3 block of its inverse. Far points on a thin band leave the translation nearly free (translation and
    rotation look alike there). With J_k's rows [1 0 0 0 z -y], [0 1 0 -z 0 x], [0 0 1 y -x 0] and weights
    (a, b, c)_k, H is 15 weighted moments of the points (dot products over n: ~20x faster than forming J at
    ~10^4 points); written out because no library call forms this 6x6 information.
    """
    P = np.asarray(P, np.float64).reshape(-1, 3)
    if len(P) < 3:
        return float('inf')
    x, y, z = P.T
    iz2 = 1.0 / (z * z)
    a = (K[0, 0] / sigma_px) ** 2 * iz2  # (n,) inverse variances of x, y, z
    b = (K[1, 1] / sigma_px) ** 2 * iz2
    c = iz2 / sigma_depth_rel ** 2
    H = np.zeros((6, 6))
    H[0, 0], H[1, 1], H[2, 2] = a.sum(), b.sum(), c.sum()
    H[0, 4], H[0, 5] = a @ z, -(a @ y)
    H[1, 3], H[1, 5] = -(b @ z), b @ x
    H[2, 3], H[2, 4] = c @ y, -(c @ x)
    xx, yy, zz = x * x, y * y, z * z
    H[3, 3], H[4, 4], H[5, 5] = b @ zz + c @ yy, a @ zz + c @ xx, a @ yy + b @ xx
    H[3, 4], H[3, 5], H[4, 5] = -(c @ (x * y)), -(b @ (x * z)), -(a @ (y * z))
    H = np.triu(H) + np.triu(H, 1).T
    try:
        C = np.linalg.inv(H)[:3, :3]
    except np.linalg.LinAlgError:
        return float('inf')
    return float(np.sqrt(max(np.linalg.eigvalsh(C).max(), 0.0)))
