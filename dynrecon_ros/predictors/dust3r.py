"""DUSt3R / MonST3R network pair predictor: a monocular baseline over :mod:`dynrecon_ros.network`.

Per frame (``prepare_frame``, called by the Reconstructor before the frame's pairs):
  * the image is resized/cropped to the network input with the documented preprocessing
    (:func:`dynrecon_ros.network.preprocess_image`); outputs are resampled back to the input pixels
    (cv2.remap through the resize scale and crop offset; pixels outside the crop get no depth);
  * encoder tokens are cached by ``frame.key`` (each frame is encoded once while it stays in the
    engine's cache);
  * depth: the z of the frame's own pointmap (view 1 of pair (t, ref), or of the self-pair (t, t)
    for the first frame), put on ONE scale along the stream: the first frame fixes it (metric from
    its depth image when present, else ``metric_scale`` metres per network unit, else its median
    depth = 1 unit); each later frame gets the scale of the sim(3) fit of its pair with the previous
    accepted frame (whose depth is already on the stream scale). A frame that has a depth image is
    put on metric scale by the median ratio of its depth to the network's z, and the network depth
    (in metres) becomes the frame's depth;
  * K: the frame's K when given; else a focal length estimated once from the first frame's pointmap
    (principal point at the image centre, confidence-weighted least squares of
    pixel - pp = f (x/z, y/z) with a few iteratively reweighted L1 steps -- a simple robust fit, not
    DUSt3R's full Weiszfeld optimisation), kept for the whole stream (one camera).

Pose of j in i (``relative_pose``): pairs (i, j) and (j, i) are predicted (cached), i's points in
i's frame (pair (i, j), view 1, scaled to i's stream depth by a robust median ratio) are matched
pixel by pixel with i's points in j's frame (pair (j, i), view 2) by weighted Umeyama with scale
(weights = product of confidences), refitted on inliers (relative 3D residual under a robust
threshold). This is the honest per-pair baseline; the Easi3R/MonST3R window alignment of pointmaps
is separate work.

Non-finite network outputs never reach the outputs: the frame is skipped with a reason (prepare) or
the pair reports no pose (tracking lost).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from dynrecon_ros.errors import InputError
from dynrecon_ros.predictors.base import PairPrediction, PairPredictor


@dataclass
class Dust3rConfig:
    """metric_scale: metres per network unit for monocular streams (0 = unknown: the first frame's
    median depth is 1 unit). image_size: network input size (0 = the model's, 512 or 224).
    min_inliers: fewest pixels for a pose. inlier_rel: cap of the relative 3D residual of inliers.
    min_valid_depth: fraction of pixels with a finite positive network depth needed to accept a frame.
    """

    checkpoint: str = ''
    metric_scale: float = 0.0
    image_size: int = 0
    min_inliers: int = 60
    inlier_rel: float = 0.2
    min_inlier_rel: float = 0.01
    samples: int = 4000
    min_valid_depth: float = 0.3
    pair_cache: int = 16
    seed: int = 0


def umeyama_sim3(P: np.ndarray, Q: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R (3, 3), t (3,)) minimising sum w |P - (s R Q + t)|^2 for P, Q (N, 3) (Umeyama 1991;
    rgbd.umeyama has no scale)."""
    w = w / w.sum()
    mp, mq = w @ P, w @ Q
    Pc, Qc = P - mp, Q - mq
    C = (Pc * w[:, None]).T @ Qc
    U, S, Vt = np.linalg.svd(C)
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    var_q = float(w @ (Qc * Qc).sum(1))
    s = float(np.trace(np.diag(S) @ D) / max(var_q, 1e-12))
    return s, R, mp - s * R @ mq


def estimate_focal(pts: np.ndarray, conf: np.ndarray, pp: tuple[float, float], iterations: int = 3) -> float:
    """Focal length in pixels of a pointmap (H, W, 3) in its camera frame, confidences (H, W).

    Fits pixel - pp = f * (x/z, y/z) by confidence-weighted least squares, then ``iterations``
    reweighted steps (weights / residual: an L1 fit, robust to outliers). NaN when no pixel fits.
    """
    h, w = pts.shape[:2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    z = pts[..., 2].astype(np.float64)
    ok = np.isfinite(pts).all(-1) & np.isfinite(conf) & (z > 1e-6)
    if ok.sum() < 10:
        return float('nan')
    a = np.stack([u[ok] - pp[0], v[ok] - pp[1]], -1)
    b = np.stack([pts[..., 0][ok] / z[ok], pts[..., 1][ok] / z[ok]], -1)
    wt = conf[ok].astype(np.float64)
    f = float('nan')
    for _ in range(iterations + 1):
        den = (wt * (b * b).sum(1)).sum()
        if den <= 0:
            return float('nan')
        f = float((wt * (a * b).sum(1)).sum() / den)
        r = np.linalg.norm(a - f * b, axis=1)
        wt = conf[ok] / np.maximum(r, 1e-3)
    return f


class Dust3rPredictor(PairPredictor):
    """Pair predictor over a loaded :class:`dynrecon_ros.network.PairNetwork` (see module docstring)."""

    metric = False
    needs_depth = False
    estimates_intrinsics = True

    def __init__(self, net, config: Dust3rConfig | None = None):
        self.net = net
        self.cfg = config or Dust3rConfig()
        size = self.cfg.image_size or max(net.cfg.img_size)
        self.size = 224 if size == 224 else int(size)
        self.rng = np.random.default_rng(self.cfg.seed)
        self._inputs: OrderedDict = OrderedDict()  # key -> Resized
        self._pairs: OrderedDict = OrderedDict()  # (key_i, key_j) -> dict of input-size maps
        self._K = None  # estimated intrinsics of the stream (frames without K)
        self._scale = None  # network units -> stream units of the first frame (monocular)
        self._grid_key, self._grid = None, None

    # ------------------------------------------------------------------ network I/O
    def _input(self, frame):
        from dynrecon_ros.network import preprocess_image
        r = self._inputs.get(frame.key)
        if r is None:
            r = preprocess_image(frame.rgb, self.size)
            self._inputs[frame.key] = r
            while len(self._inputs) > max(8, self.net.cache_frames):
                self._inputs.popitem(last=False)
        return r

    def _to_input(self, arr: np.ndarray, r, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Resample a network-resolution map (h, w[, c]) to input pixels (H, W[, c]); also (H, W)
        bool of pixels inside the crop."""
        H, W = hw
        h, w = r.rgb.shape[:2]
        gk = (r.scale_x, r.scale_y, r.crop_x0, r.crop_y0, h, w, H, W)
        if self._grid_key != gk:  # one stream size: the sampling grid is computed once
            v, u = np.mgrid[0:H, 0:W].astype(np.float32)
            mx = (u + 0.5) * r.scale_x - 0.5 - r.crop_x0
            my = (v + 0.5) * r.scale_y - 0.5 - r.crop_y0
            inside = (mx >= -0.5) & (mx <= w - 0.5) & (my >= -0.5) & (my <= h - 0.5)
            self._grid_key, self._grid = gk, (mx, my, inside)
        mx, my, inside = self._grid
        out = cv2.remap(np.ascontiguousarray(arr, dtype=np.float32), mx, my, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
        return out, inside

    def _predict(self, fi, fj) -> dict:
        """Pairs (i, j) and (j, i) at input size (cached): A1 = i in i, A2 = j in i, B1 = j in j,
        B2 = i in j (H, W, 3) float32 and their confidences cA1, cA2, cB1, cB2 (H, W); ok_i, ok_j:
        pixels inside the crop with finite outputs."""
        key = (fi.key, fj.key)
        if key in self._pairs:
            self._pairs.move_to_end(key)
            return self._pairs[key]
        ri, rj = self._input(fi), self._input(fj)
        if ri.rgb.shape != rj.rgb.shape:
            raise InputError(f'frames {fi.key} and {fj.key} have different network input sizes')
        images = np.stack([ri.rgb, rj.rgb])
        if fi.key == fj.key:
            out = self.net.predict_pairs(images[:1], [(0, 0)], frame_ids=[fi.key])
            sel = [0, 0]
        else:
            out = self.net.predict_pairs(images, [(0, 1), (1, 0)], frame_ids=[fi.key, fj.key])
            sel = [0, 1]
        hw_i, hw_j = fi.rgb.shape[:2], fj.rgb.shape[:2]
        res = {}
        maps = {'A1': ('pts3d_1', sel[0], ri, hw_i), 'cA1': ('conf_1', sel[0], ri, hw_i),
                'A2': ('pts3d_2_in_1', sel[0], rj, hw_j), 'cA2': ('conf_2', sel[0], rj, hw_j),
                'B1': ('pts3d_1', sel[1], rj, hw_j), 'cB1': ('conf_1', sel[1], rj, hw_j),
                'B2': ('pts3d_2_in_1', sel[1], ri, hw_i), 'cB2': ('conf_2', sel[1], ri, hw_i)}
        ok = {}
        for name, (k, p, r, hw) in maps.items():
            a = np.asarray(out[k][p])
            fin = np.isfinite(a) if a.ndim == 2 else np.isfinite(a).all(-1)
            m, inside = self._to_input(np.where(fin[..., None] if a.ndim == 3 else fin, a, 0), r, hw)
            f_in, _ = self._to_input(fin.astype(np.float32), r, hw)
            res[name] = m
            view = 'i' if name in ('A1', 'cA1', 'B2', 'cB2') else 'j'
            good = inside & (f_in > 0.999)
            ok[view] = good if view not in ok else ok[view] & good
        res['ok_i'], res['ok_j'] = ok['i'], ok['j']
        self._pairs[key] = res
        while len(self._pairs) > self.cfg.pair_cache:
            self._pairs.popitem(last=False)
        return res

    # ------------------------------------------------------------------ per frame
    def prepare_frame(self, frame, ref) -> str:
        """Give ``frame`` a depth on the stream scale (and K when it has none); ``ref`` is the
        previous accepted frame (None for the first). Returns '' or the reason to skip the frame."""
        sensor = frame.depth
        if ref is None:
            p = self._predict(frame, frame)
            pts, conf, ok = p['A1'], p['cA1'], p['ok_i']
            if frame.K is None:
                if self._K is None:
                    f = estimate_focal(pts, np.where(ok, conf, 0), self._centre(frame))
                    h, w = frame.rgb.shape[:2]
                    if not np.isfinite(f) or not (0.1 * max(h, w) < f < 10 * max(h, w)):
                        return (f'cannot estimate the focal length from the network pointmap (got {f:.4g} px); '
                                'give intrinsics')
                    cx, cy = self._centre(frame)
                    self._K = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
            z = pts[..., 2]
            valid = ok & (z > 0)
            if valid.mean() < self.cfg.min_valid_depth:
                return self._few(valid)
            if self._scale is None or sensor is not None:
                self._scale = self._first_scale(z, valid, sensor)
                if self._scale is None:
                    return 'depth image has no valid pixel where the network predicts depth'
            depth = np.where(valid, z * self._scale, 0)
        else:
            p = self._predict(ref, frame)
            fit = self._fit(ref, frame, p, None)
            if fit is None:
                return f'no consistent pointmap fit with frame {ref.key}'
            s = fit[0]
            z = p['B1'][..., 2]
            valid = p['ok_j'] & (z > 0)
            if valid.mean() < self.cfg.min_valid_depth:
                return self._few(valid)
            if sensor is not None:
                s = self._first_scale(z, valid, sensor)
                if s is None:
                    return 'depth image has no valid pixel where the network predicts depth'
            depth = np.where(valid, z * s, 0)
        if frame.K is None:
            frame.K = self._K
        if frame.K is None:
            return 'no intrinsics and no focal estimate yet'
        if not np.isfinite(depth).all():
            return 'network output is not finite'
        frame.depth = depth.astype(np.float32)
        return ''

    def _few(self, valid) -> str:
        return (f'network gives a finite positive depth for only {100 * valid.mean():.1f}% of the pixels '
                f'(min {100 * self.cfg.min_valid_depth:.0f}%)')

    @staticmethod
    def _centre(frame) -> tuple[float, float]:
        h, w = frame.rgb.shape[:2]
        return (w - 1) / 2.0, (h - 1) / 2.0

    def _first_scale(self, z, valid, sensor) -> float | None:
        if sensor is not None:
            m = valid & np.isfinite(sensor) & (sensor > 0)
            if m.sum() < 10:
                return None
            return float(np.median(sensor[m] / z[m]))
        if self.cfg.metric_scale > 0:
            return float(self.cfg.metric_scale)
        return float(1.0 / np.median(z[valid]))

    # ------------------------------------------------------------------ per pair
    def _fit(self, fi, fj, p, static_i):
        """sim(3) fit of i's points: s_i A1 ≈ s R B2 + t. Returns (s, T_i_j, inliers_i, n) or None."""
        c = self.cfg
        if fi.depth is None:
            return None
        A1, B2 = p['A1'], p['B2']
        w = p['cA1'] * p['cB2']
        cand = p['ok_i'] & (A1[..., 2] > 0) & (B2[..., 2] > 0) & (fi.depth > 0) & np.isfinite(w) & (w > 0)
        if static_i is not None and (cand & static_i).sum() >= c.min_inliers:
            cand = cand & static_i
        flat = np.flatnonzero(cand)
        n = len(flat)
        if n < c.min_inliers:
            return None
        si = float(np.median(fi.depth.reshape(-1)[flat] / A1[..., 2].reshape(-1)[flat]))
        if not np.isfinite(si) or si <= 0:
            return None
        sub = flat if n <= c.samples else self.rng.choice(flat, c.samples, replace=False)
        P = si * A1.reshape(-1, 3)[sub].astype(np.float64)
        Q = B2.reshape(-1, 3)[sub].astype(np.float64)
        ws = w.reshape(-1)[sub].astype(np.float64)
        use = np.ones(len(sub), bool)
        for _ in range(3):
            if use.sum() < c.min_inliers:
                return None
            s, R, t = umeyama_sim3(P[use], Q[use], ws[use])
            r = np.linalg.norm(P - (s * Q @ R.T + t), axis=1) / np.maximum(P[:, 2], 1e-6)
            thr = float(np.clip(3 * 1.4826 * np.median(r[use]), c.min_inlier_rel, c.inlier_rel))
            use = r < thr
        if not (np.isfinite(s) and s > 0 and np.isfinite(R).all() and np.isfinite(t).all()):
            return None
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, t
        # inliers over every candidate pixel with the final fit
        Pa = si * A1.reshape(-1, 3)[flat].astype(np.float64)
        Qa = B2.reshape(-1, 3)[flat].astype(np.float64)
        ra = np.linalg.norm(Pa - (s * Qa @ R.T + t), axis=1) / np.maximum(Pa[:, 2], 1e-6)
        inl = np.zeros(A1.shape[:2], bool)
        inl.reshape(-1)[flat[ra < thr]] = True
        return s, T, inl, n

    def relative_pose(self, frame_i, frame_j, flow=None, static_i: np.ndarray | None = None,
                      init: np.ndarray | None = None):
        """(T_i_j (4, 4), inliers_i (H, W) bool, n candidate pixels), or (None, zeros, n).

        ``flow`` and ``init`` are not used (the pose comes from the pointmaps)."""
        h, w = frame_i.rgb.shape[:2]
        fit = self._fit(frame_i, frame_j, self._predict(frame_i, frame_j), static_i)
        if fit is None:
            return None, np.zeros((h, w), bool), 0
        _, T, inl, n = fit
        return T, inl, n

    def predict(self, frame_i, frame_j, flow=None, static_i: np.ndarray | None = None) -> PairPrediction:
        """Pair outputs at input size, scaled to the stream (i's depth), in i's frame."""
        p = self._predict(frame_i, frame_j)
        fit = self._fit(frame_i, frame_j, p, static_i)
        nan = np.float32('nan')
        if fit is None:
            si, T, inl = 1.0, None, None
            pts_j = np.where(p['ok_j'][..., None], p['A2'], nan)
        else:
            s, T, inl, _ = fit
            si = float(np.median((frame_i.depth / np.maximum(p['A1'][..., 2], 1e-9))[inl])) if inl.any() else 1.0
            pts_j = np.where(p['ok_j'][..., None], s * p['B1'] @ T[:3, :3].T.astype(np.float32)
                             + T[:3, 3].astype(np.float32), nan)
        pts_i = np.where(p['ok_i'][..., None], si * p['A1'], nan)
        return PairPrediction(pts_i=pts_i.astype(np.float32), pts_j_in_i=pts_j.astype(np.float32),
                              conf_i=np.maximum(p['cA1'], 1).astype(np.float32),
                              conf_j=np.maximum(p['cA2'], 1).astype(np.float32), T_i_j=T, inliers_i=inl,
                              metric=False)


def make(config=None, checkpoint: str | None = None, device: str = 'cpu') -> Dust3rPredictor:
    """Predictor for ``make_predictor('dust3r', ...)``: config is a ReconConfig (or None)."""
    from dynrecon_ros.network import load_network
    b = getattr(config, 'backend', None)
    ckpt = checkpoint or getattr(b, 'checkpoint', '') or ''
    if not ckpt:
        raise InputError('backend dust3r needs a checkpoint: give --checkpoint FILE (or backend.checkpoint)')
    dc = Dust3rConfig(checkpoint=ckpt, metric_scale=float(b.metric_scale) if b is not None else 0.0)
    if b is not None and getattr(b, 'min_inliers', None):
        dc.min_inliers = int(b.min_inliers)
    return Dust3rPredictor(load_network(ckpt, device=device), dc)
