"""The processing size: a frame brought down to it (:func:`downscale_frame`, ``ReconConfig.max_work_width``:
640x480 -> 320x240) and a work-size map brought back to the input size (:func:`upsample`), for the RGB-D step
and the Reconstructor's outputs."""
from __future__ import annotations

import cv2
import numpy as np

from dynrecon_ros.frames import Frame


def downscale_frame(frame, s: int):
    """``frame`` at 1/s of its size (integer s > 1) for processing; the same stamp and key.

    Work pixel (u, v) is the s x s block of input pixels from (s u, s v): colour is the block mean
    (area resampling), depth the mean of the block's readings when they lie on one surface (spread
    <= 2 % + 1 cm) and else the nearest one (no flying points between a mover and the background),
    K is moved to the blocks' centres. Input pixels beyond the last whole block are left out.
    """
    H, W = frame.rgb.shape[:2]
    h, w = H // s, W // s
    rgb = cv2.resize(frame.rgb[:h * s, :w * s], (w, h), interpolation=cv2.INTER_AREA)
    depth = None
    if frame.depth is not None:
        depth = downscale_depth(frame.depth, s)
    K = None
    if frame.K is not None:
        K = frame.K.copy()
        K[0, 0] /= s
        K[1, 1] /= s
        K[0, 2] = (K[0, 2] - (s - 1) / 2) / s
        K[1, 2] = (K[1, 2] - (s - 1) / 2) / s
    return Frame(frame.stamp, rgb, depth, K, key=frame.key, meta=frame.meta)


def downscale_depth(depth: np.ndarray, s: int) -> np.ndarray:
    """(H // s, W // s) float32 work depth of a cleaned (H, W) float32 depth (readings > 0, else 0): per s x s
    block the mean of its readings when they lie on one surface (spread <= 2 % + 1 cm), else the nearest one,
    0 without any. The block statistics run over the s * s positions of a block, each a contiguous copy (numpy
    is ~2x faster on them than on strided views); the mean sums them in block order (the float32 sums of
    ``sum(views)``)."""
    H, W = depth.shape
    h, w = H // s, W // s
    views = [np.ascontiguousarray(depth[dy:h * s:s, dx:w * s:s]) for dy in range(s) for dx in range(s)]
    valid = [v > 0 for v in views]
    cnt = valid[0].astype(np.float32)
    inf = np.float32(np.inf)
    near = np.where(valid[0], views[0], inf)
    far = views[0]
    tot = views[0].copy()
    for v, m in zip(views[1:], valid[1:]):
        cnt += m
        tot += v
        np.minimum(near, np.where(m, v, inf), out=near)
        far = np.maximum(far, v, out=None if far is views[0] else far)
    mean = np.divide(tot, np.maximum(cnt, np.float32(1)), out=tot)
    out = np.where(far - near <= np.float32(0.02) * near + np.float32(0.01), mean, near)
    out[cnt == 0] = 0
    return out


def upsample(img: np.ndarray, s: int, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """(h, w) work-size map -> (H, W) = ``size`` input-size map (inverse of :func:`downscale_frame`'s
    block layout; the input's pixels beyond the last whole block repeat the border)."""
    h, w = img.shape[:2]
    up = cv2.resize(img, (w * s, h * s), interpolation=interpolation)
    H, W = size
    if up.shape[:2] != (H, W):
        up = cv2.copyMakeBorder(up, 0, H - h * s, 0, W - w * s, cv2.BORDER_REPLICATE)
    return up
