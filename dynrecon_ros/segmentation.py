"""Stage 6, motion segmentation (MonST3R style): a pixel is dynamic when its optical flow disagrees
with the flow that the camera motion and the depth of its frame induce ("ego flow").

For every pair (i, j) of a window the ego flow of frame i in frame j is computed from the aligned
poses and depth of i; the per-pixel error ``e = ||ego flow - optical flow||`` (on pixels whose flow
passed the forward-backward check) is turned into a dynamic probability, averaged over all pairs a
frame is in, smoothed over time (state keyed by frame key, so a frame seen by several overlapping
windows gets a stable mask) and cleaned with morphology.

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

import cv2
import numpy as np

from dynrecon_ros.errors import InputError


@dataclass
class SegmentationConfig:
    """Parameters of motion segmentation (they become ROS parameters, same names).

    Attributes:
        enabled: when False, :meth:`MotionSegmenter.segment` returns all-static masks.
        threshold: dynamic where the smoothed probability exceeds it (0..1).
        min_flow_px: absolute flow tolerance in pixels (flow noise of DIS on textured regions).
        flow_rel_tol: extra tolerance as a fraction of the ego-flow magnitude (depth/pose noise).
        steepness: exponent s of the soft step ``r^s / (1 + r^s)``, r = error / tolerance.
        edge_radius_px: the error of a pixel is the smallest over ego flows in this radius (in
            pixels), so depth edges a pixel off do not light up as motion; 0 disables.
        fb_tolerance_px: forward-backward tolerance used by :func:`forward_backward_valid`.
        open_px: morphological opening kernel (pixels, ellipse) that removes specks; 0 disables.
        close_px: morphological closing kernel that fills holes inside movers; 0 disables.
        dilate_px: final dilation that covers the soft boundary of movers; 0 disables.
        min_area_frac: connected dynamic regions smaller than this fraction of the image are dropped.
        temporal_weight: weight (0..1) of the evidence remembered from earlier windows for a frame
            key relative to the evidence of the current window (0 = no memory).
        max_tracked_frames: at most this many frame keys are remembered.
        forget_after_calls: a frame key not seen in this many calls is forgotten.
    """

    enabled: bool = True
    threshold: float = 0.5
    min_flow_px: float = 1.5
    flow_rel_tol: float = 0.15
    steepness: float = 4.0
    edge_radius_px: int = 1
    fb_tolerance_px: float = 1.0
    open_px: int = 3
    close_px: int = 7
    dilate_px: int = 0
    min_area_frac: float = 0.0005
    temporal_weight: float = 0.5
    max_tracked_frames: int = 64
    forget_after_calls: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f'segmentation threshold must be in (0, 1), got {self.threshold}')
        if self.min_flow_px <= 0 or self.flow_rel_tol < 0 or self.steepness <= 0:
            raise InputError('segmentation min_flow_px and steepness must be > 0, flow_rel_tol >= 0')
        if not 0.0 <= self.temporal_weight < 1.0:
            raise InputError(f'segmentation temporal_weight must be in [0, 1), got {self.temporal_weight}')
        for name in ('edge_radius_px', 'open_px', 'close_px', 'dilate_px'):
            if getattr(self, name) < 0:
                raise InputError(f'segmentation {name} must be >= 0, got {getattr(self, name)}')
        if self.max_tracked_frames < 1 or self.forget_after_calls < 1:
            raise InputError('segmentation max_tracked_frames and forget_after_calls must be >= 1')


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 u and v pixel coordinates."""
    u, v = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
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
    depth = np.asarray(depth, dtype=np.float32)
    K = np.asarray(K, dtype=np.float64)
    K_j = K if K_j is None else np.asarray(K_j, dtype=np.float64)
    T = np.asarray(T_j_i, dtype=np.float64)
    h, w = depth.shape
    u, v = _pixel_grid(h, w)
    # camera-i rays (x/z, y/z, 1), then X_j = R (z * ray) + t
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    z = depth
    R = T[:3, :3].astype(np.float32)
    t = T[:3, 3].astype(np.float32)
    xj = z * (R[0, 0] * x + R[0, 1] * y + R[0, 2]) + t[0]
    yj = z * (R[1, 0] * x + R[1, 1] * y + R[1, 2]) + t[1]
    zj = z * (R[2, 0] * x + R[2, 1] * y + R[2, 2]) + t[2]
    valid = np.isfinite(z) & (z > 0) & (zj > 1e-6)
    with np.errstate(divide='ignore', invalid='ignore'):
        uj = K_j[0, 0] * xj / zj + K_j[0, 1] * yj / zj + K_j[0, 2]
        vj = K_j[1, 1] * yj / zj + K_j[1, 2]
    flow = np.stack([uj - u, vj - v], axis=-1).astype(np.float32)
    flow[~valid] = np.nan
    zj = np.where(valid, zj, np.nan).astype(np.float32)
    return flow, zj


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


def _min_error_over_neighbours(ego: np.ndarray, flow: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) smallest ``||ego(q) - flow(p)||`` over q in the (2r+1)^2 neighbourhood of p (NaN-aware)."""
    err = np.linalg.norm(ego - flow, axis=-1)
    if radius <= 0:
        return err
    h, w = err.shape
    pad = np.pad(ego, ((radius, radius), (radius, radius), (0, 0)), constant_values=np.nan)
    best = np.where(np.isfinite(err), err, np.inf)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx == 0 and dy == 0:
                continue
            e = np.linalg.norm(pad[radius + dy:radius + dy + h, radius + dx:radius + dx + w] - flow, axis=-1)
            np.fmin(best, e, out=best)
    best[~np.isfinite(best)] = np.nan
    best[~np.isfinite(err)] = np.nan  # no own depth: no evidence
    return best


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


def _pair_probability(depth_i, K_i, T_j_i, flow, valid, cfg, K_j=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pair_dynamic_probability` plus the (H, W) depth of frame i's points in camera j."""
    ego, zj = _ego_flow_and_depth(depth_i, K_i, T_j_i, K_j)
    flow = np.asarray(flow, dtype=np.float32)
    err = _min_error_over_neighbours(ego, flow, cfg.edge_radius_px)
    tol = cfg.min_flow_px + cfg.flow_rel_tol * np.linalg.norm(ego, axis=-1)
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        rs = (err / tol) ** cfg.steepness
        prob = np.where(np.isinf(rs), 1.0, rs / (1.0 + rs))
    prob = prob.astype(np.float32)
    ok = np.isfinite(prob) & np.all(np.isfinite(flow), axis=-1)
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    prob[~ok] = np.nan
    return prob, zj


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
    # z-buffer: sort by (target, depth) and keep the first (nearest) per target pixel
    order = np.lexsort((zz, idx))
    idx, val = idx[order], val[order]
    first = np.ones(idx.size, bool)
    first[1:] = idx[1:] != idx[:-1]
    out = np.full(h * w, np.nan, dtype=np.float32)
    out[idx[first]] = val[first]
    return out.reshape(h, w)


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * size + 1, 2 * size + 1)) if size > 1 else \
        np.ones((2 * size + 1, 2 * size + 1), np.uint8)


def clean_mask(prob: np.ndarray, cfg: SegmentationConfig) -> np.ndarray:
    """Threshold and clean one probability map.

    Args:
        prob: (H, W) float32 dynamic probability (NaN = no evidence = static).
        cfg: threshold and morphology parameters.

    Returns:
        (H, W) uint8, 255 = dynamic.
    """
    m = (np.nan_to_num(prob, nan=0.0) > cfg.threshold).astype(np.uint8)
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
    if cfg.dilate_px:
        m = cv2.dilate(m, _kernel(cfg.dilate_px))
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

    def __len__(self) -> int:
        """Number of frame keys currently remembered."""
        return len(self._state)

    def reset(self) -> None:
        self._state.clear()
        self._calls = 0

    def segment(self, keys: list[str], depths: np.ndarray, K: np.ndarray, poses: np.ndarray,
                flows: dict, flow_valid: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dynamic probability and mask of every frame of a window.

        Args:
            keys: N frame keys (identify frames across overlapping windows).
            depths: (N, H, W) float32 metres.
            K: (3, 3) shared or (N, 3, 3) per-frame intrinsics.
            poses: (N, 4, 4) camera-to-world.
            flows: {(i, j): (H, W, 2) float32 optical flow from frame i to frame j}, window indices.
            flow_valid: {(i, j): (H, W) bool forward-backward consistent}; missing = all valid.

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
            psum[k][ok] += p[ok]
            pcnt[k][ok] += 1.0

        for (i, j), flow in flows.items():
            if not (0 <= i < n and 0 <= j < n) or i == j:
                raise InputError(f'segment: flow pair ({i}, {j}) is not a pair of the {n}-frame window')
            flow = np.asarray(flow, dtype=np.float32)
            if flow.shape != (h, w, 2):
                raise InputError(f'segment: flow ({i}, {j}) has shape {flow.shape}, expected {(h, w, 2)}')
            p, zj = _pair_probability(depths[i], Ks[i], inv[j] @ poses[i], flow, flow_valid.get((i, j)),
                                      self.cfg, Ks[j])
            add(i, p)
            if (j, i) not in flows:  # frame j gets the evidence carried along the flow
                add(j, _splat_to_target(p, flow, zj))
        probs = np.zeros((n, h, w), np.float32)
        masks = np.zeros((n, h, w), np.uint8)
        for k, key in enumerate(keys):
            probs[k] = self._remember(key, psum[k], pcnt[k])
            masks[k] = clean_mask(probs[k], self.cfg)
        self._forget()
        return probs, masks

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
