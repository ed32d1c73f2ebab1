"""Stage 4, optical flow: dense flow for every pair of the window, computed once and reused.

OpenCV DIS flow sits behind :class:`FlowEstimator` so a learned flow can be dropped in; the
forward-backward check marks pixels whose flow is trustworthy. :class:`FlowCache` keeps the flows of
the pairs of the current window keyed by frame keys and forgets pairs whose frames left it; it makes
each frame's grey image once, and each pair's checks run when first used (:class:`PairFlow`: the
pose reads the forward one on its stride grid only). Its counters (``computed``, ``gray_computed``,
``checked``, ``grid_checked``) say how much per-pixel work was done.
"""
from __future__ import annotations

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


def _fb_planar(fu: np.ndarray, fv: np.ndarray, bu: np.ndarray, bv: np.ndarray, threshold_px: float,
               relative: float, st: int = 1) -> np.ndarray:
    """:func:`fb_consistency` on planar flows: fu, fv (H, W) float32 the forward flow's x and y, bu, bv
    the backward flow's; with ``st`` > 1 only on the pixels (st v, st u) (the (ceil(H/st), ceil(W/st))
    grid, each pixel's result as in the full check). OpenCV remaps two one-channel images with separate
    x / y maps ~1.8x faster than one two-channel image with an interleaved map, and the magnitudes
    need no copies."""
    h, w = fu.shape
    if st > 1:
        fu, fv = fu[::st, ::st], fv[::st, ::st]
    g = pixel_grid(h, w)
    mu = fu + g[0, ::st, 0]  # end points, (H, W) or the grid's
    mv = fv + g[::st, :1, 1]
    su = cv2.remap(bu, mu, mv, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    sv = cv2.remap(bv, mu, mv, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    su += fu
    sv += fv
    lim = cv2.magnitude(fu, fv)
    lim *= np.float32(relative)
    lim += np.float32(threshold_px)
    ok = cv2.magnitude(su, sv) < lim
    ok &= (mu >= 0) & (mu <= w - 1) & (mv >= 0) & (mv <= h - 1)
    return ok


def fb_consistency(fwd: np.ndarray, bwd: np.ndarray, threshold_px: float = 1.0,
                   relative: float = 0.05) -> np.ndarray:
    """(H, W) bool: forward flow a->b agrees with backward flow b->a sampled at its end point.

    Valid where ``|fwd(p) + bwd(p + fwd(p))| < threshold_px + relative * |fwd(p)|`` and p + fwd(p)
    lies inside the image. fwd, bwd: (H, W, 2) float32.
    """
    fu, fv = cv2.split(np.asarray(fwd, np.float32))
    bu, bv = cv2.split(np.asarray(bwd, np.float32))
    return _fb_planar(fu, fv, bu, bv, threshold_px, relative)


def fb_consistency_both(fwd: np.ndarray, bwd: np.ndarray, threshold_px: float = 1.0,
                        relative: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(valid fwd, valid bwd): :func:`fb_consistency` both ways, the flows split into planes once."""
    fu, fv = cv2.split(np.asarray(fwd, np.float32))
    bu, bv = cv2.split(np.asarray(bwd, np.float32))
    return (_fb_planar(fu, fv, bu, bv, threshold_px, relative),
            _fb_planar(bu, bv, fu, fv, threshold_px, relative))


class _PairCheck:
    """The forward-backward checks of one pair, each computed on first use and kept (shared by a
    :class:`PairFlow` and its reversed view). params None: the validity is only what was given."""

    def __init__(self, flows, valid, params=None, cache=None):
        self.flows = flows  # (a->b, b->a)
        self.valid = valid  # [valid of a->b, valid of b->a], None = not computed (or none given)
        self.params = params  # (threshold_px, relative) or None
        self.cache = cache  # the FlowCache whose counters it increments
        self._planes = None

    def planes(self):
        if self._planes is None:
            self._planes = tuple(cv2.split(np.asarray(f, np.float32)) for f in self.flows)
        return self._planes

    def full(self, d: int):
        if self.valid[d] is None and self.params is not None:
            p = self.planes()
            self.valid[d] = _fb_planar(*p[d], *p[1 - d], *self.params)
            if self.cache is not None:
                self.cache.checked += 1
            if self.valid[1 - d] is not None:
                self._planes = None  # both done
        return self.valid[d]

    def grid(self, d: int, st: int):
        if self.valid[d] is not None or self.params is None:
            v = self.valid[d]
            return None if v is None else v[::st, ::st]
        p = self.planes()
        if self.cache is not None:
            self.cache.grid_checked += 1
        return _fb_planar(*p[d], *p[1 - d], *self.params, st=st)


class PairFlow:
    """Flows of one ordered pair (a, b): ``fwd`` a->b and ``bwd`` b->a ((H, W, 2) float32 pixels) and
    the (H, W) bool validity of each, ``valid_fwd`` / ``valid_bwd`` (forward-backward check).

    Built directly, the validity is what is given (None: none). Built by :class:`FlowCache`
    (:meth:`deferred`), each check runs on first use and is kept: the segmentation reads both for the
    pairs whose frames it updates, the pose only the forward one on its stride grid
    (:meth:`valid_fwd_on_grid`, which checks just those pixels while the full mask is not needed).
    """

    def __init__(self, fwd: np.ndarray, bwd: np.ndarray, valid_fwd: np.ndarray | None,
                 valid_bwd: np.ndarray | None):
        self._c = _PairCheck((fwd, bwd), [valid_fwd, valid_bwd])
        self._d = 0  # 1: the reversed view
        self._no_fwd = False  # a view without the forward check (:meth:`backward_only`)

    @classmethod
    def deferred(cls, fwd: np.ndarray, bwd: np.ndarray, threshold_px: float, relative: float,
                 cache: 'FlowCache | None' = None) -> 'PairFlow':
        """Flows whose checks (:func:`fb_consistency` with these parameters) run on first use."""
        pf = cls(fwd, bwd, None, None)
        pf._c.params, pf._c.cache = (threshold_px, relative), cache
        return pf

    @property
    def fwd(self) -> np.ndarray:
        return self._c.flows[self._d]

    @property
    def bwd(self) -> np.ndarray:
        return self._c.flows[1 - self._d]

    @property
    def valid_fwd(self) -> np.ndarray | None:
        return None if self._no_fwd else self._c.full(self._d)

    @property
    def valid_bwd(self) -> np.ndarray | None:
        return self._c.full(1 - self._d)

    def valid_fwd_on_grid(self, st: int) -> np.ndarray | None:
        """``valid_fwd[::st, ::st]``, without checking the other pixels when the full mask is not there."""
        return self._c.grid(self._d, st)

    def reversed(self) -> 'PairFlow':
        pf = object.__new__(PairFlow)
        pf._c, pf._d, pf._no_fwd = self._c, 1 - self._d, False
        return pf

    def backward_only(self) -> 'PairFlow':
        """A view for a consumer that has no use for the forward flow's validity (``valid_fwd`` None,
        so its full check is not run for it); flows and checks stay shared with this one."""
        pf = object.__new__(PairFlow)
        pf._c, pf._d, pf._no_fwd = self._c, self._d, True
        return pf


class FlowCache:
    """Flow of each pair computed once (forward and backward together), keyed by frame keys.

    cfg: the flow section of the pipeline config (:class:`dynrecon_ros.config.FlowConfig`); the
    estimator is OpenCV DIS with ``cfg.preset`` unless one is given. The grey image of each frame is
    kept too (the last ``gray_frames`` frames, by key), so a frame in several pairs is converted
    once. Counters: ``computed`` the flow computations (two per new pair), ``gray_computed`` the grey
    conversions, ``checked`` the full forward-backward checks (each direction of a pair at most once,
    when first used), ``grid_checked`` the checks of a stride grid only (the pose's).
    """

    gray_frames = 8  # window + keyframe anchors of the default config (4 + 2), with room

    def __init__(self, cfg: FlowConfig, estimator: FlowEstimator | None = None):
        if cfg.method != 'dis':
            raise InputError(f'flow.method {cfg.method!r} is not available (only "dis")')
        self.estimator = estimator or DISFlow(cfg.preset)
        self.threshold_px = cfg.fb_threshold_px
        self.relative = cfg.fb_relative
        self._pairs: dict[tuple[str, str], PairFlow] = {}
        self._gray: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # key -> (image, grey), oldest first
        self.computed = 0
        self.gray_computed = 0
        self.checked = 0
        self.grid_checked = 0

    def gray(self, key: str, img: np.ndarray) -> np.ndarray:
        """(H, W) uint8 grey of frame ``key``'s image ``img`` ((H, W, 3) RGB or grey), converted once
        while the frame is among the last ``gray_frames`` looked up (the same array: a new image
        under an old key is converted again)."""
        hit = self._gray.pop(key, None)
        if hit is None or hit[0] is not img:
            hit = (img, to_gray(img))
            self.gray_computed += 1
        self._gray[key] = hit  # most recent last
        while len(self._gray) > self.gray_frames:
            del self._gray[next(iter(self._gray))]
        return hit[1]

    def get(self, key_a: str, img_a: np.ndarray, key_b: str, img_b: np.ndarray) -> PairFlow:
        if (key_a, key_b) in self._pairs:
            return self._pairs[(key_a, key_b)]
        if (key_b, key_a) in self._pairs:
            return self._pairs[(key_b, key_a)].reversed()
        ga, gb = self.gray(key_a, img_a), self.gray(key_b, img_b)
        fwd = self.estimator.compute(ga, gb)
        bwd = self.estimator.compute(gb, ga)
        self.computed += 2
        pf = PairFlow.deferred(fwd, bwd, self.threshold_px, self.relative, cache=self)
        self._pairs[(key_a, key_b)] = pf
        return pf

    def guided(self, key_a: str, img_a: np.ndarray, key_b: str, img_b: np.ndarray, prior: np.ndarray) -> PairFlow:
        """Flow a->b around a ``prior`` (H, W, 2) float32 a->b flow (finite everywhere; e.g. the camera motion's
        flow of a's depth), for pairs whose displacement is beyond DIS's reach (far anchors seen again after the
        camera turned: tens of pixels): frame b is warped to a through the prior, DIS finds what is left both ways,
        and each pixel's flow is the prior's at the residual's end point plus the residual. ``valid_fwd``: the
        residuals' forward-backward check, and the end point inside b; ``bwd`` is not computed (None: for
        consumers of the forward flow only, the pose). Not cached."""
        ga, gb = self.gray(key_a, img_a), self.gray(key_b, img_b)
        h, w = ga.shape
        grid = pixel_grid(h, w)
        m = grid + prior
        wb = cv2.remap(gb, m, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        rf = self.estimator.compute(ga, wb)
        rb = self.estimator.compute(wb, ga)
        self.computed += 2
        end = cv2.remap(m, grid + rf, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(-1e4, -1e4))
        valid = fb_consistency(rf, rb, self.threshold_px, self.relative) & _inside(m, h, w) & _inside(end, h, w)
        return PairFlow(end - grid, None, valid, None)

    def put(self, key_a: str, key_b: str, pf: PairFlow) -> None:
        """Store the flow of pair (a, b) computed elsewhere (the Reconstructor's stage A)."""
        self._pairs[(key_a, key_b)] = pf

    def keep_only(self, keys: set[str]) -> None:
        """Forget every pair with a frame not in ``keys`` (the grey images stay: see ``gray_frames``)."""
        self._pairs = {k: v for k, v in self._pairs.items() if k[0] in keys and k[1] in keys}

    def __len__(self) -> int:
        return len(self._pairs)
