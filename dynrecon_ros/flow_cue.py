"""Motion segmentation, the flow cue (MonST3R style): a pixel is dynamic when its optical flow
disagrees with the flow that the camera motion and the depth of its frame induce ("ego flow").

Normalisation (a deliberate difference to MonST3R): MonST3R min-max normalises the error per pair,
which turns the largest *noise* of a pair without any mover into "dynamic". With metric depth and
metric poses the error has a meaning in pixels, so we use an absolute model instead: the tolerance
of a pixel is ``tol = min_flow_px + flow_rel_tol * ||ego flow||`` (flow error grows with the flow:
depth noise scales the translational flow, pose noise the rotational one) and the per-pair dynamic
probability is the soft step ``p = r^s / (1 + r^s)`` with ``r = e / tol`` and ``s = steepness``:
0 at zero error, 0.5 at the tolerance, ~1 well beyond it (s = 4: r = 0.5 -> 0.06, r = 2 -> 0.94).
A static scene thus yields ~0 everywhere.

Also here: carrying a frame's per-pixel evidence to the other frame of a pair along the flow
(:func:`pull_from_source`, :func:`splat_to_target`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros import photometric
from dynrecon_ros.depth_cue import fill_candidates, soft_step_of_inverse
from dynrecon_ros.geometry import pixel_axes, pixel_grid, unproject_pixels
from dynrecon_ros.rolling_shutter import ego_planes

if TYPE_CHECKING:
    from dynrecon_ros.segmentation import SegmentationConfig

# depth (metres) of the surface a pixel without a reading sees when that surface is beyond the sensor's
# range: far enough that its ego flow is the camera rotation's (a Kinect reads up to 4-6 m)
BEYOND_RANGE_M = 50.0


def ego_flow(depth: np.ndarray, K: np.ndarray, T_j_i: np.ndarray, K_j: np.ndarray | None = None) -> np.ndarray:
    """Pixel displacement in frame j that the camera motion and the depth of frame i induce.

    Args:
        depth: (H, W) float32 metres of frame i; 0, negative or NaN = invalid.
        K: (3, 3) intrinsics of frame i (also of frame j unless ``K_j`` is given).
        T_j_i: (4, 4) rigid transform with ``X_j = T_j_i @ X_i`` (camera i to camera j).
        K_j: optional (3, 3) intrinsics of frame j.

    Returns:
        (H, W, 2) float32 ``(du, dv)``; NaN where the depth is invalid or the point is not in front
        of camera j.
    """
    return ego_flow_and_depth(depth, K, T_j_i, K_j)[0]


def ego_flow_and_depth(depth, K, T_j_i, K_j=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ego_flow` plus the (H, W) depth of each point in camera j."""
    du, dv, zj = _ego_planes(depth, K, T_j_i, K_j)
    return np.stack([du, dv], axis=-1), zj


def _ego_planes(depth, K, T_j_i, K_j=None, shutter=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W) float32 ego flow du, dv and depth in camera j, NaN where invalid (planes: fast numpy).
    shutter: optional (ShutterModel, twist_i (6,), twist_j (6,)): rows seen at their own instants
    (:func:`dynrecon_ros.rolling_shutter.ego_planes`)."""
    depth = np.asarray(depth, dtype=np.float32)
    h, w = depth.shape
    return ego_at(*pixel_axes(h, w), depth, K, T_j_i, K_j, None if shutter is None else (*shutter, h))


def ego_at(u: np.ndarray, v: np.ndarray, z: np.ndarray, K, T_j_i, K_j=None,
           shutter=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ego flow ``du, dv`` and depth in camera j of frame i's points at pixels ``(u, v)`` with depth ``z``.

    ``u``, ``v`` and ``z`` broadcast together (a row of columns, a column of rows and an (H, W) depth,
    or three (M,) vectors of chosen pixels); float32 results of the broadcast shape, NaN where ``z`` is
    not a positive finite depth or the point is not in front of camera j. ``X_j = z R ray + t`` with
    the camera-i ray ``((u - cx) / fx, (v - cy) / fy, 1)``; ``R ray`` is a sum of a row and a column
    for image-sized input, and the rest is computed in place (fresh image-sized temporaries cost
    page faults: 5x the arithmetic here), in the same order of float32 operations as before (the
    pipeline's poses react to the last bit of the masks). ``shutter``: optional (ShutterModel, twist_i,
    twist_j, image height): each row seen at its own instant (:func:`~dynrecon_ros.rolling_shutter.ego_planes`).
    """
    K = np.asarray(K, dtype=np.float64)
    K_j = K if K_j is None else np.asarray(K_j, dtype=np.float64)
    T = np.asarray(T_j_i, dtype=np.float64)
    z = np.asarray(z, dtype=np.float32)
    x = (u - np.float32(K[0, 2])) * np.float32(1 / K[0, 0])
    y = (v - np.float32(K[1, 2])) * np.float32(1 / K[1, 1])
    R = T[:3, :3].astype(np.float32)
    t = T[:3, 3].astype(np.float32)
    with np.errstate(over='ignore', invalid='ignore', divide='ignore'):  # absurd depths (inf, 1e38) end invalid
        xj = z * (R[0, 0] * x + R[0, 1] * y + R[0, 2])
        xj += t[0]
        yj = z * (R[1, 0] * x + R[1, 1] * y + R[1, 2])
        yj += t[1]
        zj = z * (R[2, 0] * x + R[2, 1] * y + R[2, 2])
        zj += t[2]
        if shutter is not None:  # rows seen at their own instants (the rolling shutter)
            xj, yj, zj = ego_planes((x * z, y * z, z), (xj, yj, zj), v, T[:3, :3], *shutter, K_j)
        valid = np.isfinite(z) & (z > 0)
        valid &= zj > 1e-6
        valid &= np.isfinite(zj)
        np.copyto(zj, np.float32(np.nan), where=~valid)
        iz = np.divide(np.float32(1), zj)
        du = np.multiply(np.float32(K_j[0, 0]), xj, out=xj)
        du *= iz
        if K_j[0, 1] != 0:  # skew (0 * finite adds nothing: skipped when there is none)
            du += np.float32(K_j[0, 1]) * yj * iz
        du += np.float32(K_j[0, 2])
        du -= u
        dv = np.multiply(np.float32(K_j[1, 1]), yj, out=yj)
        dv *= iz
        dv += np.float32(K_j[1, 2])
        dv -= v
    return du, dv, zj


def _edge_tolerant_error(eu, ev, fu, fv, radius: int) -> np.ndarray:
    """(H, W) flow error ``||ego - flow||``, the smallest within ``radius`` pixels (NaN = no ego flow).

    At depth edges a pixel's depth and its flow can disagree by a pixel; taking the neighbourhood
    minimum (a grey erosion) keeps such edges from lighting up, and shrinks movers by ``radius``
    pixels at most, which the depth-edge snapping of :func:`clean_mask` restores.
    """
    du, dv = np.subtract(eu, fu), np.subtract(ev, fv)
    du *= du
    dv *= dv
    du += dv
    err = np.sqrt(du, out=du)
    if radius > 0:
        # NaN (no ego flow) takes no part in the minimum (1e6: far beyond any tolerance) and stays NaN
        eroded = cv2.erode(np.fmin(err, np.float32(1e6), out=dv), np.ones((2 * radius + 1, 2 * radius + 1), np.uint8))
        eroded += np.multiply(err, np.float32(0), out=err)
        err = eroded
    return err


def pair_dynamic_probability(depth_i: np.ndarray, K_i: np.ndarray, T_j_i: np.ndarray, flow: np.ndarray,
                             valid: np.ndarray | None, cfg: SegmentationConfig,
                             K_j: np.ndarray | None = None) -> np.ndarray:
    """Dynamic probability of the pixels of frame i from one pair (i, j); cheap, stateless.

    Args:
        depth_i: (H, W) float32 metres of frame i.
        K_i: (3, 3) intrinsics of frame i; ``K_j`` those of frame j (default ``K_i``).
        T_j_i: (4, 4) with ``X_j = T_j_i @ X_i``.
        flow: (H, W, 2) optical flow from frame i to frame j.
        valid: (H, W) bool forward-backward consistent pixels, or None (all).
        cfg: the segmentation parameters (tolerance model, see the module docstring).

    Returns:
        (H, W) float32 in [0, 1]; NaN where there is no evidence (invalid depth or flow).
    """
    return pair_probability(depth_i, K_i, T_j_i, flow, valid, cfg, K_j)[0]


def refine_relative_pose(depth_i: np.ndarray, K_i: np.ndarray, T_j_i: np.ndarray, flow: np.ndarray,
                         valid: np.ndarray | None, K_j: np.ndarray | None = None, inlier_px: float = 1.0,
                         iterations: int = 3, max_points: int = 1500, max_rotation_deg: float = 1.0,
                         max_translation: float = 0.03, agree_px: float = 2.0) -> np.ndarray:
    """Two-view refinement of ``T_j_i`` on the flow of the pixels that agree with it (MonST3R aligns
    each pair alone before computing its ego flow).

    Small pose errors (0.2 degrees ~ 1 pixel) would otherwise light up the whole background. The
    depth of frame i and the flow give 3D-2D correspondences; OpenCV's RANSAC PnP, started from
    ``T_j_i`` with an ``inlier_px`` threshold (movers are outliers), then iterative PnP on the tight
    inliers refine it; a step is kept only if more pixels agree within
    ``inlier_px`` and the correction stays within ``max_rotation_deg`` / ``max_translation`` metres
    (large movers can otherwise pull the pose to a compromise that half-fits them).

    Args:
        depth_i: (H, W) float32 metres; K_i, K_j: (3, 3) intrinsics (K_j defaults to K_i).
        T_j_i: (4, 4) initial ``X_j = T_j_i @ X_i``.
        flow: (H, W, 2) optical flow i -> j; valid: (H, W) bool or None.
        inlier_px: inlier threshold in pixels.
        iterations: refinement rounds.
        max_points: pixels sampled on a regular grid.
        max_rotation_deg, max_translation: bounds on the correction.
        agree_px: only pixels within this many pixels of the initial pose's prediction take part
            (unless fewer than half do: then the initial pose is too far off to judge and all do).

    Returns:
        (4, 4) refined ``T_j_i`` (the input when there is too little support).
    """
    K_i = np.asarray(K_i, dtype=np.float64)
    K_j = K_i if K_j is None else np.asarray(K_j, dtype=np.float64)
    T = np.asarray(T_j_i, dtype=np.float64).copy()
    h, w = depth_i.shape
    step = max(1, int(np.sqrt(h * w / max_points)))
    v, u = np.mgrid[step // 2:h:step, step // 2:w:step]
    z = depth_i[v, u].astype(np.float64)
    f = flow[v, u].astype(np.float64)
    ok = np.isfinite(z) & (z > 0) & np.all(np.isfinite(f), axis=-1)
    if valid is not None:
        ok &= valid[v, u]
    if ok.sum() < 50:
        return T
    u, v, z, f = u[ok], v[ok], z[ok], f[ok]
    X = unproject_pixels(u, v, z, K_i)
    target = np.stack([u + f[:, 0], v + f[:, 1]], axis=1)

    def residual(T_):
        Xc = X @ T_[:3, :3].T + T_[:3, 3]
        with np.errstate(divide='ignore', invalid='ignore'):
            p = Xc[:, :2] / Xc[:, 2:3] * [K_j[0, 0], K_j[1, 1]] + [K_j[0, 2], K_j[1, 2]]
        r = np.linalg.norm(p - target, axis=1)
        r[~(Xc[:, 2] > 1e-6) | ~np.isfinite(r)] = np.inf
        return r

    res = residual(T)
    # only pixels that roughly agree with the initial pose may steer the correction: a large mover
    # close to the camera is otherwise fitted within the bounds (seen: a mover 4 px off its ego flow,
    # a quarter of the image, absorbed by the 'refined' pose and never flagged)
    agree = res < agree_px
    if agree.sum() >= max(50, 0.5 * len(res)):
        X, target, res = X[agree], target[agree], res[agree]
    T0 = T.copy()

    def within_bounds(T_new):
        step_ = np.linalg.inv(T0) @ T_new
        angle = np.rad2deg(np.arccos(np.clip((np.trace(step_[:3, :3]) - 1) / 2, -1, 1)))
        return angle <= max_rotation_deg and np.linalg.norm(step_[:3, 3]) <= max_translation

    def as_T(rvec, tvec):
        T_new = np.eye(4)
        T_new[:3, :3] = cv2.Rodrigues(rvec)[0]
        T_new[:3, 3] = np.asarray(tvec).ravel()
        return T_new

    # RANSAC from the initial guess: a least-squares PnP on a loose inlier set is pulled towards
    # movers (seen: a 0.4 degree error 'corrected' by 1.2 degrees the wrong way).
    rvec0, _ = cv2.Rodrigues(T[:3, :3])
    ok_, rvec, tvec, _ = cv2.solvePnPRansac(X, target, K_j, None, rvec0, T[:3, 3].reshape(3, 1).copy(),
                                            useExtrinsicGuess=True, iterationsCount=100,
                                            reprojectionError=inlier_px, confidence=0.999,
                                            flags=cv2.SOLVEPNP_ITERATIVE)
    if ok_:
        T_new = as_T(rvec, tvec)
        res_new = residual(T_new)
        # a correction, not a new pose: large movers can pull PnP to a compromise that fits them too;
        # keep it only if more pixels agree tightly with it
        if within_bounds(T_new) and np.count_nonzero(res_new < inlier_px) > np.count_nonzero(res < inlier_px):
            T, res = T_new, res_new
    for _ in range(iterations):  # polish on the tight inliers
        inl = res < inlier_px
        if inl.sum() < 50:
            break
        rvec, _ = cv2.Rodrigues(T[:3, :3])
        ok_, rvec, tvec = cv2.solvePnP(X[inl], target[inl], K_j, None, rvec, T[:3, 3].reshape(3, 1).copy(),
                                       useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok_:
            break
        T_new = as_T(rvec, tvec)
        res_new = residual(T_new)
        if not within_bounds(T_new) or not np.count_nonzero(res_new < inlier_px) > np.count_nonzero(res < inlier_px):
            break
        T, res = T_new, res_new
    return T


def _soft_step(err: np.ndarray, eu: np.ndarray, ev: np.ndarray, cfg: 'SegmentationConfig') -> np.ndarray:
    """(H, W) float32 ``r^s / (1 + r^s)`` of the flow error ``err`` against the tolerance of the ego flow."""
    tol = np.multiply(eu, eu)
    tol += np.multiply(ev, ev, out=np.empty_like(tol))
    np.sqrt(tol, out=tol)
    tol *= np.float32(cfg.flow_rel_tol)
    tol += np.float32(cfg.min_flow_px)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        return soft_step_of_inverse(np.divide(tol, err, out=tol), cfg.steepness)


def ego_explains_appearance(gray_i: np.ndarray, gray_j: np.ndarray, eu: np.ndarray, ev: np.ndarray,
                            flow: np.ndarray, radius: int = 2, where: np.ndarray | None = None,
                            landing: tuple | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(H, W) float32 (and the match error and gain, below): how much better frame j seen through the ego flow looks
    like frame i than seen through the optical flow: the difference of their mean absolute differences over
    (2 radius + 1)^2 pixels, after one gain for the pair (grey levels; > 0: the ego flow explains
    the appearance better; NaN where either warp leaves the image).

    Such a pixel's flow disagreement is a flow failure (DIS losing a large displacement on weak
    texture ends near zero and passes the forward-backward check), not motion: a mover seen through
    the ego flow shows the wrong content. The gain (median ratio of the ego-warped pixels, sampled
    over the whole image) makes it blind to exposure changes between the frames.

    Args:
        gray_i, gray_j: (H, W) uint8 grey images of frames i and j.
        eu, ev: (H, W) float32 ego flow of frame i into j (NaN = none).
        flow: (H, W, 2) float32 optical flow i -> j.
        radius: half-size of the window.
        where: optional (H, W) bool pixels that need the answer: only their bounding box (plus the
            window) is computed, the rest is NaN (the check costs 2 remaps and 4 box filters).
        landing: optional ((H, W), (H, W)) float32 ``u + flow[..., 0]``, ``v + flow[..., 1]`` (where the optical
            flow lands, as :func:`pair_probability_and_landing` gives it), instead of adding them here.
    Returns:
        (the difference, the match error, the gain): the (H, W) float32 mean absolute difference (after the gain) of
        frame j seen through the optical flow alone (how well the flow's match looks like frame i; NaN where
        it leaves the image or outside ``where``'s box): the one verdict left where the ego warp has none
        (see :func:`flow_match_unconfirmed`); and the pair's gain (1.0 when ``where`` is empty).
    """
    h, w = gray_i.shape
    out = np.full((h, w), np.nan, np.float32)
    match = np.full((h, w), np.nan, np.float32)
    if where is not None and not where.any():
        return out, match, 1.0
    gj = np.asarray(gray_j, dtype=np.float32)
    u, v = pixel_axes(h, w)
    lost = np.float32(-1e4)  # where there is no ego flow: outside the image (the border's NaN)
    # one gain for the pair, from every 7th pixel of the image
    sub = (slice(3, None, 7), slice(3, None, 7))
    es = cv2.remap(gj, np.fmax(u[:, 3::7] + eu[sub], lost), np.fmax(v[3::7] + ev[sub], lost), cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    gain = exposure_gain(es, np.asarray(gray_i[sub], dtype=np.float32))
    y0, y1, x0, x1 = 0, h, 0, w
    if where is not None:
        rows, cols = np.flatnonzero(where.any(1)), np.flatnonzero(where.any(0))
        y0, y1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, h)
        x0, x1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, w)
    box = (slice(y0, y1), slice(x0, x1))
    ub, vb = u[:, x0:x1], v[y0:y1]
    # in place where possible (fresh image-sized temporaries cost page faults)
    mx = np.add(ub, eu[box])
    my = np.add(vb, ev[box])
    ego = cv2.remap(gj, np.fmax(mx, lost, out=mx), np.fmax(my, lost, out=my), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    if landing is None:
        fu, fv = cv2.split(np.asarray(flow[box], dtype=np.float32))
        opt = cv2.remap(gj, np.add(ub, fu, out=mx), np.add(vb, fv, out=my), cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    else:  # (the same float32 sums)
        opt = cv2.remap(gj, np.ascontiguousarray(landing[0][box]), np.ascontiguousarray(landing[1][box]),
                        cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
        fu = np.empty_like(mx)
    gi = np.multiply(np.asarray(gray_i[box], dtype=np.float32), np.float32(gain), out=fu)
    win = (2 * radius + 1, 2 * radius + 1)
    means = [_nan_box_mean_of_abs(np.subtract(x, gi, out=x), win, buf) for x, buf in ((opt, mx), (ego, my))]
    match[box] = means[0]
    out[box] = np.subtract(means[0], means[1], out=means[0])
    return out, match, gain


# a pair whose flow passes the forward-backward check on less than this share of the pixels that both frames see
# (the ego flow keeps them in view) lost the displacement (static_effects 700, the long pairs with border evidence:
# 1-28 % where the camera turned 8-9 degrees, 36-65 % on shorter ones; stop_and_go 104's long pairs, a person
# walking into view: 77-100 %)
FLOW_FAILED_SHARE = 0.5


def flow_match_unconfirmed(better: np.ndarray, match: np.ndarray, eu: np.ndarray, ev: np.ndarray, tol: float,
                           valid: np.ndarray | None) -> np.ndarray:
    """(H, W) bool pixels of a failed flow whose motion evidence nothing confirms: the ego flow leaves frame j
    (the static hypothesis puts the point out of its view), so the photometric check has no verdict
    (``better`` NaN), frame j seen through the optical flow does not look like frame i (``match`` above
    ``tol`` grey levels), and the pair's flow failed: it passes the forward-backward check (``valid``) on
    less than :data:`FLOW_FAILED_SHARE` of the pixels the ego flow keeps in view.

    There the flow found no correspondence: DIS losing a long pair's large displacement fails the
    forward-backward check over most of the view, but near the border, where the points left the other
    frame, its near-zero flow passes it both ways; that is no motion (it flagged the border of a static
    scene). A mover that follows the camera at the border looks the same through its flow and keeps its
    evidence; in a pair whose flow holds elsewhere, an unmatched border pixel (a person walking into view,
    a camouflaged mover) keeps it too: nothing says the flow failed there. Pixels without depth (no ego
    flow) are not judged here.

    Args:
        better, match: (H, W) float32 of :func:`ego_explains_appearance`.
        eu, ev: (H, W) float32 ego flow of frame i into j (NaN = none).
        tol: mean absolute grey difference (5 x 5, after one gain) above which the match is none.
        valid: (H, W) bool forward-backward consistent pixels of the pair, or None (unknown: not failed).
    """
    h, w = better.shape
    if valid is None:
        return np.zeros((h, w), bool)
    u, v = pixel_axes(h, w)
    with np.errstate(invalid='ignore'):
        tu, tv = np.add(u, eu), np.add(v, ev)
        inside = (tu >= 0) & (tu <= w - 1) & (tv >= 0) & (tv <= h - 1)  # (NaN: False)
    seen = np.count_nonzero(inside)
    if seen and np.count_nonzero(inside & np.asarray(valid, dtype=bool)) >= FLOW_FAILED_SHARE * seen:
        return np.zeros((h, w), bool)  # the flow held on most of the view: no sign that it failed
    with np.errstate(invalid='ignore'):
        out = ~inside & np.isfinite(tu) & np.isfinite(tv)
        out &= np.isnan(better)
        out &= match > np.float32(tol)
    return out


def _nan_box_mean_of_abs(x: np.ndarray, win: tuple[int, int], buf: np.ndarray) -> np.ndarray:
    """:func:`nan_box_mean` of ``|x|`` (float32), overwriting ``x`` and ``buf`` (same shape) and
    returning one of them: the photometric check's hot path without temporaries."""
    ok = x == x  # not NaN
    np.abs(x, out=x)
    np.fmax(x, np.float32(0), out=x)  # NaN -> 0
    s = cv2.boxFilter(x, -1, win, dst=buf, normalize=False)
    n = cv2.boxFilter(ok.view(np.uint8), cv2.CV_32F, win, dst=x, normalize=False)
    with np.errstate(invalid='ignore', divide='ignore'):
        np.divide(s, n, out=s)
    np.copyto(s, np.float32(np.nan), where=n < np.float32(0.5 * win[0] * win[1]))
    return s


def exposure_gain(seen_j: np.ndarray, gray_i: np.ndarray) -> float:
    """:func:`dynrecon_ros.photometric.exposure_gain` (kept here for the segmentation modules)."""
    return photometric.exposure_gain(seen_j, gray_i)


def nan_box_mean(x: np.ndarray, win: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 mean of the finite values of ``x`` in each ``win`` box; NaN where fewer than
    half are finite (OpenCV's box filter runs sums along rows: one NaN would spread over the image)."""
    ok = np.isfinite(x)
    x0 = np.array(x, dtype=np.float32)
    x0[~ok] = 0
    s = cv2.boxFilter(x0, -1, win, normalize=False)
    n = cv2.boxFilter(ok.view(np.uint8), cv2.CV_32F, win, normalize=False)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(n >= np.float32(0.5 * win[0] * win[1]), s / n, np.float32(np.nan))


def pair_probability(depth_i, K_i, T_j_i, flow, valid, cfg, K_j=None,
                     candidates=None, shutter=None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """:func:`pair_dynamic_probability` plus the depth of frame i's points in camera j and their ego flow
    (:func:`pair_probability_and_landing` without the landing maps)."""
    return pair_probability_and_landing(depth_i, K_i, T_j_i, flow, valid, cfg, K_j, candidates, shutter)[:3]


def pair_probability_and_landing(depth_i, K_i, T_j_i, flow, valid, cfg, K_j=None,
                                 candidates=None, shutter=None) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """:func:`pair_dynamic_probability` plus the (H, W) depth of frame i's points in camera j and
    their ego flow ``(eu, ev)`` ((H, W) each; NaN where frame i has no depth).

    Pixels of frame i without a depth reading (within ``cfg.hole_fill_px`` of one) are judged too:
    their flow is compared with the ego flow of the nearest and of the farthest reading around
    the hole (:func:`~dynrecon_ros.depth_cue.fill_candidates`) and the better fit counts, so a hole
    on a silhouette is static only if its flow moves with one of the two surfaces it borders.
    ``candidates``: that function's result for ``depth_i`` when the caller has it (one per frame).
    shutter: optional rolling-shutter timing and twists of the pair (:func:`_ego_planes`).
    Also returned: where the optical flow lands in frame j, ``(u + flow_u, v + flow_v)`` ((H, W) float32 each).
    """
    if cfg.refine_pose:
        T_j_i = refine_relative_pose(np.asarray(depth_i, dtype=np.float32), K_i, T_j_i, flow, valid, K_j)
    eu, ev, zj = _ego_planes(depth_i, K_i, T_j_i, K_j, shutter)
    flow = np.asarray(flow, dtype=np.float32)
    fu, fv = cv2.split(flow)  # contiguous planes: faster arithmetic than strided views
    err = _edge_tolerant_error(eu, ev, fu, fv, cfg.edge_radius_px)
    prob = _soft_step(err, eu, ev, cfg)
    if cfg.hole_fill_px > 0:
        holes, near, far = candidates or fill_candidates(np.asarray(depth_i, dtype=np.float32), cfg.hole_fill_px)
        if holes.any():  # judged at the hole pixels only
            ys, xs = np.nonzero(holes)
            # a pixel without a reading may also see a surface beyond the sensor's range (a far wall
            # beside a mover): its ego flow is the rotation's, that of a point BEYOND_RANGE_M away.
            # The three candidates of the M hole pixels in one (3 M,) call (elementwise: the same values)
            z = np.concatenate([near[ys, xs], far[ys, xs], np.full(len(ys), BEYOND_RANGE_M, np.float32)])
            cu, cv_, _ = ego_at(np.tile(xs.astype(np.float32), 3), np.tile(ys.astype(np.float32), 3), z, K_i,
                                T_j_i, K_j, None if shutter is None else (*shutter, prob.shape[0]))
            du, dv = cu - np.tile(fu[ys, xs], 3), cv_ - np.tile(fv[ys, xs], 3)
            fits = _soft_step(np.sqrt(du * du + dv * dv), cu, cv_, cfg).reshape(3, -1)
            prob[ys, xs] = np.fmin(np.fmin(fits[0], fits[1]), fits[2])
    h, w = prob.shape
    u, v = pixel_axes(h, w)
    # flow that leaves the image cannot be checked: no evidence. Ego flow may leave it: a pixel
    # whose flow finds a consistent match inside the image where the static hypothesis says it
    # was out of view (a mover entering at the border, following the camera) is evidence of motion
    tu, tv = np.add(u, fu, out=fu), np.add(v, fv, out=fv)
    keep = (tu >= 0) & (tu <= w - 1)
    keep &= tv >= 0
    keep &= tv <= h - 1
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool)
    np.copyto(prob, np.float32(np.nan), where=~keep)  # (NaN evidence stays NaN)
    return prob.astype(np.float32, copy=False), zj, (eu, ev), (tu, tv)


def pull_from_source(prob_i: np.ndarray, flow_ji: np.ndarray, valid_ji: np.ndarray | None) -> np.ndarray:
    """Carry frame i's per-pixel values to frame j by sampling them where j's flow j -> i leads.

    Args:
        prob_i: (H, W) float32 values of frame i (NaN = none).
        flow_ji: (H, W, 2) flow j -> i.
        valid_ji: (H, W) bool forward-backward consistent pixels of j (occluded in i: False), or None.

    Returns:
        (H, W) float32 values in frame j, NaN where there is none (outside i, not valid, or a NaN
        within the bilinear footprint).
    """
    h, w = prob_i.shape
    m = np.asarray(flow_ji, dtype=np.float32) + pixel_grid(h, w)
    out = cv2.remap(np.asarray(prob_i, dtype=np.float32), m, None, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=float('nan'))
    if valid_ji is not None:
        out[~np.asarray(valid_ji, dtype=bool)] = np.nan
    return out


def splat_to_target(prob_i: np.ndarray, flow: np.ndarray, z_j: np.ndarray) -> np.ndarray:
    """Carry frame i's per-pixel values to frame j along the flow i -> j.

    Each source pixel lands on the 2 x 2 pixels around its target (no pinholes from rounding); where
    several land on one pixel the nearest to camera j wins (z-buffer), so background that the mover
    occludes in j does not overwrite the mover. Hand-written: OpenCV has no forward warp.

    Args:
        prob_i: (H, W) float32 values of frame i (NaN = none).
        flow: (H, W, 2) flow i -> j.
        z_j: (H, W) depth of frame i's points in camera j (NaN = unknown).

    Returns:
        (H, W) float32 values in frame j, NaN where nothing landed.
    """
    h, w = prob_i.shape
    g = pixel_grid(h, w)
    u, v = g[..., 0], g[..., 1]
    uj = u + flow[..., 0]
    vj = v + flow[..., 1]
    ok = np.isfinite(prob_i) & np.isfinite(uj) & np.isfinite(vj) & np.isfinite(z_j)
    uj, vj, val, zz = uj[ok], vj[ok], prob_i[ok], z_j[ok]
    u0, v0 = np.floor(uj).astype(np.int64), np.floor(vj).astype(np.int64)
    tu = np.concatenate([u0, u0 + 1, u0, u0 + 1])
    tv = np.concatenate([v0, v0, v0 + 1, v0 + 1])
    val, zz = np.tile(val, 4), np.tile(zz, 4)
    inside = (tu >= 0) & (tu < w) & (tv >= 0) & (tv < h)
    idx, val, zz = (tv * w + tu)[inside], val[inside], zz[inside]
    # z-buffer: the nearest source per target pixel wins
    zmin = np.full(h * w, np.inf, dtype=np.float32)
    np.minimum.at(zmin, idx, zz)
    win = zz <= zmin[idx]
    out = np.full(h * w, np.nan, dtype=np.float32)
    out[idx[win]] = val[win]
    return out.reshape(h, w)


def matched_scenery_elsewhere(cand: np.ndarray, landing: tuple, gray_i: np.ndarray, gray_j: np.ndarray,
                              depth_j: np.ndarray, K_i, K_j, T_i_j, gain: float, tol: float,
                              radius: int = 2) -> np.ndarray:
    """(H, W) bool: the ``cand`` pixels of frame i whose optical flow landed on a point of frame j that the
    static hypothesis shows elsewhere in frame i, looking the same there (mean absolute grey difference over
    (2 radius + 1)^2 pixels at most ``tol`` after the pair's ``gain``).

    Such a match says nothing about the pixel: frame i already shows that point at its own place, as scenery
    (the pixel looks like it: a repeated or weak texture). It is the case of static content entering the
    view beside a near edge under a pan: the ego flow puts the pixel out of frame j's view (so the
    photometric check has no verdict), and DIS's near-zero flow at the border finds the wall beside it
    and passes the forward-backward check (stop_and_go 922's held border strip). A mover seen in j is
    not where the static hypothesis puts its point in frame i: what frame i shows there differs (unless
    the mover and what lies there look alike, and then nothing tells them apart).

    Args:
        cand: (H, W) bool pixels of frame i to judge (few: the work is per pixel).
        landing: ((H, W), (H, W)) float32 where the optical flow i -> j lands in frame j.
        gray_i, gray_j: (H, W) grey images of frames i and j.
        depth_j: (H, W) float32 depth of frame j (0 or NaN = none: no verdict).
        K_i, K_j: (3, 3) intrinsics; T_i_j: (4, 4) pose of camera j in camera i's frame.
        gain: frame j's brightness over frame i's (:func:`exposure_gain`).
        tol: grey levels.
    """
    h, w = cand.shape
    out = np.zeros((h, w), bool)
    ys, xs = np.nonzero(cand)
    if not len(ys):
        return out
    lu, lv = landing[0][ys, xs], landing[1][ys, xs]
    z = np.asarray(depth_j, dtype=np.float32)[np.clip(np.rint(lv), 0, h - 1).astype(np.intp),
                                              np.clip(np.rint(lu), 0, w - 1).astype(np.intp)]
    du, dv, _ = ego_at(lu, lv, z, K_j, T_i_j, K_i)
    pu, pv = lu + du, lv + dv  # where frame i shows that point if it is scenery
    with np.errstate(invalid='ignore'):
        ok = (pu >= 0) & (pu <= w - 1) & (pv >= 0) & (pv <= h - 1)  # (NaN: False)
        ok &= np.hypot(pu - xs, pv - ys) > 1.0  # (there, the flow agrees with the ego flow)
    if not ok.any():
        return out
    ys, xs = ys[ok], xs[ok]
    o = np.arange(-radius, radius + 1, dtype=np.float32)
    ou, ov = np.tile(o, len(o)), np.repeat(o, len(o))

    def samples(img, cu, cv_):  # (M, (2 radius + 1)^2) bilinear samples around (cu, cv_) (M,)
        # laid out 1024 to a row: cv2.remap takes fewer than 32767 rows and columns
        mu = (cu[:, None] + ou).ravel()
        mv = (cv_[:, None] + ov).ravel()
        pad = -len(mu) % 1024
        mu, mv = (np.concatenate([m, np.zeros(pad, np.float32)]).reshape(-1, 1024) for m in (mu, mv))
        # (a NaN border would spoil the last row and column too: OpenCV weighs the pixel beyond by 0)
        got = cv2.remap(np.asarray(img, dtype=np.float32), mu, mv, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        with np.errstate(invalid='ignore'):
            np.copyto(got, np.float32(np.nan), where=~((mu >= 0) & (mu <= w - 1) & (mv >= 0) & (mv <= h - 1)))
        return got.ravel()[:len(cu) * len(ou)].reshape(len(cu), len(ou))

    seen_j = samples(gray_j, lu[ok], lv[ok])
    seen_i = samples(gray_i, pu[ok], pv[ok])
    with np.errstate(invalid='ignore'):
        diff = np.abs(seen_j - np.float32(gain) * seen_i)
        n = np.count_nonzero(diff == diff, axis=1)  # not NaN
        mean = np.nansum(diff, axis=1) / np.maximum(n, 1)
    out[ys, xs] = (n >= 0.5 * len(ou)) & (mean <= np.float32(tol))
    return out
