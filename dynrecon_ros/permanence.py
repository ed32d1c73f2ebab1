"""Motion segmentation, object permanence: a region seen moving stays dynamic while it stands still.

A person who stops shows neither flow nor depth change, so both cues go quiet. Each frame therefore
keeps a *hold map*: per pixel, the time (stamp, seconds) its region last showed motion, NaN where
nothing is held. A new frame inherits its pair partner's hold map where it sees the same surface at
the same place: its point, moved by the camera motion into the partner, lands on a held pixel
whose reading agrees with the predicted depth (within the geometric cue's noise model). What
stands still keeps its hold; where the held thing walked off, the uncovered background is
farther than the thing was and the hold is dropped (carrying the hold along the optical flow
instead left ghosts: background of about the mover's depth took over its hold); a moving thing
needs no hold (its cues speak). Held pixels whose region has not moved for ``cfg.still_after_s``
seconds are let go: they count as scenery from then on (a parked cart, a person who sat down).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.depth_cue import depth_sigma
from dynrecon_ros.flow_cue import ego_at, exposure_gain, nan_box_mean
from dynrecon_ros.geometry import pixel_axes

if TYPE_CHECKING:
    from dynrecon_ros.segmentation import SegmentationConfig


def carry_hold(hold_j: np.ndarray, depth_k: np.ndarray, K_k: np.ndarray, depth_j: np.ndarray,
               K_j: np.ndarray, T_j_k: np.ndarray, cfg: 'SegmentationConfig',
               gray_k: np.ndarray | None = None, gray_j: np.ndarray | None = None) -> np.ndarray:
    """Frame j's hold map carried to frame k (see the module docstring).

    Args:
        hold_j: (H, W) float32 stamps of frame j (NaN = not held).
        depth_k, depth_j: (H, W) float32 metres (0 = no reading).
        K_k, K_j: (3, 3) intrinsics.
        T_j_k: (4, 4) with ``X_j = T_j_k @ X_k``.
        cfg: depth_sigma_a, depth_sigma_b, depth_tol_sigmas, depth_rel_tol, hold_grey_tol.
        gray_k, gray_j: optional (H, W) uint8 grey images: the hold is also dropped where frame j
            there does not look like frame k (5 x 5 mean absolute difference after one gain above
            ``cfg.hold_grey_tol`` grey levels): a person who left, uncovering background at about
            their depth (a wall they walked along).

    Returns:
        (H, W) float32 stamps of frame k (NaN = not held).
    """
    h, w = hold_j.shape
    u, v = pixel_axes(h, w)
    du, dv, z_pred = ego_at(u, v, depth_k, K_k, T_j_k, K_j)
    # where k's points land in j, as two float maps (no ego flow: -1e4, outside)
    du += u
    dv += v
    mx, my = np.fmax(du, np.float32(-1e4), out=du), np.fmax(dv, np.float32(-1e4), out=dv)
    held = cv2.remap(np.asarray(hold_j, dtype=np.float32), mx, my, cv2.INTER_NEAREST,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    zj_meas = cv2.remap(np.asarray(depth_j, dtype=np.float32), mx, my, cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    with np.errstate(invalid='ignore'):
        sig = np.sqrt(depth_sigma(z_pred, cfg.depth_sigma_a, cfg.depth_sigma_b) ** 2 +
                      depth_sigma(zj_meas, cfg.depth_sigma_a, cfg.depth_sigma_b) ** 2)
        same = (zj_meas > 0) & (np.abs(zj_meas - z_pred) <= cfg.depth_tol_sigmas * sig + cfg.depth_rel_tol * z_pred)
    if gray_k is not None and gray_j is not None and np.isfinite(held).any():
        gk = gray_k.astype(np.float32)
        seen = cv2.remap(gray_j.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=np.nan)
        gain = exposure_gain(seen[::7, ::7], gk[::7, ::7])
        with np.errstate(invalid='ignore'):
            same &= nan_box_mean(np.abs(seen - gain * gk), (5, 5)) <= cfg.hold_grey_tol
    return np.where(same, held, np.nan).astype(np.float32)


def update_hold(hold: np.ndarray | None, mask: np.ndarray, moving: np.ndarray, stamp: float) -> np.ndarray:
    """A frame's hold map after its mask is final: ``stamp`` on masked pixels with motion evidence
    now, the inherited stamp on masked pixels without, NaN elsewhere.

    Pixels that the cleaning added without either (region completion, morphology) get no stamp:
    the hold never spreads by itself over static surfaces it touches (it would then sustain itself
    there, since static scenery passes every check of :func:`carry_hold`).

    Args:
        hold: (H, W) float32 the frame's inherited stamps (NaN = none), or None.
        mask: (H, W) uint8 final mask (> 0 = dynamic).
        moving: (H, W) bool pixels with motion evidence in this frame (either cue).
        stamp: the frame's time, seconds.

    Returns:
        (H, W) float32 stamps.
    """
    base = np.full(mask.shape, np.nan, np.float32) if hold is None else np.asarray(hold, dtype=np.float32)
    out = np.where(moving, np.float32(stamp), base)
    out[mask == 0] = np.nan
    return out.astype(np.float32)


def held_pixels(hold: np.ndarray | None, stamp: float, still_after_s: float) -> np.ndarray | None:
    """(H, W) bool pixels still held at ``stamp`` (moved less than ``still_after_s`` seconds ago)."""
    if hold is None:
        return None
    with np.errstate(invalid='ignore'):
        return stamp - hold < still_after_s
