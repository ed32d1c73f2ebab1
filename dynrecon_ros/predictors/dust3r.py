"""DUSt3R / MonST3R network predictor: window pointmaps over :mod:`dynrecon_ros.network`.

This is a *window predictor*: the Reconstructor hands its frames to the monocular window step
(:mod:`dynrecon_ros.monocular`), which asks this predictor for the pairwise pointmaps of the
window's pairs and aligns them globally (:class:`dynrecon_ros.pointmap_alignment.PointmapAligner`).
What lives here is the network I/O:

  * each frame is resized/cropped to the network input with the documented preprocessing
    (:func:`dynrecon_ros.network.preprocess_image`); maps go back to input pixels through the resize
    scale and crop offset (:meth:`Dust3rPredictor.to_input`, :meth:`to_network`), intrinsics too
    (:meth:`K_to_network`, :meth:`K_from_network`);
  * encoder tokens are cached by ``frame.key`` in the engine; the outputs of every ordered pair are
    cached here (``pair_cache``, at least the last window step's pairs), so a window step runs the
    decoder only for the new frame's pairs;
  * what the alignment needs per pair is made once, when the pair enters the cache
    (:meth:`Dust3rPredictor._entry`): float32 arrays, the non-finite check (a flag per view) and fix
    (a non-finite pixel gets the point (0, 0, 1) and confidence 1, i.e. log-confidence weight 0), and
    the log-confidence weights ``logw = log(max(conf, 1))`` (DUSt3R's 'log' transform); with
    ``tensor_device`` set (the monocular step sets it to the aligner's CUDA device) the points and
    weights are also kept as float32 tensors on that device, so a window step uploads only its new
    pairs. Memory per cached ordered pair at network resolution h x w: 40 h w bytes on the host
    (points 2 x 12, confidences 2 x 4, weights 2 x 4 bytes per pixel: 7.9 MB at 512x384), plus
    32 h w bytes (6.3 MB) on the device with ``tensor_device``;
  * the decoder cross-attention maps come with the pointmaps of the same pass when asked for
    (Easi3R segmentation), and :meth:`reweighted` runs Easi3R's second pass (decoder-1 attention
    from static view-1 tokens to dynamic view-2 tokens zeroed, with that pass's maps when asked
    for), cached per pair and token mask; :meth:`encoder_tokens` gives the frames' post-norm
    encoder tokens (Easi3R's clustering features) from the engine's frame cache.

All arrays are float32 at network resolution (h, w); non-finite network outputs are reported by
:meth:`finite_views` (from the flags made at cache entry) so the window step can skip the frame
with a reason.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import pixel_grid
from dynrecon_ros.predictors.base import PairPrediction, PairPredictor

if TYPE_CHECKING:
    from dynrecon_ros.config import BackendConfig

KEYS = ('pts3d_1', 'conf_1', 'pts3d_2_in_1', 'conf_2')


@dataclass
class Dust3rConfig:
    """The network predictor's settings: the same-named fields of the pipeline's ``backend`` section
    (:class:`dynrecon_ros.config.BackendConfig`, which documents them and holds the defaults); build
    it with :meth:`from_backend`. image_size: network input size (0 = the model's, 512 or 224).
    pair_cache: ordered pairs whose outputs are kept at least; the caches always keep the last
    call's ordered pairs, which is all the next window step can reuse (0: exactly those; 7.9 MB per
    pair at 512x384, e.g. ~0.4 GB for the 51 ordered pairs of a window of 8; see the module
    docstring)."""

    checkpoint: str
    image_size: int
    pair_cache: int

    @classmethod
    def from_backend(cls, backend: BackendConfig, **overrides) -> 'Dust3rConfig':
        """The fields of ``backend`` (a :class:`dynrecon_ros.config.BackendConfig`) with these names,
        ``overrides`` replacing some."""
        return cls(**{f.name: overrides.get(f.name, getattr(backend, f.name)) for f in dataclasses.fields(cls)})


class Dust3rPredictor(PairPredictor):
    """Window predictor over a loaded :class:`dynrecon_ros.network.PairNetwork` (see module docstring).

    ``net`` needs ``cfg.img_size`` and ``predict_pairs(images, pairs, frame_ids=...,
    return_attention=..., cross_attn_zero=...)``, and ``encoder_features(images, frame_ids=...)`` for
    the attention segmentation (tests pass stand-ins with the same interface).
    """

    metric = False
    needs_depth = False

    def __init__(self, net, config: Dust3rConfig):
        self.net = net
        self.cfg = config
        size = self.cfg.image_size or max(net.cfg.img_size)
        self.size = 224 if size == 224 else int(size)
        self.patch_size = int(getattr(net.cfg, 'patch_size', 16))
        self._inputs: OrderedDict = OrderedDict()  # key -> Resized
        self._pairs: OrderedDict = OrderedDict()  # (key_i, key_j) -> {name: array}
        self._second: OrderedDict = OrderedDict()  # (key_i, key_j, mask bytes) -> {name: array}
        self._grids: dict = {}
        self.tensor_device = None  # e.g. 'cuda': cached points and weights also kept there (module docstring)

    def window_step(self, cfg, flows, segmenter, times, device: str):
        """:class:`dynrecon_ros.monocular.MonocularWindow` over this predictor."""
        from dynrecon_ros.monocular import MonocularWindow
        return MonocularWindow(cfg, self, flows, segmenter, times, device)

    # ------------------------------------------------------------------ resolution mapping
    def network_input(self, frame):
        """The frame's :class:`~dynrecon_ros.network.preprocess.Resized` network input (cached)."""
        from dynrecon_ros.network import preprocess_image
        r = self._inputs.get(frame.key)
        if r is None:
            r = preprocess_image(frame.rgb, self.size)
            self._inputs[frame.key] = r
            while len(self._inputs) > max(64, getattr(self.net, 'cache_frames', 0)):
                self._inputs.popitem(last=False)
        else:
            self._inputs.move_to_end(frame.key)
        return r

    def network_shape(self, frame) -> tuple[int, int]:
        return self.network_input(frame).rgb.shape[:2]

    def _grid(self, frame, to_input: bool):
        r = self.network_input(frame)
        H, W = frame.rgb.shape[:2]
        h, w = r.rgb.shape[:2]
        gk = (to_input, r.scale_x, r.scale_y, r.crop_x0, r.crop_y0, h, w, H, W)
        if gk not in self._grids:  # one stream size: each sampling grid is computed once
            if to_input:  # for each input pixel its position in the network image
                u, v = np.moveaxis(pixel_grid(H, W), -1, 0)
                mx = (u + 0.5) * r.scale_x - 0.5 - r.crop_x0
                my = (v + 0.5) * r.scale_y - 0.5 - r.crop_y0
                inside = (mx >= -0.5) & (mx <= w - 0.5) & (my >= -0.5) & (my <= h - 0.5)
            else:  # for each network pixel its position in the input image
                u, v = np.moveaxis(pixel_grid(h, w), -1, 0)
                mx = (u + 0.5 + r.crop_x0) / r.scale_x - 0.5
                my = (v + 0.5 + r.crop_y0) / r.scale_y - 0.5
                inside = np.ones((h, w), bool)
            self._grids[gk] = (mx, my, inside)
        return self._grids[gk]

    def to_input(self, arr: np.ndarray, frame, nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Network-resolution map (h, w[, c]) -> input pixels (H, W[, c]) and (H, W) bool of pixels
        inside the network's crop (outside: replicated border, callers mask them)."""
        mx, my, inside = self._grid(frame, True)
        a = np.ascontiguousarray(arr, dtype=np.float32)
        out = cv2.remap(a, mx, my, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
        return out, inside

    def to_network(self, arr: np.ndarray, frame, nearest: bool = False) -> np.ndarray:
        """Input-resolution map (H, W[, c]) -> network pixels (h, w[, c])."""
        mx, my, _ = self._grid(frame, False)
        a = np.ascontiguousarray(arr, dtype=np.float32)
        return cv2.remap(a, mx, my, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    def K_to_network(self, K: np.ndarray, frame) -> tuple[float, np.ndarray]:
        """(focal, (2,) principal point) at network resolution for an input-resolution K (3, 3)
        (one focal: the mean of fx and fy after the resize)."""
        r = self.network_input(frame)
        f = 0.5 * (K[0, 0] * r.scale_x + K[1, 1] * r.scale_y)
        pp = np.array([(K[0, 2] + 0.5) * r.scale_x - 0.5 - r.crop_x0, (K[1, 2] + 0.5) * r.scale_y - 0.5 - r.crop_y0])
        return float(f), pp

    def K_from_network(self, focal: float, pp, frame) -> np.ndarray:
        """Input-resolution K (3, 3) for a network-resolution focal and principal point."""
        r = self.network_input(frame)
        return np.array([[focal / r.scale_x, 0, (pp[0] + 0.5 + r.crop_x0) / r.scale_x - 0.5],
                         [0, focal / r.scale_y, (pp[1] + 0.5 + r.crop_y0) / r.scale_y - 0.5], [0, 0, 1.0]])

    # ------------------------------------------------------------------ network
    def _run(self, frames, pairs, attention: bool, zero=None) -> dict:
        """predict_pairs over the images the pairs use; arrays indexed like ``pairs``."""
        used = sorted({i for p in pairs for i in p})
        local = {f: k for k, f in enumerate(used)}
        rs = [self.network_input(frames[f]) for f in used]
        if len({r.rgb.shape for r in rs}) != 1:
            raise InputError(f'frames {[frames[f].key for f in used]} have different network input sizes')
        kw = {'frame_ids': [frames[f].key for f in used]}
        if attention:
            kw['return_attention'] = True
        if zero is not None:
            kw['cross_attn_zero'] = zero
        return self.net.predict_pairs(np.stack([r.rgb for r in rs]), [(local[i], local[j]) for i, j in pairs], **kw)

    @staticmethod
    def _bound(cache: OrderedDict, n: int) -> None:
        while len(cache) > n:
            cache.popitem(last=False)

    def predict_window(self, frames, pairs, attention: bool = False) -> dict:
        """Pairwise outputs for ordered ``pairs`` [(i, j)] of ``frames`` (local indices).

        Returns {'pts3d_1', 'pts3d_2_in_1': (P, h, w, 3), 'conf_1', 'conf_2': (P, h, w)} float32 at
        network resolution (non-finite network outputs fixed with weight 0 and flagged: 'finite' (P, 2)
        and :meth:`finite_views`; 'logw_1', 'logw_2' (P, h, w) the log-confidence weights), plus
        'cross_attn_1', 'cross_attn_2' (P, layers, heads, h/16, w/16) when ``attention``.
        Only pairs not in the cache reach the network.
        """
        names = KEYS + (('cross_attn_1', 'cross_attn_2') if attention else ())
        keys = self._ensure(frames, pairs, attention)
        return self._gather(self._pairs, keys, names)

    def _ensure(self, frames, pairs, attention: bool) -> list:
        """Run the network for the ``pairs`` not in the pair cache (or cached without the attention
        maps when ``attention``) and cache their entries; returns the pairs' cache keys."""
        keys = [(frames[i].key, frames[j].key) for i, j in pairs]
        todo = [k for k, key in enumerate(keys) if key not in self._pairs
                or (attention and 'cross_attn_1' not in self._pairs[key])]
        if todo:
            out = self._run(frames, [pairs[k] for k in todo], attention)
            for n, k in enumerate(todo):
                self._pairs[keys[k]] = self._entry(out, n, attention)
        return keys

    def _entry(self, out: dict, n: int, attention: bool = False) -> dict:
        """The cache entry of pair ``n`` of a network output, made once per pair (module docstring):
        {'pts3d_1', 'pts3d_2_in_1': (h, w, 3), 'conf_1', 'conf_2', 'logw_1', 'logw_2': (h, w)} float32
        with non-finite pixels fixed, 'finite': (2,) bool (view 1, view 2 all finite), 'bad_1' /
        'bad_2': (h, w) bool only where a view had non-finite pixels, the attention maps when
        ``attention``, and 'dev': {name: float32 tensor} on ``tensor_device`` when that is set."""
        e = {}
        finite = []
        for v, (p, c) in enumerate((('pts3d_1', 'conf_1'), ('pts3d_2_in_1', 'conf_2')), 1):
            pts = np.array(_host(out[p][n]), dtype=np.float32)  # own copy: the batch output is not kept
            conf = np.array(_host(out[c][n]), dtype=np.float32)
            bad = ~np.isfinite(pts).all(-1) | ~np.isfinite(conf)
            if bad.any():  # no weight: log(1) = 0; the point is any finite one
                pts[bad] = (0, 0, 1)
                conf[bad] = 1
                e[f'bad_{v}'] = bad
            finite.append(not bad.any())
            e[p], e[c], e[f'logw_{v}'] = pts, conf, np.log(np.maximum(conf, 1))
        e['finite'] = np.array(finite)
        if attention:
            for name in ('cross_attn_1', 'cross_attn_2'):
                e[name] = np.array(_host(out[name][n]))  # own copy: the batch output is not kept
        if self.tensor_device is not None:
            import torch
            e['dev'] = {k: torch.from_numpy(e[k]).to(self.tensor_device, torch.float32)
                        for k in ('pts3d_1', 'pts3d_2_in_1', 'logw_1', 'logw_2')}
        return e

    def reweighted(self, frames, pairs, masks, attention: bool = False) -> dict:
        """Easi3R's second pass for ``pairs``: decoder-1 cross-attention from static view-1 tokens to
        dynamic view-2 tokens zeroed. masks: (N, h, w) dynamic masks at network resolution (one per
        frame). Returns the pointmap outputs like :meth:`predict_window`, with the second pass's
        'cross_attn_1', 'cross_attn_2' when ``attention`` (Easi3R recomputes the masks from them);
        cached per pair and token selection: unchanged masks cost nothing."""
        from dynrecon_ros.attention_segmentation import token_mask_for_reweighting
        q, k = token_mask_for_reweighting(masks, pairs, self.patch_size)
        keys = [(frames[i].key, frames[j].key, q[e].tobytes(), k[e].tobytes()) for e, (i, j) in enumerate(pairs)]
        todo = [e for e, key in enumerate(keys) if key not in self._second
                or (attention and 'cross_attn_1' not in self._second[key])]
        plain = [e for e in todo if not k[e].any() or not q[e].any()]  # nothing to zero: the first pass
        plain_set = set(plain)
        run = [e for e in todo if e not in plain_set]
        if plain:  # the first pass's entry itself (shared, no copy)
            first = self._ensure(frames, [pairs[e] for e in plain], attention)
            for key, e in zip(first, plain):
                self._second[keys[e]] = self._pairs[key]
        if run:
            out = self._run(frames, [pairs[e] for e in run], attention, zero=(q[run], k[run]))
            for n, e in enumerate(run):
                self._second[keys[e]] = self._entry(out, n, attention)
        return self._gather(self._second, keys, KEYS + (('cross_attn_1', 'cross_attn_2') if attention else ()))

    def encoder_tokens(self, frames) -> np.ndarray:
        """(N, h/16, w/16, C) float32: the frames' encoder output after the encoder's final norm
        (``net.encoder_features``; the engine's frame cache: no re-encoding after a window's pass)."""
        rs = [self.network_input(f) for f in frames]
        if len({r.rgb.shape for r in rs}) != 1:
            raise InputError(f'frames {[f.key for f in frames]} have different network input sizes')
        feats = self.net.encoder_features(np.stack([r.rgb for r in rs]), frame_ids=[f.key for f in frames])
        return np.asarray(_host(feats), dtype=np.float32)

    def _gather(self, cache: OrderedDict, keys: list, names) -> dict:
        """{name: (P, ...) stacked} of the cached pair outputs under ``keys`` (all present), plus
        'logw_1', 'logw_2' (P, h, w) and 'finite' (P, 2), and the device tensors of the same names
        with a '_t' suffix when every entry has them (stacked on the device: no host->device copy),
        marked recently used; then the cache is bounded.

        The bound: ``keys`` already holds both directions of every pair of this step; the next step
        can reuse only pairs among the frames that stay in the window, a subset of this step's pairs
        (the new frame's pairs are new), so the cache keeps this step's pairs (``pair_cache`` at
        least) and nothing more."""
        for key in keys:
            cache.move_to_end(key)
        entries = [cache[key] for key in keys]
        res = {name: np.stack([en[name] for en in entries]) for name in tuple(names) + ('logw_1', 'logw_2', 'finite')}
        if all('dev' in en for en in entries):
            import torch
            for name in entries[0]['dev']:
                res[name + '_t'] = torch.stack([en['dev'][name] for en in entries])
        self._bound(cache, max(self.cfg.pair_cache, len(keys)))
        return res

    @staticmethod
    def finite_views(out: dict, pairs, frame: int) -> bool:
        """True when the network gave finite outputs for every view of local frame ``frame`` in
        ``pairs``; ``out`` from :meth:`predict_window` or :meth:`reweighted` (their 'finite' (P, 2)
        flags, made at cache entry)."""
        fin = out['finite']
        return all(fin[e, v] for e, p in enumerate(pairs) for v in (0, 1) if p[v] == frame)

    # ------------------------------------------------------------------ PairPredictor interface
    def predict(self, frame_i, frame_j, flow=None, static_i: np.ndarray | None = None) -> PairPrediction:
        """The raw pair outputs (network units, arbitrary per-pair scale) at input size, in i's frame.
        The pose of j in i is not known from one pair alone (None): the window step aligns pairs."""
        out = self.predict_window([frame_i, frame_j], [(0, 1)])
        entry = self._pairs[(frame_i.key, frame_j.key)]
        nan = np.float32('nan')
        for v, name in ((1, 'pts3d_1'), (2, 'pts3d_2_in_1')):  # the network's non-finite pixels: NaN again
            if f'bad_{v}' in entry:
                out[name][0][entry[f'bad_{v}']] = nan
        pi, inside_i = self.to_input(out['pts3d_1'][0], frame_i)
        pj, inside_j = self.to_input(out['pts3d_2_in_1'][0], frame_j)
        ci, _ = self.to_input(out['conf_1'][0], frame_i)
        cj, _ = self.to_input(out['conf_2'][0], frame_j)
        return PairPrediction(pts_i=np.where(inside_i[..., None], pi, nan).astype(np.float32),
                              pts_j_in_i=np.where(inside_j[..., None], pj, nan).astype(np.float32),
                              conf_i=np.maximum(np.nan_to_num(ci, nan=1.0), 1).astype(np.float32),
                              conf_j=np.maximum(np.nan_to_num(cj, nan=1.0), 1).astype(np.float32), metric=False)


def _host(x):
    """A network output (numpy array or torch tensor, any device) as a numpy array."""
    return x.detach().cpu().numpy() if hasattr(x, 'detach') else np.asarray(x)


def make(backend: BackendConfig, checkpoint: str | None, device: str) -> Dust3rPredictor:
    """Predictor for ``make_predictor('dust3r', ...)``: the pipeline's ``backend`` section, the
    checkpoint (None: ``backend.checkpoint``)."""
    from dynrecon_ros.network import load_network
    cfg = Dust3rConfig.from_backend(backend, checkpoint=checkpoint or backend.checkpoint)
    if not cfg.checkpoint:
        raise InputError('backend dust3r needs a checkpoint: give --checkpoint FILE (or backend.checkpoint)')
    return Dust3rPredictor(load_network(cfg.checkpoint, device=device), cfg)
