"""Preview picture: one PNG montage to look at instead of reading numbers.

Panels (2 x 2, each the size of the input, at most 640 pixels wide): the input image, the depth
colour-mapped (turbo, near = blue), the dynamic mask overlaid in red on the input, and a top view of
the static map (x right, z up: the camera optical frame's ground plane when the world is the first
camera) with the estimated trajectory (green) and, if given, the ground truth (white). OpenCV only,
no matplotlib: drawing stays in the millisecond range.
"""
from __future__ import annotations

import pathlib

import cv2
import numpy as np

from dynrecon_ros.errors import InputError

_MAX_PANEL_W = 640


def _label(img: np.ndarray, text: str) -> None:
    cv2.putText(img, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)


def depth_to_color(depth: np.ndarray) -> np.ndarray:
    """(H, W) float32 metres -> (H, W, 3) uint8 RGB (turbo over the 2..98 % range; invalid = black)."""
    d = np.asarray(depth, dtype=np.float32)
    ok = np.isfinite(d) & (d > 0)
    out = np.zeros(d.shape + (3,), np.uint8)
    if not ok.any():
        return out
    lo, hi = np.percentile(d[ok], [2, 98])
    scaled = np.clip((d - lo) / max(hi - lo, 1e-6) * 255, 0, 255)
    scaled = np.nan_to_num(scaled).astype(np.uint8)
    col = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    out[ok] = col[ok]
    return out


def mask_overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB with dynamic pixels (mask > 0) tinted red and outlined."""
    out = rgb.copy()
    m = np.asarray(mask) > 0
    red = np.array([255, 0, 0], np.float32)
    out[m] = (0.45 * out[m] + 0.55 * red).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 0), 1)
    return out


def top_view(map_points: np.ndarray, trajectory: np.ndarray, size: tuple[int, int],
             gt_trajectory: np.ndarray | None = None) -> np.ndarray:
    """Top view (x right, z up) of map points and camera positions.

    Args:
        map_points: (M, 6) xyz + rgb 0..255.
        trajectory: (N, 4, 4) camera-to-world poses (green line, current camera = green dot).
        size: (W, H) of the returned image.
        gt_trajectory: optional (N', 4, 4) ground-truth poses (white line).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    w, h = size
    img = np.full((h, w, 3), 24, np.uint8)
    pts = np.asarray(map_points, dtype=np.float32).reshape(-1, 6)
    trajs = [np.asarray(t, dtype=np.float64).reshape(-1, 4, 4)[:, :3, 3]
             for t in (trajectory, gt_trajectory) if t is not None]
    xz = [pts[:, [0, 2]]] + [t[:, [0, 2]] for t in trajs]
    allxz = np.concatenate([a for a in xz if a.size], 0) if any(a.size for a in xz) else np.zeros((0, 2))
    allxz = allxz[np.all(np.isfinite(allxz), axis=1)]
    if allxz.shape[0] == 0:
        return img
    lo = np.percentile(allxz, 1, axis=0) if pts.shape[0] > 100 else allxz.min(0)
    hi = np.percentile(allxz, 99, axis=0) if pts.shape[0] > 100 else allxz.max(0)
    for t in trajs:  # the trajectory is always fully in view
        if t.size:
            lo = np.minimum(lo, t[:, [0, 2]].min(0))
            hi = np.maximum(hi, t[:, [0, 2]].max(0))
    span = np.maximum(hi - lo, 1e-3)
    margin = 12
    scale = min((w - 2 * margin) / span[0], (h - 2 * margin) / span[1])
    centre = (lo + hi) / 2

    def to_px(xz_: np.ndarray) -> np.ndarray:
        px = (xz_[:, 0] - centre[0]) * scale + w / 2
        py = h / 2 - (xz_[:, 1] - centre[1]) * scale  # z up
        return np.stack([px, py], 1)

    if pts.shape[0]:
        order = np.argsort(-pts[:, 1])  # y points down in camera convention: draw low points first
        p = np.rint(to_px(pts[order][:, [0, 2]])).astype(np.int64)
        ok = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
        img[p[ok, 1], p[ok, 0]] = np.clip(pts[order][ok, 3:6], 0, 255).astype(np.uint8)
    colours = [(0, 255, 0), (255, 255, 255)]
    for t, c in reversed(list(zip(trajs, colours))):
        if t.shape[0]:
            p = np.rint(to_px(t[:, [0, 2]])).astype(np.int32)
            cv2.polylines(img, [p.reshape(-1, 1, 2)], False, c, 1, cv2.LINE_AA)
    if trajs and trajs[0].shape[0]:
        cv2.circle(img, tuple(int(x) for x in np.rint(to_px(trajs[0][-1:, [0, 2]]))[0]), 4, (0, 255, 0), -1)
    bar = 10 ** np.floor(np.log10(max(span.max() / 4, 1e-3)))  # scale bar: a power of ten metres
    cv2.line(img, (margin, h - margin), (margin + int(bar * scale), h - margin), (255, 255, 255), 2)
    cv2.putText(img, f'{bar:g} m', (margin, h - margin - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return img


def make_preview(rgb: np.ndarray, depth: np.ndarray | None, mask: np.ndarray | None, map_points: np.ndarray,
                 trajectory: np.ndarray, path_png, gt_trajectory: np.ndarray | None = None) -> np.ndarray:
    """Write the 2 x 2 montage PNG and return it.

    Args:
        rgb: (H, W, 3) uint8 input image (RGB).
        depth: (H, W) float32 metres, or None (black panel).
        mask: (H, W) uint8 (255 = dynamic), or None (no overlay).
        map_points: (M, 6) xyz + rgb of the static map.
        trajectory: (N, 4, 4) camera-to-world poses.
        path_png: output file.
        gt_trajectory: optional (N', 4, 4) ground-truth camera-to-world poses.

    Returns:
        (2 Hp, 2 Wp, 3) uint8 RGB montage, Wp = min(W, 640) and Hp scaled alike.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f'preview: rgb must be (H,W,3) uint8, got {rgb.shape} {rgb.dtype}')
    h, w = rgb.shape[:2]
    depth = np.zeros((h, w), np.float32) if depth is None else depth
    mask = np.zeros((h, w), np.uint8) if mask is None else mask
    panels = [(rgb, 'input'), (depth_to_color(depth), 'depth'), (mask_overlay(rgb, mask), 'dynamic mask')]
    pw = min(w, _MAX_PANEL_W)
    ph = int(round(h * pw / w))
    tiles = []
    for img, name in panels:
        t = cv2.resize(img, (pw, ph), interpolation=cv2.INTER_AREA) if (pw, ph) != (w, h) else img.copy()
        _label(t, name)
        tiles.append(t)
    tv = top_view(map_points, trajectory, (pw, ph), gt_trajectory)
    n_pts = np.asarray(map_points).reshape(-1, 6).shape[0]
    _label(tv, f'top view x-z: {n_pts} map points' + (', gt white' if gt_trajectory is not None else ''))
    tiles.append(tv)
    montage = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    path = pathlib.Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(montage, cv2.COLOR_RGB2BGR)):
        raise InputError('could not write the preview PNG', path)
    return montage
