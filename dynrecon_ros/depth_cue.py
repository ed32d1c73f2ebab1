"""Motion segmentation, the geometric cue: measured depth against the depth the camera motion predicts.

Frame i's point at pixel p (depth z_i) moved by the relative camera motion lands in frame j at pixel
q with depth z_pred. If the scene is static there, frame j measures about z_pred at q. If j
measures clearly *farther* there, the surface that i saw at p is gone: p shows something that moved
(a person who walked on, or who stepped toward or away from the camera: little optical flow, large
depth change). If j measures clearly *nearer*, something else stands in front in j (an occluder or
a mover arriving there): no evidence about p either way (NaN). The comparison uses j's nearest
reading within one pixel of q (the minimum over 3 x 3), so depth edges a pixel off never count as
"farther".

Noise model: a depth reading of z metres has the axial standard deviation of a structured-light
sensor (Kinect v1, Nguyen et al. 2012) ``sigma(z) = depth_sigma_a + depth_sigma_b * (z - 0.4)^2``;
the tolerance of the difference is ``depth_tol_sigmas * sqrt(sigma(z_pred)^2 + sigma(z_j)^2) +
depth_rel_tol * z_pred`` (the relative part covers pose error and depth taken a few ms off the
colour), and the per-pair probability is the same soft step as the flow cue's,
``r^s / (1 + r^s)``, r = (z_j - z_pred) / tolerance for r > 0, 0 for small |r|.

Also here: candidate depths for pixels without a reading (:func:`fill_candidates`), so the flow cue
can still judge them: the nearest and the farthest reading around a hole (a hole on a silhouette
borders both the mover and the background; the pixel is static if its flow fits either).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.geometry import pixel_grid

if TYPE_CHECKING:
    from dynrecon_ros.segmentation import SegmentationConfig

_SQUARE3 = np.ones((3, 3), np.uint8)


def depth_sigma(z: np.ndarray, a: float, b: float) -> np.ndarray:
    """(H, W) axial depth noise (metres) of readings ``z`` (metres): ``a + b (z - 0.4)^2``."""
    return np.float32(a) + np.float32(b) * (z - np.float32(0.4)) ** 2


def nearest_reading(depth: np.ndarray) -> np.ndarray:
    """(H, W) float32: the smallest valid reading in each 3 x 3 neighbourhood; inf where none is valid."""
    d = np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(np.inf)).astype(np.float32)
    return cv2.erode(d, _SQUARE3, borderType=cv2.BORDER_CONSTANT, borderValue=np.inf)


def pair_depth_probability(z_pred: np.ndarray, eu: np.ndarray, ev: np.ndarray, near_j: np.ndarray,
                           cfg: 'SegmentationConfig') -> np.ndarray:
    """Dynamic probability of frame i's pixels from frame j's depth (see the module docstring).

    Args:
        z_pred: (H, W) float32 depth of frame i's points in camera j (NaN = invalid).
        eu, ev: (H, W) float32 ego flow of frame i's pixels into frame j (NaN = invalid).
        near_j: (H, W) float32 :func:`nearest_reading` of frame j's depth.
        cfg: depth_sigma_a, depth_sigma_b, depth_tol_sigmas, depth_rel_tol, steepness.

    Returns:
        (H, W) float32 in [0, 1]; NaN where there is no evidence (no depth, lands outside j or on
        j's holes, or something nearer stands in front in j).
    """
    h, w = z_pred.shape
    m = np.nan_to_num(pixel_grid(h, w) + np.dstack([eu, ev]), nan=-1.0)
    zj = cv2.remap(near_j, m, None, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=np.inf)
    with np.errstate(invalid='ignore', over='ignore'):
        s2 = depth_sigma(z_pred, cfg.depth_sigma_a, cfg.depth_sigma_b) ** 2 + \
            depth_sigma(zj, cfg.depth_sigma_a, cfg.depth_sigma_b) ** 2
        tol = np.float32(cfg.depth_tol_sigmas) * np.sqrt(s2) + np.float32(cfg.depth_rel_tol) * z_pred
        r = (zj - z_pred) / tol
        rs = np.maximum(r, 0) ** np.float32(cfg.steepness)
        prob = (rs / (1.0 + rs)).astype(np.float32)
        prob[~np.isfinite(zj) | ~np.isfinite(z_pred) | (r < -1.0)] = np.nan
    return prob


def fill_candidates(depth: np.ndarray, max_radius: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near and far candidate depths for the pixels without a reading.

    Holes are filled by repeated 3 x 3 grey erosion (nearest reading) and dilation (farthest reading)
    from their rims, at most ``max_radius`` pixels deep.

    Args:
        depth: (H, W) float32 metres, 0 / NaN = no reading.
        max_radius: pixels farther than this from any reading get no candidate.

    Returns:
        holes (H, W) bool (no reading, but a candidate), near and far (H, W) float32 candidate depths
        (the reading itself where there is one; NaN where neither).
    """
    ok = np.isfinite(depth) & (depth > 0)
    if ok.all():
        return np.zeros(depth.shape, bool), depth, depth
    near = np.where(ok, depth, np.float32(np.inf)).astype(np.float32)
    far = np.where(ok, depth, np.float32(0)).astype(np.float32)
    for _ in range(max_radius):
        if np.isfinite(near).all():
            break
        near = np.where(np.isfinite(near), near, cv2.erode(near, _SQUARE3))
        far = np.where(far > 0, far, cv2.dilate(far, _SQUARE3))
    holes = ~ok & np.isfinite(near)
    near = np.where(np.isfinite(near), near, np.nan).astype(np.float32)
    far = np.where(far > 0, far, np.nan).astype(np.float32)
    return holes, near, far
