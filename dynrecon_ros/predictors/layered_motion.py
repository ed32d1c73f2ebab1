"""The scene's rigid motion in a pair that has no mask prior yet (a stream's first pair): of the flow fit's
hypotheses, refined and judged at the noise scale, the motion of what lies behind when two rigid motions
have comparable support (:func:`layered_choice`; used by :func:`~dynrecon_ros.predictors.rgbd.ransac_rigid`
under either shutter, :func:`layered_hypothesis` for a global shutter).
"""
from __future__ import annotations

import numpy as np

from dynrecon_ros.geometry import fit_rigid
from dynrecon_ros.predictors.rgbd import _msac as msac
from dynrecon_ros.predictors.rgbd import reprojection_errors
from dynrecon_ros.predictors.row_skew import inlier_median

# layered_choice: of two rigid motions with disjoint consensus sets (overlap under LAYER_MAX_OVERLAP), the one
# whose points lie behind (median depth LAYER_DEPTH_RATIO x or more) is the scene's when its support is at least
# LAYER_MIN_SUPPORT x the other's. Found on the default sequence, seed 906: a rigid mover 1 m away over half the view
# has 340 grid points at the flow's noise, the room 4-5 m behind it 260 (docs/MEASUREMENTS.md).
LAYER_MIN_SUPPORT = 0.5
LAYER_DEPTH_RATIO = 1.5
LAYER_MAX_OVERLAP = 0.2


def refine_hypotheses(T: np.ndarray, P: np.ndarray, Q: np.ndarray, uv: np.ndarray, K: np.ndarray,
                      px_threshold: float, rel_depth_threshold: float, rounds: int, min_px_threshold: float):
    """Hypotheses T (k, 4, 4) refined as :func:`~dynrecon_ros.predictors.row_skew.local_fits` refines them
    under a rolling shutter, for a global shutter: ``rounds`` of weighted rigid fits (1/z^2) on each one's
    inliers while its pixel threshold shrinks (x 0.6 a round, and to 3 robust sigmas of the inliers, not below
    min_px_threshold). Returns (T (k, 4, 4), pixel errors (k, N), relative depth errors (k, N), median pixel
    and relative depth error of the final inliers (k,) each (the thresholds where a row has none), their
    count (k,))."""
    k = len(T)
    w = 1.0 / np.maximum(P[:, 2], 0.1) ** 2
    thr = np.full(k, float(px_threshold))
    e, ez = reprojection_errors(T[:, :3, :3], T[:, :3, 3], P, Q, uv, K)
    inl = (e < thr[:, None]) & (ez < rel_depth_threshold)
    for _ in range(rounds):
        fitted = fit_rigid(np.broadcast_to(Q, (k,) + Q.shape), np.broadcast_to(P, (k,) + P.shape), w * inl)
        T = np.where((inl.sum(1) >= 3)[:, None, None], fitted, T)
        e, ez = reprojection_errors(T[:, :3, :3], T[:, :3, 3], P, Q, uv, K)
        thr = np.clip(np.minimum(0.6 * thr, 3.0 * 1.4826 * inlier_median(e, inl)), min_px_threshold, thr)
        inl = (e < thr[:, None]) & (ez < rel_depth_threshold)
    med, medz = inlier_median(e, inl), inlier_median(ez, inl)
    return (T, e, ez, np.where(np.isfinite(med), med, px_threshold),
            np.where(np.isfinite(medz), medz, rel_depth_threshold), inl.sum(1))


def layered_choice(e: np.ndarray, ez: np.ndarray, med: np.ndarray, medz: np.ndarray, count: np.ndarray,
                   z: np.ndarray) -> int:
    """Index of the scene's motion among k refined fits of a pair that has no mask prior yet (a stream's first
    pair), from their pixel and relative depth errors e, ez (k, N), the median of each over its final inliers
    med, medz (k,), their count (k,) and the N points' depths z (N,).

    Why: a rigid mover close to the camera over half the view (the default sequence, seed 906: 1 m away, the
    room 4-5 m behind) has as many correspondences as the room. By the wide score (0.75 px, 2 % of depth) the
    best hypothesis is then "the camera moved with the mover", which also fits the far room to a fraction of a
    pixel (a translation traded for a rotation): 48 mm off, and its masks, poses and map follow for the next
    frames. Here the fits are judged by MSAC at the noise scale, 2 x the smallest median pixel and relative
    depth residual of the fits that kept a consensus: there the compromise no longer fits (its depth residuals
    are ~4x the noise), and the mover's and the room's own motions are left, each fitting only its own points.
    Of two such motions with disjoint consensus sets, the one behind is the scene's (a mover is in front of the
    scene it moves through; see LAYER_MIN_SUPPORT)."""
    kept = count >= max(6, count.max() // 4)
    if not kept.any():
        kept = count == count.max()
    cost = msac(e, ez, 2.0 * med[kept].min(), 2.0 * medz[kept].min()).sum(1)
    k = int(np.argmin(cost))
    # each fit's own consensus (3 robust sigmas of its residuals) and how deep its points lie
    own = (e < 3.0 * 1.4826 * med[:, None]) & (ez < 3.0 * 1.4826 * medz[:, None])
    size = own.sum(1)
    depth = inlier_median(np.broadcast_to(z, own.shape), own)
    overlap = (own & own[k]).sum(1) / np.maximum(size, 1)
    behind = np.flatnonzero((overlap < LAYER_MAX_OVERLAP) & (size >= LAYER_MIN_SUPPORT * size[k])
                            & (depth >= LAYER_DEPTH_RATIO * depth[k]))
    if len(behind):
        k = int(behind[np.argmin(cost[behind])])
    return k


def layered_hypothesis(T: np.ndarray, P: np.ndarray, Q: np.ndarray, uv: np.ndarray, K: np.ndarray,
                       px_threshold: float, rel_depth_threshold: float, rounds: int,
                       min_px_threshold: float) -> np.ndarray:
    """The scene's motion (4, 4) among hypotheses T (k, 4, 4) of a pair that has no mask prior yet under a
    global shutter, P, Q, uv, K as :func:`~dynrecon_ros.predictors.rgbd.ransac_rigid`'s: every hypothesis
    refined (:func:`refine_hypotheses`), then :func:`layered_choice`. Costs ~50 ms at k = 64, once per stream:
    later pairs have the masks as their prior."""
    T, e, ez, med, medz, count = refine_hypotheses(T, P, Q, uv, K, px_threshold, rel_depth_threshold, rounds,
                                                   min_px_threshold)
    return T[layered_choice(e, ez, med, medz, count, P[:, 2])]
