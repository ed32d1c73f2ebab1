"""The RGB-D pose's direct refinement: Gauss-Newton on photometric (exposure-gain compensated) and depth
residuals of a pair's inlier points, optionally under a rolling shutter's row skew
(:func:`photometric_refine`; used by :class:`dynrecon_ros.predictors.rgbd.RGBDPredictor` after its flow
RANSAC). Its sampling stacks are made once per frame (:func:`_sampling_stack`)."""
from __future__ import annotations

import cv2
import numpy as np

from dynrecon_ros.geometry import se3_increment
from dynrecon_ros.photometric import exposure_gain
from dynrecon_ros.rolling_shutter import PairShutter


def _sampling_stack(gray: np.ndarray, gx: np.ndarray, gy: np.ndarray, depth: np.ndarray,
                    slopes_of: np.ndarray | None = None):
    """Two (H, W, 4) float32 stacks [grey, d/dx, d/dy, 0] and [depth, d/dx, d/dy, 0] of an image j for
    :func:`photometric_refine` (intensity gradients per pixel, Scharr / 32; OpenCV remaps up to 4
    channels with exact float coordinates, more channels are quantised to 1/32 pixel: hence two). The
    depth's slopes are those of ``slopes_of`` ((H, W) depth, e.g. :func:`slope_depth`'s) when given."""
    dj = depth.astype(np.float32)
    ds = dj if slopes_of is None else np.asarray(slopes_of, np.float32)
    dgx = cv2.Sobel(ds, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    dgy = cv2.Sobel(ds, cv2.CV_32F, 0, 1, ksize=3) / 8.0
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
