"""Far anchors (``window.far_keyframes``): which keyframe published long ago still sees what the newest frame sees,
and the flow the camera motion between them predicts, around which their pair's optical flow is found
(:meth:`dynrecon_ros.flow.FlowCache.guided`). The pair itself is made by
:meth:`dynrecon_ros.rgbd_step.RGBDStep._far_pair`.

Why: the window's pairs reach a few keyframes back (~10-20 frames), so the trajectory is a chain whose error grows
with its length (close_crossing, 300 frames: 2.9 mm ATE mean over 10 seeds, 4.3 mm at worst), while a camera that
looks around a room sees the same places again. A pair with a keyframe from before the chain's error grew ties the
newest frame to it. Its displacement is beyond DIS's reach once the camera turned a few degrees (the forward-backward
check keeps 3-9 % of the pixels), hence the flow around the camera motion's.
"""
from __future__ import annotations

import numpy as np

from dynrecon_ros.geometry import pixel_grid, project, transform_points, unproject
from dynrecon_ros.window import WindowEntry

# a far anchor (window.far_keyframes) is paired with the newest frame when at least this share of its valid depth
# readings (outside its mask, every 8th pixel) lands inside the newest frame at the tracked poses
FAR_OVERLAP = 0.7
# ... and its refinement may move the newest frame this far from where the window's pairs put it (the drift it is
# there to take out grows with the frames since the anchor: the long pairs' 15 mm gate would refuse the very
# corrections it exists for; 160x120 default sequence, 39 frames on: 27-31 mm of drift, the far pairs 4 mm off)
FAR_MAX_MOVE_M = 0.05


def overlap(a: WindowEntry, b: WindowEntry, st: int = 8) -> float:
    """Share of frame a's valid depth readings outside its mask (every ``st``-th pixel) that land inside frame b, in
    front of it, at the two entries' poses."""
    z = a.frame.depth[::st, ::st]
    ok = z > 0
    if a.mask is not None:
        ok &= ~a.mask[::st, ::st]
    if not ok.any():
        return 0.0
    K_st = np.asarray(a.frame.K, dtype=np.float64) / np.array([[st], [st], [1.0]])  # the K of the every-st-th grid
    Q = transform_points(np.linalg.inv(b.pose) @ a.pose, unproject(z, K_st)[ok])
    Kb = b.frame.K
    h, w = b.frame.depth.shape
    front = Q[:, 2] > 0.1
    u, v = project(Q, Kb, np.where(front, Q[:, 2], 1.0))
    return float((front & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)).mean())


def camera_flow(a: WindowEntry, b: WindowEntry) -> np.ndarray:
    """(H, W, 2) float32 flow of frame a's pixels into frame b by the camera motion between their poses, at a's
    depth (where a has none, at its median depth)."""
    z = a.frame.depth.astype(np.float64)
    ok = z > 0
    z = np.where(ok, z, np.median(z[ok]) if ok.any() else 1.0)
    h, w = z.shape
    Q = transform_points(np.linalg.inv(b.pose) @ a.pose, unproject(z, a.frame.K).reshape(-1, 3))
    uv = np.stack(project(Q, b.frame.K, np.maximum(Q[:, 2], 1e-3)), -1).reshape(h, w, 2)
    return (uv - pixel_grid(h, w)).astype(np.float32)
