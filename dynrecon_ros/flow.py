"""Stage 4, optical flow: dense flow for every pair of the window, computed once and reused.

OpenCV DIS flow sits behind :class:`FlowEstimator` so a learned flow can be dropped in; the
forward-backward check marks pixels whose flow is trustworthy. :class:`FlowCache` keeps the flows of
the pairs of the current window keyed by frame keys and forgets pairs whose frames left it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import pixel_grid

if TYPE_CHECKING:  # config.py imports segmentation.py, which imports this module
    from dynrecon_ros.config import FlowConfig

_PRESETS = {
    'ultrafast': cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    'fast': cv2.DISOPTICAL_FLOW_PRESET_FAST,
    'medium': cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


class FlowEstimator:
    """Interface: ``compute(img_a, img_b) -> (H, W, 2) float32`` flow from a to b in pixels (dx, dy)."""

    def compute(self, img_a: np.ndarray, img_b: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def to_gray(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB or (H, W) -> (H, W) uint8 grey."""
    if img.ndim == 2:
        return img if img.dtype == np.uint8 else np.clip(img, 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


class DISFlow(FlowEstimator):
    """OpenCV DIS optical flow (Kroeger et al. 2016), CPU, a few ms per 320x240 pair."""

    def __init__(self, preset: str, variational_iterations: int | None = None):
        if preset not in _PRESETS:
            raise InputError(f'flow.preset must be one of {sorted(_PRESETS)}, got {preset!r}')
        self._dis = cv2.DISOpticalFlow_create(_PRESETS[preset])
        if variational_iterations is not None:
            self._dis.setVariationalRefinementIterations(int(variational_iterations))

    def compute(self, img_a: np.ndarray, img_b: np.ndarray) -> np.ndarray:
        a, b = to_gray(img_a), to_gray(img_b)
        if a.shape != b.shape:
            raise InputError(f'flow: image sizes differ {a.shape} vs {b.shape}')
        return self._dis.calc(a, b, None).astype(np.float32, copy=False)


def _inside(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W) bool: the (H, W, 2) sample positions ``m`` lie in [0, w-1] x [0, h-1]."""
    # cv2.inRange on the 2-channel map: one pass instead of four numpy comparisons
    return cv2.inRange(m, (0.0, 0.0), (float(w - 1), float(h - 1))) > 0


def warp(image: np.ndarray, flow: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Sample ``image`` (H, W[, C]) at p + flow(p) for every pixel p; NaN outside the image."""
    h, w = flow.shape[:2]
    m = pixel_grid(h, w) + flow
    img = image.astype(np.float32, copy=False)
    out = cv2.remap(img, m, None, interpolation, borderMode=cv2.BORDER_REPLICATE)
    out[~_inside(m, h, w)] = np.nan
    return out


def fb_consistency(fwd: np.ndarray, bwd: np.ndarray, threshold_px: float = 1.0,
                   relative: float = 0.05) -> np.ndarray:
    """(H, W) bool: forward flow a->b agrees with backward flow b->a sampled at its end point.

    Valid where ``|fwd(p) + bwd(p + fwd(p))| < threshold_px + relative * |fwd(p)|`` and p + fwd(p)
    lies inside the image.
    """
    h, w = fwd.shape[:2]
    m = pixel_grid(h, w) + fwd
    back = cv2.remap(np.ascontiguousarray(bwd, dtype=np.float32), m, None, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)
    s = fwd + back
    err = cv2.magnitude(s[..., 0].copy(), s[..., 1].copy())
    mag = cv2.magnitude(np.ascontiguousarray(fwd[..., 0]), np.ascontiguousarray(fwd[..., 1]))
    return (err < threshold_px + relative * mag) & _inside(m, h, w)


@dataclass
class PairFlow:
    """Flows of one ordered pair (a, b): forward a->b, backward b->a, (H, W) bool validity of each."""

    fwd: np.ndarray
    bwd: np.ndarray
    valid_fwd: np.ndarray
    valid_bwd: np.ndarray

    def reversed(self) -> 'PairFlow':
        return PairFlow(self.bwd, self.fwd, self.valid_bwd, self.valid_fwd)


class FlowCache:
    """Flow of each pair computed once (forward and backward together), keyed by frame keys.

    cfg: the flow section of the pipeline config (:class:`dynrecon_ros.config.FlowConfig`); the
    estimator is OpenCV DIS with ``cfg.preset`` unless one is given.
    """

    def __init__(self, cfg: FlowConfig, estimator: FlowEstimator | None = None):
        if cfg.method != 'dis':
            raise InputError(f'flow.method {cfg.method!r} is not available (only "dis")')
        self.estimator = estimator or DISFlow(cfg.preset)
        self.threshold_px = cfg.fb_threshold_px
        self.relative = cfg.fb_relative
        self._pairs: dict[tuple[str, str], PairFlow] = {}
        self.computed = 0

    def get(self, key_a: str, img_a: np.ndarray, key_b: str, img_b: np.ndarray) -> PairFlow:
        if (key_a, key_b) in self._pairs:
            return self._pairs[(key_a, key_b)]
        if (key_b, key_a) in self._pairs:
            return self._pairs[(key_b, key_a)].reversed()
        ga, gb = to_gray(img_a), to_gray(img_b)
        fwd = self.estimator.compute(ga, gb)
        bwd = self.estimator.compute(gb, ga)
        self.computed += 2
        pf = PairFlow(fwd, bwd, fb_consistency(fwd, bwd, self.threshold_px, self.relative),
                      fb_consistency(bwd, fwd, self.threshold_px, self.relative))
        self._pairs[(key_a, key_b)] = pf
        return pf

    def put(self, key_a: str, key_b: str, pf: PairFlow) -> None:
        """Store the flow of pair (a, b) computed elsewhere (the Reconstructor's stage A)."""
        self._pairs[(key_a, key_b)] = pf

    def keep_only(self, keys: set[str]) -> None:
        """Forget every pair with a frame not in ``keys``."""
        self._pairs = {k: v for k, v in self._pairs.items() if k[0] in keys and k[1] in keys}

    def __len__(self) -> int:
        return len(self._pairs)
