"""Stage 6, motion segmentation (MonST3R style): a pixel is dynamic when its optical flow disagrees
with the flow that the camera motion and the depth of its frame induce ("ego flow").

For every pair (i, j) of a window the ego flow of frame i in frame j is computed from the aligned
poses and depth of i; the per-pixel error ``e = ||ego flow - optical flow||`` (on pixels whose flow
passed the forward-backward check) is turned into a dynamic probability, averaged over all pairs a
frame is in (a frame that is only ever the target j of a pair gets the evidence carried along the
flow, z-buffered), smoothed over time (state keyed by frame key, so a frame seen by several
overlapping windows gets a stable mask) and cleaned (:func:`clean_mask`): threshold, morphological
opening and closing, small regions dropped, boundaries snapped to depth edges (flow bleeds across
silhouettes; depth does not), and background that the flow smeared between or beside movers
dropped (depth valleys between masked pixels; mask pieces depth-continuous with their surroundings).

Normalisation (a deliberate difference to MonST3R): MonST3R min-max normalises the error per pair,
which turns the largest *noise* of a pair without any mover into "dynamic". With metric depth and
metric poses the error has a meaning in pixels, so we use an absolute model instead: the tolerance
of a pixel is ``tol = min_flow_px + flow_rel_tol * ||ego flow||`` (flow error grows with the flow:
depth noise scales the translational flow, pose noise the rotational one) and the per-pair dynamic
probability is the soft step ``p = r^s / (1 + r^s)`` with ``r = e / tol`` and ``s = steepness``:
0 at zero error, 0.5 at the tolerance, ~1 well beyond it (s = 4: r = 0.5 -> 0.06, r = 2 -> 0.94).
A static scene thus yields ~0 everywhere.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from dynrecon_ros.errors import InputError


@dataclass
class SegmentationConfig:
    """Parameters of motion segmentation (they become ROS parameters, same names).

    Attributes:
        enabled: when False, :meth:`MotionSegmenter.segment` returns all-static masks.
        mode: 'flow' (MonST3R: optical flow vs ego flow), 'attention' (Easi3R: the network's
            cross-attention, network backends only) or 'both' (union of the two masks).
        threshold: dynamic where the smoothed probability exceeds it (0..1).
        hysteresis: pixels above ``hysteresis * threshold`` connected to pixels above ``threshold``
            are dynamic too (weak evidence inside a slow mover); 1 disables.
        min_flow_px: absolute flow tolerance in pixels (flow noise of DIS on textured regions).
        flow_rel_tol: extra tolerance as a fraction of the ego-flow magnitude (depth/pose noise).
        steepness: exponent s of the soft step ``r^s / (1 + r^s)``, r = error / tolerance.
        refine_pose: refine each pair's relative pose on the flow of the pixels that agree with it
            before computing the ego flow (:func:`refine_relative_pose`, like MonST3R's two-view
            alignment), so pose errors of a few tenths of a degree do not flag the background.
            Off by default: the RGB-D poses after windowed alignment are good to ~0.01 degree, and
            the PnP refinement on DIS flow cost time and lowered the bench's mask IoU (0.89 -> 0.86).
        edge_radius_px: the error of a pixel is the smallest in this radius (pixels), so depth
            edges a pixel off do not light up as motion; 0 disables.
        open_px: radius in pixels of the morphological opening (ellipse) that removes specks; 0 disables.
        close_px: radius in pixels of the closing that fills holes inside movers; 0 disables.
        snap_px: mask boundaries within this many pixels move onto depth edges (flow bleeds
            across silhouettes; depth does not); 0 disables.
        max_continuity: mask pieces (cut at depth steps) whose boundary is depth-continuous with
            their surroundings for more than this fraction are background smeared by the flow and are
            dropped (:func:`drop_background_segments`); 1 disables.
        dilate_px: radius of a final dilation that covers the soft boundary of movers; 0 disables.
        min_area_frac: connected dynamic regions smaller than this fraction of the image are dropped.
        temporal_weight: weight (0..1) of the evidence remembered from earlier windows for a frame
            key relative to the evidence of the current window (0 = no memory).
        max_tracked_frames: at most this many frame keys are remembered.
        forget_after_calls: a frame key not seen in this many calls is forgotten.
        threads: threads for the per-pair and per-frame work of one call (NumPy and OpenCV release
            the GIL in their loops, so a second core shares it); 1 = all on the calling thread.
        attention_min_contrast: optional no-motion guard of the attention masks (modes 'attention'
            and 'both'; not Easi3R's, 0 = off, the default): a frame's attention mask is kept only
            when its flagged tokens stand out from the window's other tokens by this robust z-score
            in the raw dynamic-attention score (before Easi3R's per-frame min-max, which stretches
            pure noise to 0..1). 30 clears the motion-free windows and frames of the synthetic tests;
            on the reference's inputs (shared/parity/easi3r) it keeps the planted mover's mask and
            removes the random network's (14-19 % of the pixels, which Easi3R flags).
        attention_min_separation: optional guard (not Easi3R's, 0 = off, the default): the window's
            attention masks are dropped unless the pixels above the Otsu level exceed those below by
            this many standard deviations of the lower part (4 clears the synthetic motion-free
            windows of the unit tests but kept one frame's noise (38 %) of ten on the oracle's
            motion-free stream; on the reference's inputs it acts as the contrast guard; one test for
            the whole window, so a window where only some frames move loses all its masks).
    """

    enabled: bool = True
    mode: str = 'flow'
    threshold: float = 0.5
    hysteresis: float = 0.4
    min_flow_px: float = 1.0
    flow_rel_tol: float = 0.15
    steepness: float = 4.0
    refine_pose: bool = False
    edge_radius_px: int = 1
    open_px: int = 3
    close_px: int = 7
    snap_px: int = 6
    max_continuity: float = 0.8
    dilate_px: int = 0
    min_area_frac: float = 0.0005
    temporal_weight: float = 0.7
    max_tracked_frames: int = 64
    forget_after_calls: int = 8
    threads: int = 2
    attention_min_contrast: float = 0.0
    attention_min_separation: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ('flow', 'attention', 'both'):
            raise InputError(f"segmentation.mode must be 'flow', 'attention' or 'both', got {self.mode!r}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f'segmentation threshold must be in (0, 1), got {self.threshold}')
        if not 0.0 < self.hysteresis <= 1.0:
            raise InputError(f'segmentation hysteresis must be in (0, 1], got {self.hysteresis}')
        if self.min_flow_px <= 0 or self.flow_rel_tol < 0 or self.steepness <= 0:
            raise InputError('segmentation min_flow_px and steepness must be > 0, flow_rel_tol >= 0')
        if not 0.0 <= self.temporal_weight < 1.0:
            raise InputError(f'segmentation temporal_weight must be in [0, 1), got {self.temporal_weight}')
        for name in ('edge_radius_px', 'open_px', 'close_px', 'snap_px', 'dilate_px'):
            if getattr(self, name) < 0:
                raise InputError(f'segmentation {name} must be >= 0, got {getattr(self, name)}')
        if self.max_tracked_frames < 1 or self.forget_after_calls < 1 or self.threads < 1:
            raise InputError('segmentation max_tracked_frames, forget_after_calls and threads must be >= 1')
        for name in ('attention_min_contrast', 'attention_min_separation'):
            if getattr(self, name) < 0:
                raise InputError(f'segmentation {name} must be >= 0 (0 = guard off), got {getattr(self, name)}')
        if not 0.0 <= self.max_continuity <= 1.0 or not 0.0 <= self.min_area_frac < 1.0:
            raise InputError('segmentation max_continuity must be in [0, 1] and min_area_frac in [0, 1)')


@lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 u and v pixel coordinates (cached, read-only)."""
    u, v = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


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
    return _ego_flow_and_depth(depth, K, T_j_i, K_j)[0]


def _ego_flow_and_depth(depth, K, T_j_i, K_j=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ego_flow` plus the (H, W) depth of each point in camera j."""
    du, dv, zj = _ego_planes(depth, K, T_j_i, K_j)
    return np.stack([du, dv], axis=-1), zj


def _ego_planes(depth, K, T_j_i, K_j=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W) float32 ego flow du, dv and depth in camera j, NaN where invalid (planes: fast numpy)."""
    depth = np.asarray(depth, dtype=np.float32)
    K = np.asarray(K, dtype=np.float64)
    K_j = K if K_j is None else np.asarray(K_j, dtype=np.float64)
    T = np.asarray(T_j_i, dtype=np.float64)
    h, w = depth.shape
    u, v = _pixel_grid(h, w)
    # camera-i rays (x/z, y/z, 1), then X_j = R (z * ray) + t
    x = (u - np.float32(K[0, 2])) * np.float32(1 / K[0, 0])
    y = (v - np.float32(K[1, 2])) * np.float32(1 / K[1, 1])
    z = depth
    R = T[:3, :3].astype(np.float32)
    t = T[:3, 3].astype(np.float32)
    xj = z * (R[0, 0] * x + R[0, 1] * y + R[0, 2]) + t[0]
    yj = z * (R[1, 0] * x + R[1, 1] * y + R[1, 2]) + t[1]
    zj = z * (R[2, 0] * x + R[2, 1] * y + R[2, 2]) + t[2]
    with np.errstate(invalid='ignore'):
        invalid = ~(np.isfinite(z) & (z > 0) & (zj > 1e-6))
    zj[invalid] = np.nan
    with np.errstate(divide='ignore', invalid='ignore'):
        iz = 1.0 / zj
        du = np.float32(K_j[0, 0]) * xj * iz + np.float32(K_j[0, 1]) * yj * iz + np.float32(K_j[0, 2]) - u
        dv = np.float32(K_j[1, 1]) * yj * iz + np.float32(K_j[1, 2]) - v
    return du.astype(np.float32, copy=False), dv.astype(np.float32, copy=False), zj


def forward_backward_valid(flow_fwd: np.ndarray, flow_bwd: np.ndarray, tol_px: float = 1.0) -> np.ndarray:
    """Forward-backward consistency of a flow pair.

    Args:
        flow_fwd: (H, W, 2) flow from frame i to frame j.
        flow_bwd: (H, W, 2) flow from frame j to frame i.
        tol_px: allowed round-trip error in pixels (plus 5 % of the flow magnitude).

    Returns:
        (H, W) bool, True where following the forward flow and then the backward flow returns to
        within the tolerance of the start pixel and stays inside the image.
    """
    h, w = flow_fwd.shape[:2]
    u, v = _pixel_grid(h, w)
    mx = u + flow_fwd[..., 0]
    my = v + flow_fwd[..., 1]
    back = cv2.remap(np.ascontiguousarray(flow_bwd, dtype=np.float32), mx, my, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    err = np.linalg.norm(flow_fwd + back, axis=-1)
    mag = np.linalg.norm(flow_fwd, axis=-1)
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return inside & np.isfinite(err) & (err <= tol_px + 0.05 * mag)


def _edge_tolerant_error(eu, ev, fu, fv, radius: int) -> np.ndarray:
    """(H, W) flow error ``||ego - flow||``, the smallest within ``radius`` pixels (NaN = no ego flow).

    At depth edges a pixel's depth and its flow can disagree by a pixel; taking the neighbourhood
    minimum (a grey erosion) keeps such edges from lighting up, and shrinks movers by ``radius``
    pixels at most, which the depth-edge snapping of :func:`clean_mask` restores.
    """
    err = np.sqrt((eu - fu) ** 2 + (ev - fv) ** 2)
    if radius > 0:
        own = np.isfinite(err)
        err = cv2.erode(np.where(own, err, np.float32(1e6)).astype(np.float32),
                        np.ones((2 * radius + 1, 2 * radius + 1), np.uint8))
        err[~own] = np.nan
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
    return _pair_probability(depth_i, K_i, T_j_i, flow, valid, cfg, K_j)[0]


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
    X = np.stack([(u - K_i[0, 2]) / K_i[0, 0] * z, (v - K_i[1, 2]) / K_i[1, 1] * z, z], axis=1)
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


def _pair_probability(depth_i, K_i, T_j_i, flow, valid, cfg, K_j=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pair_dynamic_probability` plus the (H, W) depth of frame i's points in camera j."""
    if cfg.refine_pose:
        T_j_i = refine_relative_pose(np.asarray(depth_i, dtype=np.float32), K_i, T_j_i, flow, valid, K_j)
    eu, ev, zj = _ego_planes(depth_i, K_i, T_j_i, K_j)
    flow = np.asarray(flow, dtype=np.float32)
    fu, fv = flow[..., 0], flow[..., 1]
    err = _edge_tolerant_error(eu, ev, fu, fv, cfg.edge_radius_px)
    tol = np.float32(cfg.min_flow_px) + np.float32(cfg.flow_rel_tol) * np.sqrt(eu * eu + ev * ev)
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        rs = (err / tol) ** np.float32(cfg.steepness)
        prob = rs / (1.0 + rs)
        prob[np.isinf(rs)] = 1.0
        h, w = prob.shape
        u, v = _pixel_grid(h, w)
        # flow that leaves the image cannot be checked: no evidence. Ego flow may leave it: a pixel
        # whose flow finds a consistent match inside the image where the static hypothesis says it
        # was out of view (a mover entering at the border, following the camera) is evidence of motion
        bad = ~np.isfinite(prob)
        for du, dv in ((fu, fv),):
            tu, tv = u + du, v + dv
            bad |= ~((tu >= 0) & (tu <= w - 1) & (tv >= 0) & (tv <= h - 1))
    if valid is not None:
        bad |= ~np.asarray(valid, dtype=bool)
    prob[bad] = np.nan
    return prob.astype(np.float32, copy=False), zj


def _pull_from_source(prob_i: np.ndarray, flow_ji: np.ndarray, valid_ji: np.ndarray | None) -> np.ndarray:
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
    m = np.asarray(flow_ji, dtype=np.float32) + np.dstack(_pixel_grid(h, w))
    out = cv2.remap(np.asarray(prob_i, dtype=np.float32), m, None, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=float('nan'))
    if valid_ji is not None:
        out[~np.asarray(valid_ji, dtype=bool)] = np.nan
    return out


def _splat_to_target(prob_i: np.ndarray, flow: np.ndarray, z_j: np.ndarray) -> np.ndarray:
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
    u, v = _pixel_grid(h, w)
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


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * size + 1, 2 * size + 1)) if size > 1 else \
        np.ones((2 * size + 1, 2 * size + 1), np.uint8)


def snap_to_depth_edges(mask: np.ndarray, depth: np.ndarray, radius: int,
                        static_hint: np.ndarray | None = None) -> np.ndarray:
    """Move mask boundaries onto depth discontinuities.

    Optical flow bleeds a few pixels across a mover's silhouette, so the flow-based mask is a band
    too wide or too narrow there. Pixels within ``radius`` of the boundary are re-labelled by depth:
    dynamic when their depth is closer to the mean depth of the confidently dynamic pixels nearby
    (the mask eroded by ``radius``) than to that of the confidently static ones nearby.

    Args:
        mask: (H, W) uint8 0/1.
        depth: (H, W) float32 metres (invalid pixels keep their label).
        radius: band half-width in pixels.
        static_hint: optional (H, W) bool of pixels known static (e.g. low probability) that count
            as confidently static even near the boundary (narrow gaps between movers).

    Returns:
        (H, W) uint8 0/1.
    """
    if radius <= 0 or not mask.any():
        return mask
    k = _kernel(radius)
    dyn = cv2.erode(mask, k)
    stat = 1 - cv2.dilate(mask, k)
    band = (dyn == 0) & (stat == 0)
    if static_hint is not None:
        stat = np.maximum(stat, (static_hint & (dyn == 0)).astype(np.uint8))
    good = (np.isfinite(depth) & (depth > 0)).astype(np.float32)
    d = np.where(good > 0, depth, 0).astype(np.float32)
    win = (4 * radius + 1, 4 * radius + 1)

    def local_mean(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wsel = sel.astype(np.float32) * good
        n = cv2.boxFilter(wsel, -1, win, normalize=False)
        s = cv2.boxFilter(wsel * d, -1, win, normalize=False)
        return s / np.maximum(n, 1e-6), n > 0.5

    d_dyn, has_dyn = local_mean(dyn)
    d_stat, has_stat = local_mean(stat)
    decide = band & (good > 0) & has_dyn
    near_dyn = np.abs(d - d_dyn)
    # with no static reference nearby (a narrow gap between movers) a pixel whose depth is far from
    # the movers' (more than 10 % + 10 cm) is background seen through the gap
    is_dyn = np.where(has_stat, near_dyn < np.abs(d - d_stat), near_dyn < 0.1 * d_dyn + 0.1)
    out = mask.copy()
    out[decide] = is_dyn[decide]
    return out


def drop_background_segments(mask: np.ndarray, depth: np.ndarray, max_continuity: float) -> np.ndarray:
    """Remove parts of a mask that are background seen beside or between movers.

    Flow smears a mover's motion over thin background strips (between two movers, or between a
    mover and the image border) wider than the boundary band of :func:`snap_to_depth_edges`. The
    mask is cut along depth discontinuities (the far-side pixel of every depth step is removed) and
    each piece is checked: a mover is surrounded by depth steps (except where it touches the floor),
    while background is depth-continuous with what lies around it. Pieces whose outside neighbours
    are depth-continuous for more than ``max_continuity`` of their boundary are dropped.

    Args:
        mask: (H, W) uint8 0/1.
        depth: (H, W) float32 metres (0/NaN = invalid).
        max_continuity: 0..1; 1 disables.

    Returns:
        (H, W) uint8 0/1.
    """
    if max_continuity >= 1.0 or not mask.any():
        return mask
    d = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    d = cv2.medianBlur(d, 3)
    good = d > 0
    step = np.float32(0.05) + np.float32(0.05) * d  # a depth step: 5 cm + 5 %
    h, w = d.shape
    far_edge = np.zeros((h, w), bool)
    shifts = ((0, 1), (0, -1), (1, 0), (-1, 0))

    def shifted(a, dy, dx, fill):
        out = np.full_like(a, fill)
        ys, yd = (slice(dy, None), slice(None, h - dy)) if dy >= 0 else (slice(None, h + dy), slice(-dy, None))
        xs, xd = (slice(dx, None), slice(None, w - dx)) if dx >= 0 else (slice(None, w + dx), slice(-dx, None))
        out[yd, xd] = a[ys, xs]  # out[p] = a[p + (dy, dx)]
        return out

    for dy, dx in shifts:
        dq = shifted(d, dy, dx, 0)
        far_edge |= good & (dq > 0) & (dq < d - step)
    # background in a gap between movers is a depth valley: nearer masked pixels on both sides
    # (left and right, or above and below) within `reach` pixels
    reach = max(3, int(0.08 * max(h, w)))
    dm = np.where((mask > 0) & good, d, np.float32(1e6)).astype(np.float32)
    valley = np.zeros((h, w), bool)
    for dy, dx in ((0, 1), (1, 0)):  # horizontal, vertical
        kern = np.ones((1 + dy * (reach - 1), 1 + dx * (reach - 1)), np.uint8)
        # min over [p - reach*e, p] (anchor at the window's end) and over [p, p + reach*e]
        upto = cv2.erode(dm, kern, anchor=(dx * (reach - 1), dy * (reach - 1)),
                         borderType=cv2.BORDER_CONSTANT, borderValue=1e6)
        onwards = cv2.erode(dm, kern, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=1e6)
        before = shifted(upto, -dy, -dx, 1e6)  # p excluded
        after = shifted(onwards, dy, dx, 1e6)
        valley |= good & (before < d - step) & (after < d - step)
    mask = np.where(valley, 0, mask).astype(np.uint8)
    pieces = (mask > 0) & ~far_edge
    n, labels = cv2.connectedComponents(pieces.astype(np.uint8), connectivity=4)
    if n <= 1:
        return mask
    n_out = np.zeros(n)
    n_cont = np.zeros(n)
    # outside pixels that count: unmasked, not in a hole enclosed by the mask, and not in a seam of
    # at most 2 pixels between masked pieces (the unmasked region is eroded); compared 3 pixels out
    nh, hole_labels, stats, _ = cv2.connectedComponentsWithStats((mask == 0).astype(np.uint8), connectivity=4)
    x0, y0 = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    x1, y1 = x0 + stats[:, cv2.CC_STAT_WIDTH], y0 + stats[:, cv2.CC_STAT_HEIGHT]
    touches = (x0 == 0) | (y0 == 0) | (x1 == w) | (y1 == h)
    counts = cv2.erode(((mask == 0) & touches[hole_labels]).astype(np.uint8), np.ones((3, 3), np.uint8),
                       borderType=cv2.BORDER_CONSTANT, borderValue=1) > 0
    for dy, dx in shifts:
        lq = shifted(labels, dy, dx, -1)
        dq = shifted(d, 3 * dy, 3 * dx, 0)
        cq = shifted(counts, 3 * dy, 3 * dx, False)
        border = (labels > 0) & (lq != labels) & cq & good & (dq > 0)
        lab = labels[border]
        n_out += np.bincount(lab, minlength=n)
        n_cont += np.bincount(lab, weights=(np.abs(d - dq) < step)[border], minlength=n)
    background = np.flatnonzero((n_cont > max_continuity * np.maximum(n_out, 1)) & (n_out > 0))
    background = background[background > 0]
    out = mask.copy()
    if background.size:
        out[np.isin(labels, background)] = 0
    out[far_edge & (mask > 0) & ~cv2.dilate(out, np.ones((3, 3), np.uint8)).astype(bool)] = 0
    return out


def clean_mask(prob: np.ndarray, cfg: SegmentationConfig, depth: np.ndarray | None = None) -> np.ndarray:
    """Threshold (with hysteresis, ``cfg.hysteresis``) and clean one probability map.

    Args:
        prob: (H, W) float32 dynamic probability (NaN = no evidence = static).
        cfg: threshold and morphology parameters.
        depth: optional (H, W) float32 metres; when given, boundaries snap to depth edges
            (:func:`snap_to_depth_edges`, ``cfg.snap_px``).

    Returns:
        (H, W) uint8, 255 = dynamic.
    """
    p0 = np.nan_to_num(prob, nan=0.0)
    m = (p0 > cfg.threshold).astype(np.uint8)
    if cfg.hysteresis < 1.0 and m.any():
        # hysteresis: weaker evidence connected to strong evidence is part of the same mover (a slow
        # mover's flow error hovers around the tolerance; partial detections inside a mover would
        # otherwise be dropped as depth-continuous background by drop_background_segments)
        n, lab = cv2.connectedComponents((p0 > cfg.hysteresis * cfg.threshold).astype(np.uint8), connectivity=8)
        keep = np.zeros(n, bool)
        keep[lab[m > 0]] = True
        keep[0] = False
        m = keep[lab].astype(np.uint8)
    if cfg.open_px:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _kernel(cfg.open_px))
    if cfg.close_px:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _kernel(cfg.close_px))
    if cfg.min_area_frac > 0 and m.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < cfg.min_area_frac * m.size)
        small = small[small > 0]
        if small.size:
            m[np.isin(labels, small)] = 0
    if depth is not None and cfg.snap_px:
        m = snap_to_depth_edges(m, depth, cfg.snap_px, np.nan_to_num(prob, nan=1.0) < 0.5 * cfg.threshold)
        m = drop_background_segments(m, depth, cfg.max_continuity)
        if cfg.open_px:
            m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _kernel(cfg.open_px))
    if cfg.dilate_px:
        m = cv2.dilate(m, _kernel(cfg.dilate_px))
    return m * np.uint8(255)


def refine_upsampled_mask(mask: np.ndarray, s: int, depth: np.ndarray | None, prob: np.ndarray,
                          cfg: SegmentationConfig) -> np.ndarray:
    """A mask computed at 1/s of the input size, back at the input size with its edges on the
    input depth's edges.

    The (h, w) mask is repeated over s x s blocks (the block layout of the reconstructor's
    processing size), then pixels within ``cfg.snap_px`` work pixels (snap_px * s input pixels) of its
    boundary are re-labelled by
    :func:`snap_to_depth_edges` on the input-size depth.

    Args:
        mask: (h, w) uint8, 255 = dynamic.
        s: integer factor; the input is (H, W) with H // s == h and W // s == w.
        depth: (H, W) float32 metres of the input (None: no snapping).
        prob: (H, W) float32 dynamic probability at the input size (low = known static).
        cfg: the segmentation parameters (threshold; snap_px = 0 disables the snapping).

    Returns:
        (H, W) uint8, 255 = dynamic.
    """
    H, W = prob.shape
    h, w = mask.shape
    m = cv2.resize((mask > 0).astype(np.uint8), (w * s, h * s), interpolation=cv2.INTER_NEAREST)
    if m.shape != (H, W):
        m = cv2.copyMakeBorder(m, 0, H - h * s, 0, W - w * s, cv2.BORDER_REPLICATE)
    if depth is not None and cfg.snap_px and m.any():
        m = snap_to_depth_edges(m, depth, cfg.snap_px * s, prob < 0.5 * cfg.threshold)
    return m * np.uint8(255)


class MotionSegmenter:
    """Per-window motion segmentation with temporal memory keyed by frame key.

    Memory is bounded: at most ``cfg.max_tracked_frames`` keys, and keys not seen in
    ``cfg.forget_after_calls`` calls are dropped.
    """

    def __init__(self, cfg: SegmentationConfig | None = None):
        self.cfg = cfg or SegmentationConfig()
        self._state: OrderedDict[str, tuple[np.ndarray, np.ndarray, int]] = OrderedDict()
        self._calls = 0
        self._pool = None  # worker threads (cfg.threads > 1), started on first use

    def __len__(self) -> int:
        """Number of frame keys currently remembered."""
        return len(self._state)

    def reset(self) -> None:
        self._state.clear()
        self._calls = 0

    def segment(self, keys: list[str], depths: np.ndarray, K: np.ndarray, poses: np.ndarray,
                flows: dict, flow_valid: dict | None = None,
                target_flows: dict | None = None,
                need_masks: list[bool] | None = None,
                skip_frames: list[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dynamic probability and mask of every frame of a window.

        Args:
            keys: N frame keys (identify frames across overlapping windows).
            depths: (N, H, W) float32 metres.
            K: (3, 3) shared or (N, 3, 3) per-frame intrinsics.
            poses: (N, 4, 4) camera-to-world.
            flows: {(i, j): (H, W, 2) float32 optical flow from frame i to frame j}, window indices.
            flow_valid: {(i, j): (H, W) bool forward-backward consistent}; missing = all valid.
            target_flows: optional {(i, j): ((H, W, 2) flow from frame j to frame i, (H, W) bool valid or
                None)} for pairs of ``flows`` whose frame j gets its evidence carried from i: with it
                j's pixels sample i's probability where their flow leads (a backward warp, cheap; the
                forward-backward check leaves occluded pixels out), without it i's pixels are
                splatted to j along the flow i -> j, z-buffered.
            need_masks: optional N bools: frames whose mask is not needed (False) still have their
                evidence remembered, but their mask is not cleaned and comes back all zero.
            skip_frames: optional N bools: frames whose evidence is not needed at all (True; e.g.
                frames already output, in the window as anchors): nothing is carried to them, their
                memory is not updated, their probability and mask come back all zero.

        Returns:
            probs (N, H, W) float32 in [0, 1] and masks (N, H, W) uint8 (255 = dynamic).
        """
        depths = np.asarray(depths, dtype=np.float32)
        n, h, w = depths.shape
        if len(keys) != n or np.asarray(poses).shape != (n, 4, 4):
            raise InputError(f'segment: {len(keys)} keys, depths {depths.shape}, poses '
                             f'{np.asarray(poses).shape} disagree')
        Ks = np.broadcast_to(np.asarray(K, dtype=np.float64), (n, 3, 3))
        poses = np.asarray(poses, dtype=np.float64)
        self._calls += 1
        if not self.cfg.enabled:
            return np.zeros((n, h, w), np.float32), np.zeros((n, h, w), np.uint8)
        flow_valid = flow_valid or {}
        psum = np.zeros((n, h, w), np.float32)
        pcnt = np.zeros((n, h, w), np.float32)
        inv = np.linalg.inv(poses)

        def add(k: int, p: np.ndarray) -> None:
            ok = np.isfinite(p)
            psum[k] += np.where(ok, p, np.float32(0))
            pcnt[k] += ok

        for (i, j), flow in flows.items():
            if not (0 <= i < n and 0 <= j < n) or i == j:
                raise InputError(f'segment: flow pair ({i}, {j}) is not a pair of the {n}-frame window')
            if np.shape(flow) != (h, w, 2):
                raise InputError(f'segment: flow ({i}, {j}) has shape {np.shape(flow)}, expected {(h, w, 2)}')

        skip = [False] * n if skip_frames is None else [bool(x) for x in skip_frames]

        def pair(item):  # evidence of one pair: [(frame, probability)]
            (i, j), flow = item
            carry = (j, i) not in flows and not skip[j]  # frame j gets the evidence carried along the flow
            if skip[i] and not carry:
                return []
            flow = np.asarray(flow, dtype=np.float32)
            p, zj = _pair_probability(depths[i], Ks[i], inv[j] @ poses[i], flow, flow_valid.get((i, j)),
                                      self.cfg, Ks[j])
            out = [] if skip[i] else [(i, p)]
            if carry:
                if target_flows and (i, j) in target_flows:
                    back, back_valid = target_flows[(i, j)]
                    out.append((j, _pull_from_source(p, back, back_valid)))
                else:
                    out.append((j, _splat_to_target(p, flow, zj)))
            return out

        for ev in self._map(pair, list(flows.items())):  # summed in pair order: deterministic
            for k, p in ev:
                add(k, p)
        probs = np.zeros((n, h, w), np.float32)
        masks = np.zeros((n, h, w), np.uint8)
        for k, key in enumerate(keys):
            if not skip[k]:
                probs[k] = self._remember(key, psum[k], pcnt[k])
        todo = [k for k in range(n) if (need_masks is None or need_masks[k]) and not skip[k]]
        for k, m in zip(todo, self._map(lambda k: clean_mask(probs[k], self.cfg, depths[k]), todo)):
            masks[k] = m
        self._forget()
        return probs, masks

    def _map(self, fn, items: list) -> list:
        """[fn(x) for x in items], on ``cfg.threads`` threads when there is more than one item."""
        if self.cfg.threads <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix='dynrecon-seg')
        return list(self._pool.map(fn, items))

    def segment_newest(self, pairs, pair_flows, carry_back: bool = False, need_masks=None, skip_frames=None):
        """:meth:`segment` over the newest frame of ``pairs`` and its pair partners (the one place that
        assembles a window step's call; the RGB-D and the monocular step both use it).

        Args:
            pairs: [(older entry, newest entry)] of the newest frame's pairs; an entry has ``key``,
                ``frame.depth`` (H, W), ``frame.K`` (3, 3) and ``pose`` (4, 4) camera-to-world.
            pair_flows: one :class:`~dynrecon_ros.flow.PairFlow` per pair (older -> newest).
            carry_back: evidence carried to the older frames along the reverse flow (target_flows).
            need_masks, skip_frames: as :meth:`segment`, one per entry (older ones, then the newest).

        Returns:
            entries (older ones, then the newest), probs (N, H, W) float32, masks (N, H, W) uint8.
        """
        ents = [o for o, _ in pairs] + [pairs[0][1]]
        n = len(ents)
        flows = {(n - 1, k): pf.bwd for k, pf in enumerate(pair_flows)}
        valid = {(n - 1, k): pf.valid_bwd for k, pf in enumerate(pair_flows)}
        back = {(n - 1, k): (pf.fwd, pf.valid_fwd) for k, pf in enumerate(pair_flows)} if carry_back else None
        probs, masks = self.segment([e.key for e in ents], np.stack([e.frame.depth for e in ents]),
                                    np.stack([e.frame.K for e in ents]), np.stack([e.pose for e in ents]),
                                    flows, valid, target_flows=back, need_masks=need_masks, skip_frames=skip_frames)
        return ents, probs, masks

    def segment_frame(self, key: str, depth: np.ndarray, K: np.ndarray, pose: np.ndarray,
                      neighbours: list) -> tuple[np.ndarray, np.ndarray]:
        """Cheap path for one frame (e.g. the newest): its pairs with a few neighbours only.

        Shares the temporal memory with :meth:`segment` (same keys), so a later window refines it.

        Args:
            key: the frame key.
            depth: (H, W) float32 metres.
            K: (3, 3) intrinsics (shared by the neighbours).
            pose: (4, 4) camera-to-world of this frame.
            neighbours: list of ``(pose_j (4, 4) camera-to-world, flow (H, W, 2) from this frame to
                frame j, valid (H, W) bool or None)``.

        Returns:
            prob (H, W) float32 in [0, 1] and mask (H, W) uint8 (255 = dynamic).
        """
        depth = np.asarray(depth, dtype=np.float32)
        h, w = depth.shape
        self._calls += 1
        if not self.cfg.enabled:
            return np.zeros((h, w), np.float32), np.zeros((h, w), np.uint8)
        pose = np.asarray(pose, dtype=np.float64)
        psum = np.zeros((h, w), np.float32)
        pcnt = np.zeros((h, w), np.float32)
        for pose_j, flow, valid in neighbours:
            flow = np.asarray(flow, dtype=np.float32)
            if flow.shape != (h, w, 2):
                raise InputError(f'segment_frame {key}: flow has shape {flow.shape}, expected {(h, w, 2)}')
            p, _ = _pair_probability(depth, K, np.linalg.inv(np.asarray(pose_j, dtype=np.float64)) @ pose,
                                     flow, valid, self.cfg)
            ok = np.isfinite(p)
            psum[ok] += p[ok]
            pcnt[ok] += 1.0
        prob = self._remember(key, psum, pcnt)
        mask = clean_mask(prob, self.cfg, depth)
        self._forget()
        return prob, mask

    def _remember(self, key: str, psum: np.ndarray, pcnt: np.ndarray) -> np.ndarray:
        """Blend this window's evidence for ``key`` with the remembered one; (H, W) probability."""
        a = self.cfg.temporal_weight
        if key in self._state and a > 0:
            osum, ocnt, _ = self._state.pop(key)
            if osum.shape == psum.shape:
                # the old evidence keeps weight a relative to the new (both normalised to one count)
                old = osum / np.maximum(ocnt, 1e-6)
                new = psum / np.maximum(pcnt, 1e-6)
                wo = a * (ocnt > 0)
                wn = (1 - a) * (pcnt > 0)
                psum = (wo * old + wn * new).astype(np.float32)
                pcnt = (wo + wn).astype(np.float32)
        self._state[key] = (psum, pcnt, self._calls)
        with np.errstate(invalid='ignore', divide='ignore'):
            prob = np.where(pcnt > 0, psum / np.maximum(pcnt, 1e-6), 0.0)
        return np.clip(prob, 0.0, 1.0).astype(np.float32)

    def _forget(self) -> None:
        stale = [k for k, (_, _, seen) in self._state.items() if self._calls - seen >= self.cfg.forget_after_calls]
        for k in stale:
            del self._state[k]
        while len(self._state) > self.cfg.max_tracked_frames:
            self._state.popitem(last=False)
