"""Stage 8, the Reconstructor: ties window, flow, pair predictor, alignment, segmentation and map.

``push(frame)`` does one window step for the new frame and returns the results that became final
(frames ``window.output_lag`` steps old, plus any skipped frames before them), in push order;
``flush()`` returns the rest at the end of a stream. Every pushed frame gets exactly one
:class:`FrameResult`. Bad frames are skipped with a reason (logged) and the pipeline keeps going.

One step for a new frame t:
  1. checks (stamp order, intrinsics, depth, constant image);
  2. the backend's window step (:class:`dynrecon_ros.window.WindowStep`, named by the predictor):
     the frame at its processing size enters the window, then the step sets the poses, depths,
     confidences and masks of the window's unpublished frames, or gives the reason to skip t:
     RGB-D: :mod:`dynrecon_ros.rgbd_step` (flow + depth pair poses, windowed pose alignment, flow
     segmentation); networks: :mod:`dynrecon_ros.monocular` (pointmaps, global alignment, flow
     and/or attention segmentation);
  3. keyframe rule; frames leaving the lag are emitted and integrated into the static voxel map.

Speed: RGB-D frames wider than ``max_work_width`` go through the step at 1/s of their size (s an
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

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.errors import InputError
from dynrecon_ros.flow import FlowCache
from dynrecon_ros.geometry import poses_from_tum
from dynrecon_ros.memory import keep_freed_heap
from dynrecon_ros.segmentation import MotionSegmenter, clean_mask, refine_upsampled_mask
from dynrecon_ros.static_map import VoxelMap
from dynrecon_ros.window import SlidingWindow, WindowEntry, WindowStep


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
            (RGB-D). Its ``window_step`` gives the step this Reconstructor runs (:attr:`step`).
        device: torch device of the alignment ('cpu' or 'cuda').
        log: callable(str) receiving warnings (skipped frames); None = silent.
    """

    def __init__(self, config: ReconConfig | None = None, predictor=None, device: str = 'cpu', log=None):
        import torch
        self.cfg = cfg = config or ReconConfig()
        self.log = log or (lambda msg: None)
        if predictor is None:
            from dynrecon_ros.predictors import make_predictor
            name = 'rgbd' if cfg.backend.name == 'auto' else cfg.backend.name
            predictor = make_predictor(name, cfg.backend, cfg.backend.checkpoint or None, device)
        self.predictor = predictor
        self.flows = FlowCache(cfg.flow)
        w = cfg.window
        if w.output_lag < 0 or w.output_lag >= w.size:
            raise InputError(f'window.output_lag must be in [0, window.size-1], got {w.output_lag}')
        self.window = SlidingWindow(w)
        if cfg.alignment.threads > 0:
            torch.set_num_threads(cfg.alignment.threads)
        keep_freed_heap()  # image-sized temporaries reuse freed heap instead of page-faulting it back in
        self.segmenter = MotionSegmenter(cfg.segmentation)
        self.map = VoxelMap(cfg.map)
        self.default_K = None
        if cfg.intrinsics is not None:
            fx, fy, cx, cy = [float(v) for v in cfg.intrinsics]
            self.default_K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        self.world_pose = np.eye(4) if cfg.world_pose is None else _world_pose_matrix(cfg.world_pose)
        self._pending: list = []  # FrameResult (skipped) or WindowEntry (accepted), push order
        self._last_stamp = None
        self._size = None
        self._times = StageTimes()
        self._map_pool = None  # the map thread (started with the first integration)
        self._map_job = None
        # the backend's window step: dynrecon_ros/rgbd_step.py (RGB-D) or dynrecon_ros/monocular.py (networks)
        self.step: WindowStep = predictor.window_step(cfg, self.flows, self.segmenter, self._times, device)

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
        if frame.K is None and self.default_K is None and not self.step.estimates_intrinsics:
            return 'no intrinsics (frame has no K and no default intrinsics are configured)'
        if self.step.needs_depth:
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
        pending = self._pending_ids()
        published = {e.index for e in self.window.all_entries() if id(e) not in pending}
        work = self.step.work_frame(frame)
        entry, _ = self.window.add(work)
        if work is not frame:  # processed at a reduced size: the outputs go back to the input's
            entry.data['input'] = frame
        reason = self.step.step(self.window, entry, published, self.world_pose)
        if reason:
            self.window.pop_last()
            return self._skip(frame, reason)
        self._accept(frame, entry)
        if self.window.is_keyframe(entry.pose, entry.index):
            self.window.mark_keyframe(entry)

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
