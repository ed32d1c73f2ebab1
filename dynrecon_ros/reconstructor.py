"""Stage 8, the Reconstructor: ties window, flow, pair predictor, alignment, segmentation and map.

``push(frame)`` does one window step for the new frame and returns the results that became final
(frames ``window.output_lag`` steps old, plus any skipped frames before them), in push order;
``flush()`` returns the rest at the end of a stream. Every pushed frame gets exactly one
:class:`FrameResult`. Bad frames are skipped with a reason (logged) and the pipeline keeps going.

One step for a new frame t:
  1. checks (stamp order, intrinsics, depth, constant image);
  2. flow for each pair (older, t) of the pair graph (neighbours + keyframe anchors), cached;
  3. relative pose per pair from the pair predictor (RGB-D: RANSAC Umeyama on flow + depth),
     initial pose of t from the nearest pair; jump / tracking-lost checks;
  4. windowed alignment of the not-yet-emitted poses over all stored pairs' static correspondences;
  5. motion segmentation of t (and refresh of the window) from flow vs ego-flow;
  6. frames leaving the lag are emitted and integrated into the static voxel map.

Speed: RGB-D frames wider than ``max_work_width`` go through steps 2-5 at 1/s of their size (s an
integer; 640x480 -> 320x240); their outputs are brought back to the input size (mask edges snapped
to the input depth). Map integration runs on a background thread (one frame at a time, in order)
while the next frames are processed; :meth:`static_map`, :meth:`save_map` and :meth:`flush` wait
for it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import cv2
import numpy as np

from dynrecon_ros.alignment import PairConstraint, WindowAligner
from dynrecon_ros.config import ReconConfig
from dynrecon_ros.errors import InputError
from dynrecon_ros.flow import DISFlow, FlowCache
from dynrecon_ros.frames import Frame
from dynrecon_ros.geometry import poses_from_tum, transform_points
from dynrecon_ros.segmentation import MotionSegmenter, clean_mask, refine_upsampled_mask
from dynrecon_ros.static_map import VoxelMap
from dynrecon_ros.window import SlidingWindow, WindowEntry


@dataclass
class FrameResult:
    """Result for one pushed frame.

    pose: (4, 4) float64 world<-camera (optical frame), None when skipped; depth: (H, W) float32
    metres; mask: (H, W) uint8 255 = dynamic; dynamic_prob: (H, W) float32 in [0, 1]; confidence:
    (H, W) float32 in [0, 1]; K: (3, 3) float64.
    """

    stamp: float
    key: str
    status: str
    reason: str = ''
    pose: np.ndarray | None = None
    depth: np.ndarray | None = None
    mask: np.ndarray | None = None
    dynamic_prob: np.ndarray | None = None
    confidence: np.ndarray | None = None
    K: np.ndarray | None = None


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
        # block statistics over the s * s strided views (one per position in the block)
        views = [frame.depth[dy:h * s:s, dx:w * s:s] for dy in range(s) for dx in range(s)]
        cnt = sum((v > 0).astype(np.float32) for v in views)
        mean = sum(views) / np.maximum(cnt, 1)
        inf = np.float32(np.inf)
        near = np.minimum.reduce([np.where(v > 0, v, inf) for v in views])
        far = np.maximum.reduce(views)
        depth = np.where(cnt == 0, 0, np.where(far - near <= 0.02 * near + 0.01, mean, near)).astype(np.float32)
    K = None
    if frame.K is not None:
        K = frame.K.copy()
        K[0, 0] /= s
        K[1, 1] /= s
        K[0, 2] = (K[0, 2] - (s - 1) / 2) / s
        K[1, 2] = (K[1, 2] - (s - 1) / 2) / s
    return Frame(frame.stamp, rgb, depth, K, key=frame.key, meta=frame.meta)


def upsample(img: np.ndarray, s: int, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """(h, w) work-size map -> (H, W) = ``size`` input-size map (inverse of :func:`downscale_frame`'s
    block layout; the input's pixels beyond the last whole block repeat the border)."""
    h, w = img.shape[:2]
    up = cv2.resize(img, (w * s, h * s), interpolation=interpolation)
    H, W = size
    if up.shape[:2] != (H, W):
        up = cv2.copyMakeBorder(up, 0, H - h * s, 0, W - w * s, cv2.BORDER_REPLICATE)
    return up


class StageTimes:
    """Running mean milliseconds per stage name: O(1) memory however long the stream runs."""

    def __init__(self):
        self._acc: dict[str, list] = defaultdict(lambda: [0.0, 0])  # name -> [total ms, count]

    def add(self, name: str, ms: float) -> None:
        acc = self._acc[name]
        acc[0] += ms
        acc[1] += 1

    def lap(self, name: str, t0: float) -> float:
        """Add the time since ``t0`` (time.perf_counter) to ``name``; returns now (the next lap's t0)."""
        t = time.perf_counter()
        self.add(name, (t - t0) * 1e3)
        return t

    def means(self) -> dict[str, float]:
        return {k: total / n for k, (total, n) in list(self._acc.items()) if n}


def _world_pose_matrix(v) -> np.ndarray:
    if len(v) != 7:
        raise InputError(f'world_pose must be [tx, ty, tz, qx, qy, qz, qw], got {v}')
    return poses_from_tum(v)


class Reconstructor:
    """Online dynamic-scene reconstruction (see module docstring).

    Args:
        config: the pipeline configuration (defaults = product defaults).
        predictor: a :class:`dynrecon_ros.predictors.PairPredictor`; default from ``config.backend``
            (RGB-D).
        device: torch device of the alignment ('cpu' or 'cuda').
        log: callable(str) receiving warnings (skipped frames); None = silent.
    """

    def __init__(self, config: ReconConfig | None = None, predictor=None, device: str = 'cpu', log=None):
        import torch
        self.cfg = cfg = config or ReconConfig()
        self.log = log or (lambda msg: None)
        if predictor is None:
            from dynrecon_ros.predictors import make_predictor
            from dynrecon_ros.predictors.rgbd import RGBDPredictorConfig
            name = 'rgbd' if cfg.backend.name == 'auto' else cfg.backend.name
            b = cfg.backend
            rc = RGBDPredictorConfig(ransac_iterations=b.ransac_iterations, ransac_px_threshold=b.ransac_px_threshold,
                                     ransac_depth_threshold=b.ransac_depth_threshold, ransac_samples=b.ransac_samples,
                                     min_px_threshold=b.min_px_threshold, halo_fraction=b.halo_fraction, stride=b.stride,
                                     min_depth_m=b.min_depth_m, max_depth_m=b.max_depth_m, min_inliers=b.min_inliers,
                                     photometric_iterations=b.photometric_iterations,
                                     photometric_samples=b.photometric_samples, min_gradient=b.min_gradient)
            predictor = make_predictor(name, rc if name == 'rgbd' else cfg, b.checkpoint or None, device)
        self.predictor = predictor
        if cfg.flow.method != 'dis':
            raise InputError(f'flow.method {cfg.flow.method!r} is not available (only "dis")')
        self.flows = FlowCache(DISFlow(cfg.flow.preset), cfg.flow.fb_threshold_px, cfg.flow.fb_relative)
        w = cfg.window
        if w.output_lag < 0 or w.output_lag >= w.size:
            raise InputError(f'window.output_lag must be in [0, window.size-1], got {w.output_lag}')
        self.window = SlidingWindow(w.size, w.neighbours, w.keyframes, w.keyframe_translation_m,
                                    w.keyframe_rotation_deg, w.keyframe_max_gap, w.long_stride)
        a = cfg.alignment
        if a.threads > 0:
            torch.set_num_threads(a.threads)
        self.aligner = WindowAligner(a.iterations, a.sigma_point_m, a.sigma_flow_px, a.flow_weight,
                                     a.smooth_weight, a.huber, device=device)
        self.segmenter = MotionSegmenter(cfg.segmentation)
        self.map = VoxelMap(cfg.map)
        self.default_K = None
        if cfg.intrinsics is not None:
            fx, fy, cx, cy = [float(v) for v in cfg.intrinsics]
            self.default_K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        self.world_pose = np.eye(4) if cfg.world_pose is None else _world_pose_matrix(cfg.world_pose)
        self._pending: list = []  # FrameResult (skipped) or WindowEntry (accepted), push order
        self._constraints: dict[tuple[int, int], PairConstraint] = {}  # by push indices
        self._last_stamp = None
        self._size = None
        self._rng = np.random.default_rng(0)
        self._times = StageTimes()
        self._map_pool = None  # the map thread (started with the first integration)
        self._map_job = None
        from dynrecon_ros.monocular import monocular_step_for  # window predictors: the monocular step
        self.monocular = monocular_step_for(cfg, predictor, self.flows, self.segmenter, self._times, device)

    # ------------------------------------------------------------------ public API
    @property
    def timings(self) -> dict[str, float]:
        """Mean milliseconds per stage (per pushed frame for 'total').

        'map' is the time ``push`` spends on an emitted frame (outputs at the input size, waiting
        for the map thread); 'map_integrate' the integration itself, which runs on the map thread
        while the next frames are processed.
        """
        return self._times.means()

    def push(self, frame) -> list[FrameResult]:
        t0 = time.perf_counter()
        try:
            self._step(frame)
        finally:
            self._times.add('total', (time.perf_counter() - t0) * 1e3)
            # every pair of a step has the step's newest frame in it, so no cached flow is looked up again:
            # keep none (a skipped frame's flows would stay until the next accepted frame: unbounded while
            # tracking is lost, ~5 MiB per pair at 640x480)
            self.flows.keep_only(set())
        return self._emit(final=False)

    def flush(self) -> list[FrameResult]:
        out = self._emit(final=True)
        self._map_wait()
        return out

    def static_map(self) -> np.ndarray:
        """(M, 6) float32 x y z r g b of the static map in the world frame."""
        self._map_wait()
        return self.map.points()

    def save_map(self, path) -> int:
        self._map_wait()
        return self.map.save_ply(path)

    # ------------------------------------------------------------------ internals
    def _skip(self, frame, reason: str) -> None:
        self.log(f'frame {getattr(frame, "key", "?")}: skipped: {reason}')
        self._pending.append(FrameResult(stamp=float(getattr(frame, 'stamp', float('nan'))),
                                         key=str(getattr(frame, 'key', '')), status='skipped', reason=reason))

    def _check(self, frame) -> str:
        c = self.cfg.checks
        if self._last_stamp is not None and frame.stamp <= self._last_stamp:
            return (f'timestamp {frame.stamp:.6f} is not after the previous accepted one '
                    f'({self._last_stamp:.6f}): duplicate or backwards')
        if self._size is not None and frame.size != self._size:
            return f'image size {frame.size} differs from the stream size {self._size}'
        if frame.K is None and self.default_K is None and not getattr(self.predictor, 'estimates_intrinsics', False):
            return 'no intrinsics (frame has no K and no default intrinsics are configured)'
        if self.predictor.needs_depth:
            if frame.depth is None:
                return 'no depth image (the rgbd backend needs depth)'
            d = frame.depth
            valid = np.isfinite(d) & (d > 0)
            if valid.mean() < c.min_valid_depth:
                return f'only {100 * valid.mean():.1f}% of the depth is valid (min {100 * c.min_valid_depth:.0f}%)'
        grey = cv2.cvtColor(frame.rgb[::2, ::2], cv2.COLOR_RGB2GRAY)  # every 2nd pixel: std all the same
        std = float(grey.std())
        if std < c.min_image_std:
            return f'black or constant image (grey std {std:.2f})'
        return ''

    def _step(self, frame) -> None:
        reason = self._check(frame)
        if reason:
            return self._skip(frame, reason)
        if frame.K is None:
            frame.K = self.default_K
        if self.monocular is not None:  # network backend: dynrecon_ros/monocular.py does the window step
            pending = self._pending_ids()
            published = {e.index for e in self.window.all_entries() if id(e) not in pending}
            entry, _ = self.window.add(frame)
            reason = self.monocular.step(self.window, entry, published, self.world_pose)
            if reason:
                self.window.pop_last()
                return self._skip(frame, reason)
            self._accept(frame, entry)
            if self.window.is_keyframe(entry.pose, entry.index):
                self.window.mark_keyframe(entry)
            return
        if frame.depth is not None:
            frame.depth = np.where(np.isfinite(frame.depth) & (frame.depth > 0), frame.depth, 0).astype(np.float32)
        inp = frame
        s = self._work_factor(frame)
        if s > 1:  # every stage below runs on the frame at the processing size; outputs go back to inp's
            frame = downscale_frame(frame, s)
        entry, _ = self.window.add(frame)
        entry.data['input'] = inp
        if len(self.window) == 1 and not self.window.keyframes:
            # the first accepted frame defines the world
            entry.pose = self.world_pose.copy()
            self._accept(inp, entry)
            entry.data['conf'] = (frame.depth > 0).astype(np.float32) if frame.depth is not None else None
            self.window.mark_keyframe(entry)
            return
        t = time.perf_counter()
        pairs = self.window.pairs_for_newest()
        pflows = [self.flows.get(o.key, o.frame.rgb, entry.key, frame.rgb) for o, _ in pairs]
        t = self._times.lap('flow', t)
        rel = []
        for k, ((old, _), pf) in enumerate(zip(pairs, pflows)):
            static = None
            if old.mask is not None:
                static = ~old.mask
            init = None
            if k > 0 and rel[0][0] is not None:
                # long pair: predict from the tracked poses and the nearest pair, verify + refine only
                init = np.linalg.inv(old.pose) @ pairs[0][0].pose @ rel[0][0]
            T, inl, n = self.predictor.relative_pose(old.frame, frame, pf, static, init=init)
            rel.append((T, inl, n))
        t = self._times.lap('pose', t)
        T0, inl0, n0 = rel[0]
        c = self.cfg.checks
        prev = pairs[0][0]
        if T0 is None or inl0.sum() < c.min_inlier_ratio * max(n0, 1):
            self.window.pop_last()
            got = 0 if T0 is None else int(inl0.sum())
            return self._skip(frame, f'tracking lost against frame {prev.key}: {got} of {n0} '
                                     'correspondences fit a rigid motion (sudden jump or unusable image)')
        reason = c.jump(T0, frame.stamp - self._last_stamp, where=f' from frame {prev.key}')
        if reason:
            self.window.pop_last()
            return self._skip(frame, reason)
        entry.pose = prev.pose @ T0
        self._accept(inp, entry)
        # store static correspondences of every pair that produced a pose
        for (old, _), pf, (T, inl, n) in zip(pairs, pflows, rel):
            if T is None:
                continue
            self._constraints[(old.index, entry.index)] = self._make_constraint(old, entry, T, inl)
        entry.data['conf'] = (pflows[0].valid_bwd & (frame.depth > 0)).astype(np.float32)
        t = time.perf_counter()
        if self.cfg.alignment.enabled:
            self._align()
        t = self._times.lap('alignment', t)
        self._segment(pairs, pflows)
        t = self._times.lap('segmentation', t)
        if self.window.is_keyframe(entry.pose, entry.index):
            self.window.mark_keyframe(entry)
        keep = {e.index for e in self.window.all_entries()}
        self._constraints = {k: v for k, v in self._constraints.items() if k[0] in keep and k[1] in keep}

    def _work_factor(self, frame) -> int:
        """Downscale factor of the processing size (see ReconConfig.max_work_width); 1 = input size.

        Only for backends that read depth (RGB-D): network backends resize for the network themselves.
        """
        mw = self.cfg.max_work_width
        w = frame.rgb.shape[1]
        if mw <= 0 or w <= mw or not self.predictor.needs_depth:
            return 1
        return -(-w // mw)

    def _map_submit(self, depth, rgb, K, pose, static, conf, pixel_stride) -> None:
        """Integrate one frame into the map on the map thread (one frame at a time, in order).

        Integration (numpy / OpenCV, which release the GIL in their loops) overlaps the next
        frame's steps on the second core; the map is only read after :meth:`_map_wait`.
        """
        from concurrent.futures import ThreadPoolExecutor
        self._map_wait()
        if self._map_pool is None:
            self._map_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='dynrecon-map')

        def job():
            t = time.perf_counter()
            self.map.integrate(depth, rgb, K, pose, static, conf, pixel_stride=pixel_stride)
            self._times.add('map_integrate', (time.perf_counter() - t) * 1e3)

        self._map_job = self._map_pool.submit(job)

    def _map_wait(self) -> None:
        """Wait for the frame being integrated (re-raises its error)."""
        job, self._map_job = self._map_job, None
        if job is not None:
            job.result()

    def _pending_ids(self) -> set[int]:
        """ids of the accepted window entries whose results are not out yet."""
        return {id(e) for e in self._pending if isinstance(e, WindowEntry)}

    def _accept(self, frame, entry: WindowEntry) -> None:
        self._last_stamp = frame.stamp
        self._size = frame.size
        self._pending.append(entry)

    def _make_constraint(self, a: WindowEntry, b: WindowEntry, T_a_b: np.ndarray, inliers: np.ndarray) -> PairConstraint:
        """Static correspondences a -> b for the alignment, from the pair prediction.

        The points are a's static inlier pixels; their match in b is where the pair's relative pose
        puts them (the predictor's pointmap of the pair: for RGB-D the refined direct alignment,
        which is more precise than the raw flow end points).
        """
        fa, fb = a.frame, b.frame
        da = fa.depth.reshape(-1)
        use = np.flatnonzero(inliers.reshape(-1) & np.isfinite(da) & (da > 0))
        n = self.cfg.alignment.points_per_pair
        if len(use) > n:
            use = self._rng.choice(use, n, replace=False)
        # a's points, unprojected only where used
        z = da[use].astype(np.float64)
        vs, us = np.divmod(use, fa.depth.shape[1])
        Ka = fa.K
        Pa = np.stack([(us - Ka[0, 2]) / Ka[0, 0] * z, (vs - Ka[1, 2]) / Ka[1, 1] * z, z], -1)
        Pb = transform_points(np.linalg.inv(T_a_b), Pa)
        K = fb.K
        uv = np.stack([K[0, 0] * Pb[:, 0] / Pb[:, 2] + K[0, 2], K[1, 1] * Pb[:, 1] / Pb[:, 2] + K[1, 2]], -1)
        return PairConstraint(a.index, b.index, Pa, Pb, uv, np.ones(len(use)))

    def _align(self) -> None:
        entries = self.window.all_entries()
        pos = {e.index: k for k, e in enumerate(entries)}
        cons = []
        for (ia, ib), c in self._constraints.items():
            if ia in pos and ib in pos and len(c.weight):
                cons.append(PairConstraint(pos[ia], pos[ib], c.pts_a, c.pts_b, c.uv_b, c.weight))
        pending = self._pending_ids()
        fixed = np.array([id(e) not in pending or e.index == 0 for e in entries])
        if fixed.all() or not cons:
            return
        poses = np.stack([e.pose for e in entries])
        K = np.stack([e.frame.K for e in entries])
        res = self.aligner.align(poses, fixed, cons, K)
        for e, p in zip(entries, res.poses):
            e.pose = p

    def _segment(self, pairs, pflows) -> None:
        """Segment the newest frame from its pairs; the older frames of those pairs get refreshed."""
        new = pairs[0][1]
        ents = [o for o, _ in pairs] + [new]
        # cleaned masks only for frames not emitted yet (older keyframes keep theirs as the pose
        # prior) and not for the newest frame: the next step refreshes it (its neighbour pair) and
        # cleans it then; until then its pose prior is the thresholded probability
        pending = self._pending_ids()
        lag0 = self.cfg.window.output_lag == 0
        need = [id(e) in pending and (e is not new or lag0) for e in ents]
        _, probs, masks = self.segmenter.segment_newest(pairs, pflows, carry_back=True, need_masks=need,
                                                        skip_frames=[id(e) not in pending for e in ents])
        for e, p, m, nd in zip(ents, probs, masks, need):
            if nd:
                e.data['prob'] = p
                e.data['mask'] = m
                e.mask = m > 0
            elif e is new:
                e.data['prob'] = p
                e.data.pop('mask', None)  # cleaned later (next step or when emitted)
                e.mask = p > self.cfg.segmentation.threshold

    def _emit(self, final: bool) -> list[FrameResult]:
        out: list[FrameResult] = []
        newest = self.window.entries[-1].index if self.window.entries else -1
        lag = self.cfg.window.output_lag
        while self._pending:
            head = self._pending[0]
            if isinstance(head, FrameResult):
                out.append(self._pending.pop(0))
                continue
            if not final and newest - head.index < lag and len(self._pending) <= self.cfg.window.size + lag:
                break  # (beyond that bound, frames skipped meanwhile (tracking lost) push the head out early)
            self._pending.pop(0)
            out.append(self._finish(head))
        return out

    def _finish(self, e: WindowEntry) -> FrameResult:
        wf = e.frame
        f = e.data.get('input', wf)
        h, w = wf.rgb.shape[:2]
        prob = e.data.get('prob', np.zeros((h, w), np.float32))
        mask = e.data.get('mask')
        if mask is None:  # segmented as the newest frame only (end of stream, a skipped neighbour)
            mask = clean_mask(prob, self.cfg.segmentation, wf.depth) if self.cfg.segmentation.enabled and \
                'prob' in e.data and wf.depth is not None else np.zeros((h, w), np.uint8)
        conf = e.data.get('conf')
        if conf is None:
            conf = np.ones((h, w), np.float32)
        t = time.perf_counter()
        s = 1
        if wf is not f:  # processed at a reduced size: back to the input size, mask edges on its depth
            s = f.rgb.shape[1] // w
            prob = upsample(prob, s, f.rgb.shape[:2], cv2.INTER_LINEAR)
            mask = refine_upsampled_mask(mask, s, f.depth, prob, self.cfg.segmentation)
            conf = upsample(conf, s, f.rgb.shape[:2], cv2.INTER_NEAREST) * (f.depth > 0)
        conf = (conf * (1.0 - prob)).astype(np.float32)
        if f.depth is not None:
            stride = self.cfg.map.pixel_stride * s if self.cfg.map.pixel_stride > 0 else None
            self._map_submit(f.depth, f.rgb, f.K, e.pose.copy(), mask == 0, conf, stride)
        self._times.lap('map', t)
        return FrameResult(stamp=f.stamp, key=f.key, status='ok', reason='', pose=e.pose.copy(),
                           depth=f.depth, mask=mask, dynamic_prob=prob, confidence=conf, K=f.K)
