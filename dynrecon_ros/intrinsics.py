"""Intrinsics for the monocular path: focal length from predicted pointmaps (DUSt3R's estimate).

A pointmap in the camera frame satisfies ``pixel - pp = f * (x / z, y / z)`` for a pinhole camera
with square pixels. DUSt3R fits ``f`` robustly by iteratively re-weighted least squares (Weiszfeld:
weights = 1 / residual norm, i.e. an L1 fit of the 2D reprojection residual). A ``K`` from
camera_info always wins: :func:`resolve_focals` returns it unchanged and the aligner keeps it fixed.
"""
from __future__ import annotations

import numpy as np

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import pixel_grid


def default_principal_point(height: int, width: int) -> np.ndarray:
    """(2,) principal point at the image centre, DUSt3R's convention (W/2, H/2)."""
    return np.array([width / 2.0, height / 2.0])


def estimate_focal(pts3d, conf=None, pp=None, iterations: int = 10, min_conf: float = 0.0) -> float:
    """Robust focal estimate from one pointmap in its own camera frame.

    pts3d: (H, W, 3) points in the camera frame. conf: (H, W) optional weights (confidence; pixels
    with conf <= min_conf are ignored). pp: (2,) principal point, default the image centre.
    Returns f in pixels (fx = fy).
    """
    pts = np.asarray(pts3d, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[-1] != 3:
        raise InputError(f'estimate_focal: pts3d must be (H, W, 3), got {pts.shape}')
    h, w = pts.shape[:2]
    pp = default_principal_point(h, w) if pp is None else np.asarray(pp, dtype=np.float64)
    pix = (pixel_grid(h, w) - pp).reshape(-1, 2)
    z = pts[..., 2].reshape(-1)
    valid = np.isfinite(pts.reshape(-1, 3)).all(axis=1) & (z > 1e-8)
    cw = np.ones_like(z)
    if conf is not None:
        c = np.asarray(conf, dtype=np.float64).reshape(-1)
        valid &= c > min_conf
        cw = np.where(valid, c, 0.0)
    if valid.sum() < 2:
        raise InputError('estimate_focal: fewer than 2 valid points (all behind the camera or masked)')
    xy = pts.reshape(-1, 3)[valid, :2] / z[valid, None]
    pix, cw = pix[valid], cw[valid]
    dot_xp = (xy * pix).sum(-1)
    dot_xx = (xy * xy).sum(-1)
    f = (cw * dot_xp).sum() / (cw * dot_xx).sum()  # least-squares start
    for _ in range(iterations):  # Weiszfeld re-weighting, as DUSt3R's estimate_focal_knowing_depth
        res = np.linalg.norm(pix - f * xy, axis=-1)
        wgt = cw / np.clip(res, 1e-8, None)
        f = (wgt * dot_xp).sum() / (wgt * dot_xx).sum()
    return float(f)


def estimate_focals(pts3d, conf=None, pp=None, shared: bool = True) -> np.ndarray:
    """Focal per frame from (N, H, W, 3) camera-frame pointmaps (conf (N, H, W) optional).

    shared=True returns the median of the per-frame estimates for every frame (one camera).
    Returns (N,) float64.
    """
    pts = np.asarray(pts3d)
    f = np.array([estimate_focal(pts[n], None if conf is None else conf[n], pp) for n in range(len(pts))])
    if shared:
        f[:] = np.median(f)
    return f


def resolve_focals(n_frames: int, K=None, estimated=None) -> tuple[np.ndarray, bool]:
    """Focals to use and whether they are fixed: camera_info ``K`` (3, 3) wins and is kept fixed.

    K present -> ((N,) of (fx + fy) / 2, True). Otherwise ``estimated`` (N,) -> (estimated, False).
    """
    if K is not None:
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise InputError(f'camera K must be a (3, 3) matrix with positive focal lengths, got {K!r}')
        return np.full(n_frames, 0.5 * (K[0, 0] + K[1, 1])), True
    if estimated is None:
        raise InputError('resolve_focals: no camera K and no estimated focals')
    return np.asarray(estimated, dtype=np.float64).reshape(n_frames), False
