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
A frame between window steps (``window.step_every`` > 1, or :meth:`prepare`'s ``behind``: the node falling behind)
is tracked instead (``RGBDStep.track``: its pose from a few pairs, the newest stepped frame's final mask carried
to it along the flow) and emitted right after that frame, not integrated (``FrameResult.tracked``).

Speed: RGB-D frames wider than ``max_work_width`` go through the step at 1/s of their size (s an
integer; 640x480 -> 320x240); their outputs are brought back to the input size (mask edges snapped
to the input depth). Map integration runs on a background thread (one frame at a time, in order)
while the next frames are processed, by default in a process of its own (:mod:`dynrecon_ros.map_process`,
``ReconConfig.map_process``); :meth:`static_map`, :meth:`save_map` and :meth:`flush` wait
for it. ``push`` is :meth:`prepare` (stage A: the processing size and, with ``ahead``, the optical
flow of the pairs the frame will most likely get) then :meth:`push_prepared` (stage B: checks, window
step, emission); :class:`dynrecon_ros.pipelining.FramePipeline` runs stage A of frame t+1 on one
thread while stage B of frame t runs on another (``ReconConfig.overlap``), with the same results.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import cv2
import numpy as np

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.errors import InputError
from dynrecon_ros.flow import FlowCache, warp
from dynrecon_ros.geometry import poses_from_tum
from dynrecon_ros.map_process import MapProcess
from dynrecon_ros.memory import keep_freed_heap
from dynrecon_ros.mask_cleanup import snap_to_depth_edges
from dynrecon_ros.segmentation import MotionSegmenter, clean_mask, refine_upsampled_mask, snap_holes_to_colour_edges
from dynrecon_ros.static_map import VoxelMap
from dynrecon_ros.window import SlidingWindow, WindowEntry, WindowStep
from dynrecon_ros.work_size import upsample


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
    tracked: bool = False  # between window steps (window.step_every; Reconstructor.prepare's behind)


@dataclass
class Prepared:
    """A frame after stage A (:meth:`Reconstructor.prepare`).

    frame: the input Frame; work: the frame at its processing size (None: made in stage B, after the
    checks); stats: the checks' image figures (Reconstructor._image_stats; None: made in stage B);
    flows: {(key_a, key_b): PairFlow} computed ahead for the pairs the frame is expected to get;
    tracked: the frame is one of those between window steps (``window.step_every``).
    """

    frame: object
    work: object = None
    flows: dict = field(default_factory=dict)
    stats: tuple | None = None
    tracked: bool = False


@dataclass
class Tracked:
    """An accepted frame between window steps (``window.step_every``, ``behind``), pending its emission right after
    ``anchor``, the stepped frame it was tracked against: frame (input), work (processing size), T (4, 4) anchor ->
    frame, bwd (h, w, 2) flow frame -> anchor at the processing size, conf (h, w) float32, links: its pairs
    (``RGBDStep.track``)."""

    frame: object
    work: object
    anchor: WindowEntry
    T: np.ndarray
    bwd: np.ndarray
    conf: np.ndarray
    links: list


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


MAP_JOBS = 2  # frames queued on the map thread at most (each holds one frame's outputs at input size), counted
# by their integration jobs (a frame emitted with deferred outputs has its outputs job before that one)


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
            predictor = make_predictor(name, cfg.backend, cfg.backend.checkpoint or None, device, cfg.segmentation)
        self.predictor = predictor
        self.flows = FlowCache(cfg.flow)
        w = cfg.window
        k = getattr(predictor, 'smoothing_frames', 0)  # the RGB-D predictor's, under a rolling shutter
        if k > w.output_lag >= 0:
            # the frame's pairs are refined again k frames later (backend.shutter_smoothing_frames): hold it as long
            w = dataclasses.replace(w, output_lag=k, size=max(w.size, k + w.size - w.output_lag))
            self.cfg = cfg = dataclasses.replace(cfg, window=w)
            self.log(f'rolling shutter: window.output_lag raised to {k} (backend.shutter_smoothing_frames), '
                     f'window.size {w.size}')
        if w.output_lag < 0 or w.output_lag >= w.size:
            raise InputError(f'window.output_lag must be in [0, window.size-1], got {w.output_lag}')
        self.window = SlidingWindow(w)
        if w.step_every < 1:
            raise InputError(f'window.step_every must be >= 1 (1 = every frame takes the window step), '
                             f'got {w.step_every}')
        if cfg.alignment.threads > 0:
            torch.set_num_threads(cfg.alignment.threads)
        if cfg.opencv_threads < 0:
            raise InputError(f'opencv_threads must be >= 0 (0 = OpenCV\'s own setting), got {cfg.opencv_threads}')
        if cfg.opencv_threads > 0:
            cv2.setNumThreads(cfg.opencv_threads)  # process-wide, like torch's threads above
        if cfg.blas_threads < 0:
            raise InputError(f'blas_threads must be >= 0 (0 = the BLAS library\'s own setting), got {cfg.blas_threads}')
        if cfg.blas_threads > 0:
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=cfg.blas_threads, user_api='blas')  # process-wide too (not undone)
        keep_freed_heap()  # image-sized temporaries reuse freed heap instead of page-faulting it back in
        self.segmenter = MotionSegmenter(cfg.segmentation)
        self._times = StageTimes()
        # the static map in a process of its own (dynrecon_ros/map_process.py) or on the map thread
        self.map = MapProcess(cfg.map, functools.partial(self._times.add, 'map_integrate')) if cfg.map_process \
            else VoxelMap(cfg.map)
        self.default_K = None
        if cfg.intrinsics is not None:
            fx, fy, cx, cy = [float(v) for v in cfg.intrinsics]
            self.default_K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        self.world_pose = np.eye(4) if cfg.world_pose is None else _world_pose_matrix(cfg.world_pose)
        self._pending: list = []  # FrameResult (skipped) or WindowEntry (accepted), push order
        self._last_stamp = None
        self._size = None
        self._map_pool = None  # the map thread (started with the first integration)
        self._map_jobs: collections.deque = collections.deque()  # (future, deferred), oldest first
        self._map_lock = threading.Lock()  # held while the map changes (integration) or is read
        # stage A's own flow estimator (one OpenCV DIS object is not shared by two threads) and the
        # work frames of the last prepared frames, the expected pair partners of the next one
        self._ahead_flows = FlowCache(cfg.flow)
        self._recent_work: list = []
        # the backend's window step: dynrecon_ros/rgbd_step.py (RGB-D) or dynrecon_ros/monocular.py (networks)
        self.step: WindowStep = predictor.window_step(cfg, self.flows, self.segmenter, self._times, device)
        if w.step_every > 1 and not hasattr(self.step, 'track'):
            raise InputError(f'window.step_every {w.step_every}: the {type(self.step).__name__} cannot track frames '
                             'between window steps (RGB-D only); use 1')
        if not getattr(self.step, 'far_anchors', False):
            self.window.max_far = 0  # a step that makes no far pairs (the network's) keeps no far anchors
        # frames prepared as tracked since the last one prepared for the window step (the first frame: stepped)
        self._since_step = max(1, w.step_every - 1)

    # ------------------------------------------------------------------ public API
    @property
    def timings(self) -> dict[str, float]:
        """Mean milliseconds per stage (per pushed frame for 'total').

        'map' is the time ``push`` spends on an emitted frame (outputs at the input size, waiting
        for the map thread); 'map_integrate' the integration itself, which runs on the map thread
        while the next frames are processed.
        """
        return self._times.means()

    def push(self, frame, behind: bool | None = None) -> list[FrameResult]:
        """One frame through both stages on the caller's thread; the results that became final."""
        return self.push_prepared(self.prepare(frame, behind=behind))

    def prepare(self, frame, ahead: bool = False, behind: bool | None = None) -> Prepared:
        """Stage A: the frame at its processing size and, with ``ahead``, the optical flow of its
        expected pairs (the last prepared frames as neighbours, the current keyframes).

        Its role: with ``behind`` None, every ``window.step_every``-th frame takes the window step and the
        others are tracked; a caller that knows whether it keeps up (the node: frames dropped from its queue)
        says so instead: the frame is tracked when ``behind``, at most max(1, step_every - 1) in a row (so the
        window steps on), and stepped otherwise. Only a step that can track (RGB-D) tracks.

        Safe on a second thread while :meth:`push_prepared` runs for earlier frames: it only reads
        frames (never changed once in the window) and its own flow estimator. A window step may add
        ``prepare_frame(work)``: per-frame work that reads nothing but the frame (stored on it), run
        here, so on the first thread. A wrong guess (a skipped
        frame, a new keyframe) costs time, never results: stage B computes the pairs it lacks, and
        flows depend only on the two images.
        """
        t0 = time.perf_counter()
        n = self.cfg.window.step_every
        tracked = hasattr(self.step, 'track') and (self._since_step < n - 1 if behind is None else
                                                   behind and self._since_step < max(1, n - 1))
        self._since_step = self._since_step + 1 if tracked else 0
        p = Prepared(frame, tracked=tracked)
        try:
            if getattr(frame, 'K', None) is None and self.default_K is not None:
                frame.K = self.default_K
            p.work = self.step.work_frame(frame)
        except Exception:  # noqa: BLE001 - stage B runs the checks first; they name the problem
            return p
        hook = getattr(self.step, 'prepare_frame', None)  # a step's per-frame work that needs no window state
        if hook is not None:
            if p.tracked:  # (only a step that can track is asked for a tracked frame's part)
                hook(p.work, tracked=True)
            else:
                hook(p.work)
        try:
            p.stats = self._image_stats(frame)
        except Exception:  # noqa: BLE001 - stage B computes them again and its checks name the problem
            p.stats = None
        self._times.lap('prepare', t0)
        if not ahead:
            return p
        t = time.perf_counter()
        work = p.work
        olds = list(reversed(self._recent_work))
        kfs = [k.frame for k in list(self.window.keyframes)]
        olds = olds[:1] + kfs[-1:] if p.tracked else olds + kfs  # (tracked: the newest stepped frame and keyframe)
        recent = {f.key for f in self._recent_work}
        seen = {work.key}
        for old in olds:
            if old.key in seen or old.rgb.shape != work.rgb.shape:
                continue
            seen.add(old.key)
            pf = self._ahead_flows.get(old.key, old.rgb, work.key, work.rgb)
            # the forward-backward checks run when first used (flow.PairFlow): run here, off stage B, those
            # stage B will use in full: the backward one of every pair (the newest frame's evidence), the
            # forward one of the neighbours (the segmentation updates them; the anchors' pose reads a grid)
            pf.valid_bwd
            if old.key in recent:
                pf.valid_fwd
            p.flows[(old.key, work.key)] = pf
        self._ahead_flows.keep_only(set())
        if not p.tracked:
            self._recent_work = (self._recent_work + [work])[-max(1, self.cfg.window.neighbours):]
        self._times.lap('flow_ahead', t)
        return p

    def push_prepared(self, p: Prepared, deferred: bool = False) -> list:
        """Stage B: checks, the backend's window step, keyframe rule, emission (in push order).

        deferred: the emitted frames' outputs at the input size are made on the map thread, before
        their integration; they come as ``concurrent.futures.Future`` of FrameResult (skipped frames
        as FrameResult), in order.
        """
        t0 = time.perf_counter()
        try:
            for (ka, kb), pf in p.flows.items():
                self.flows.put(ka, kb, pf)
            self._step(p.frame, p.work, p.stats, p.tracked)
        finally:
            self._times.add('total', (time.perf_counter() - t0) * 1e3)
            # every pair of a step has the step's newest frame in it, so no cached flow is looked up again:
            # keep none (a skipped frame's flows would stay until the next accepted frame: unbounded while
            # tracking is lost, ~5 MiB per pair at 640x480)
            self.flows.keep_only(set())
        return self._emit(final=False, deferred=deferred)

    def pipeline(self, on_results, on_error=None, lock=None):
        """A :class:`dynrecon_ros.pipelining.FramePipeline` over this reconstructor, two threads when
        ``overlap`` is on in the config (how the node and ``dynrecon run`` drive it)."""
        from dynrecon_ros.pipelining import FramePipeline
        return FramePipeline(self, on_results, on_error, overlap=self.cfg.overlap, lock=lock)

    def flush(self) -> list[FrameResult]:
        out = self._emit(final=True)
        self._map_wait()
        return out

    def static_map(self, wait: bool = True) -> np.ndarray:
        """(M, 6) float32 x y z r g b of the static map in the world frame.

        wait: first wait for the frames queued on the map thread (call it from the thread that pushes,
        or with the pushes held off); False: the map as the integrations finished so far left it,
        without waiting (safe from any thread: a periodic publisher that must not hold up frames)."""
        if wait:
            self._map_wait()
        with self._map_lock:
            return self.map.points()

    def save_map(self, path) -> int:
        self._map_wait()
        with self._map_lock:
            return self.map.save_ply(path)

    # ------------------------------------------------------------------ internals
    def _skip(self, frame, reason: str) -> None:
        self.log(f'frame {getattr(frame, "key", "?")}: skipped: {reason}')
        self._pending.append(FrameResult(stamp=float(getattr(frame, 'stamp', float('nan'))),
                                         key=str(getattr(frame, 'key', '')), status='skipped', reason=reason))

    def _check(self, frame, stats: tuple | None = None) -> str:
        """'' or the reason to skip ``frame``; ``stats``: its :meth:`_image_stats` when stage A made them."""
        c = self.cfg.checks
        if self._last_stamp is not None and frame.stamp <= self._last_stamp:
            return (f'timestamp {frame.stamp:.6f} is not after the previous accepted one '
                    f'({self._last_stamp:.6f}): duplicate or backwards')
        if self._size is not None and frame.size != self._size:
            return f'image size {frame.size} differs from the stream size {self._size}'
        if frame.K is None and self.default_K is None and not self.step.estimates_intrinsics:
            return 'no intrinsics (frame has no K and no default intrinsics are configured)'
        if self.step.needs_depth and frame.depth is None:
            return 'no depth image (the rgbd backend needs depth)'
        valid, std = stats if stats is not None else self._image_stats(frame)
        if valid is not None and valid < c.min_valid_depth:
            return f'only {100 * valid:.1f}% of the depth is valid (min {100 * c.min_valid_depth:.0f}%)'
        if std < c.min_image_std:
            return f'black or constant image (grey std {std:.2f})'
        return ''

    def _image_stats(self, frame) -> tuple:
        """(fraction of valid depth readings, None without a depth check; grey std): the checks' figures
        that need only the frame, so stage A computes them (:meth:`prepare`), off stage B's path."""
        valid = None
        if self.step.needs_depth and frame.depth is not None:
            d = frame.depth
            valid = float((np.isfinite(d) & (d > 0)).mean())
        # every 2nd pixel: the std all the same; converted whole (OpenCV copies a strided view slowly: 3x)
        grey = cv2.cvtColor(np.ascontiguousarray(frame.rgb), cv2.COLOR_RGB2GRAY)[::2, ::2]
        return valid, float(grey.std())

    def _step(self, frame, work=None, stats=None, tracked: bool = False) -> None:
        reason = self._check(frame, stats)
        if reason:
            return self._skip(frame, reason)
        if frame.K is None:
            frame.K = self.default_K
        if tracked and self.window.entries:
            return self._track(frame, work)
        pending = self._pending_ids()
        published = {e.index for e in self.window.all_entries() if id(e) not in pending}
        if work is None:
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

    def _track(self, frame, work=None) -> None:
        """A frame between window steps: tracked against the newest stepped frame (RGBDStep.track)."""
        t = time.perf_counter()
        if work is None:
            work = self.step.work_frame(frame)
        anchor = self.window.entries[-1]
        got = self.step.track(anchor, work, self.window.keyframes[-1] if self.window.keyframes else None)
        self._times.lap('track', t)
        if isinstance(got, str):
            return self._skip(frame, got)
        self._last_stamp = frame.stamp
        self._pending.append(Tracked(frame, work, anchor, *got))

    def _map_run(self, job, deferred: bool = False):
        """Run ``job()`` on the map thread (one job at a time, in order); at most ``MAP_JOBS`` not deferred
        (integrations: one per frame) queued.

        Integration (numpy / OpenCV, which release the GIL in their loops) overlaps the next
        frame's steps on the second core; the map is only read after :meth:`_map_wait`. A deferred
        job's error belongs to whoever holds its future (it is not raised again by :meth:`_map_wait`).
        """
        from concurrent.futures import ThreadPoolExecutor
        while sum(not d for _, d in self._map_jobs) >= MAP_JOBS:
            self._map_wait_one()
        if self._map_pool is None:
            self._map_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='dynrecon-map')
        fut = self._map_pool.submit(job)
        self._map_jobs.append((fut, deferred))
        return fut

    def _integrate(self, depth, rgb, K, pose, static, conf, pixel_stride) -> None:
        t = time.perf_counter()
        with self._map_lock:  # static_map(wait=False) reads it from other threads
            self.map.integrate(depth, rgb, K, pose, static, conf, pixel_stride=pixel_stride)
        if not isinstance(self.map, MapProcess):  # (the map's process reports its own time)
            self._times.add('map_integrate', (time.perf_counter() - t) * 1e3)

    def _map_wait(self) -> None:
        """Wait for the map thread's jobs (re-raises their errors unless deferred)."""
        while self._map_jobs:
            self._map_wait_one()

    def _map_wait_one(self) -> None:
        fut, deferred = self._map_jobs.popleft()
        if deferred:
            from concurrent.futures import wait
            wait([fut])
        else:
            fut.result()

    def _pending_ids(self) -> set[int]:
        """ids of the accepted window entries whose results are not out yet."""
        return {id(e) for e in self._pending if isinstance(e, WindowEntry)}

    def _accept(self, frame, entry: WindowEntry) -> None:
        if isinstance(self.map, MapProcess) and self.map.pid is None and getattr(frame, 'depth', None) is not None:
            self.map.start(*frame.depth.shape[:2])  # boots while the window fills (output_lag frames)
        self._last_stamp = frame.stamp
        self._size = frame.size
        self._pending.append(entry)

    def _emit(self, final: bool, deferred: bool = False) -> list:
        out: list = []
        newest = self.window.entries[-1].index if self.window.entries else -1
        lag = self.cfg.window.output_lag
        while self._pending:
            head = self._pending[0]
            if isinstance(head, FrameResult):
                out.append(self._pending.pop(0))
                continue
            held = sum(isinstance(e, WindowEntry) for e in self._pending)
            if isinstance(head, WindowEntry) and not final and newest - head.index < lag and \
                    held <= self.cfg.window.size + lag:
                break  # (beyond that bound, frames skipped meanwhile (tracking lost) push the head out early)
            self._pending.pop(0)
            out.append(self._finish_later(head) if deferred else self._finish(head))
        return out

    def _finish(self, e: WindowEntry) -> FrameResult:
        """The emitted entry's result at the input size; its map integration goes to the map thread."""
        t = time.perf_counter()
        res, integration = self._outputs(*self._snapshot(e))
        res.tracked = not isinstance(e, WindowEntry)
        if integration is not None and not res.tracked:  # (a tracked frame is not integrated)
            self._map_run(lambda: self._integrate(*integration))
        self._times.lap('map', t)
        return res

    def _finish_later(self, e: WindowEntry):
        """:meth:`_finish` on the map thread: a Future of the FrameResult (its ``frame`` attribute: the
        input Frame), resolved once the outputs are made, before the integration, which follows as a job
        of its own (so the frame is published while the map integrates it; an integration error is
        raised as :meth:`_finish`'s, by the next wait for the map thread). What it reads is taken now:
        later steps hold an emitted entry and do not change it, but may replace its pose by an equal one."""
        snap = self._snapshot(e)
        made = []  # the outputs job hands the integration's arguments to the integration job (same thread, in order)

        def outputs():
            t = time.perf_counter()
            res, integration = self._outputs(*snap)
            res.tracked = not isinstance(e, WindowEntry)
            self._times.lap('map', t)
            made.append(integration)
            return res

        def integrate():
            if made and made[0] is not None and isinstance(e, WindowEntry):  # (a tracked frame is not)
                self._integrate(*made[0])

        fut = self._map_run(outputs, deferred=True)
        self._map_run(integrate)
        fut.frame = snap[1]
        return fut

    def _snapshot(self, e) -> tuple:
        """_outputs' arguments for an emitted WindowEntry or Tracked (its anchor emitted before it: final)."""
        if isinstance(e, WindowEntry):
            prob, mask = e.data.get('prob'), e.data.get('mask')
            if mask is None and prob is not None and self.step.needs_depth and e.frame.depth is not None:
                # segmented as the newest frame only (end of stream, a skipped next frame): cleaned here, on the
                # thread that steps (the segmenter's state), with its hold (stop_and_go 1661, 200 frames: the
                # last frame lost a person standing still, who went into the map)
                mask = self.segmenter.newest_mask(e.key, prob, e.frame.depth, e.frame.stamp)
            return e.frame, e.data.get('input', e.frame), prob, mask, e.data.get('conf'), e.pose.copy()
        a = e.anchor  # its final mask and probability carried to the tracked frame along the flow
        prob, mask = self._work_mask(a.frame, a.data.get('prob'), a.data.get('mask'))
        prob = np.nan_to_num(warp(prob, e.bwd), nan=0.0)
        mask = (np.nan_to_num(warp(mask, e.bwd, cv2.INTER_NEAREST), nan=0.0) > 0).astype(np.uint8)
        seg = self.cfg.segmentation
        if seg.enabled and seg.snap_px and e.work.depth is not None:  # the flow bleeds over the silhouette: onto
            mask = snap_to_depth_edges(mask, e.work.depth, seg.snap_px, prob < 0.5 * seg.threshold)  # its depth edges
        mask = mask * np.uint8(255)
        later = next((w for w in self.window.entries if w.index > a.index), None)
        return e.work, e.frame, prob, mask, e.conf, self.step.settle(e.work, a.pose @ e.T, e.links, later)

    def _work_mask(self, wf, prob, mask) -> tuple[np.ndarray, np.ndarray]:
        """(prob (h, w) float32, mask (h, w) uint8 255 = dynamic) of a stepped frame at the processing size."""
        h, w = wf.rgb.shape[:2]
        has_prob = prob is not None
        if prob is None:
            prob = np.zeros((h, w), np.float32)
        if mask is None:  # segmented as the newest frame only (end of stream, a skipped neighbour)
            mask = clean_mask(prob, self.cfg.segmentation, wf.depth) if self.cfg.segmentation.enabled and \
                has_prob and wf.depth is not None else np.zeros((h, w), np.uint8)
        return prob, mask

    def _outputs(self, wf, f, prob, mask, conf, pose) -> tuple[FrameResult, tuple | None]:
        """(the FrameResult at the input size, the map integration's arguments or None)."""
        h, w = wf.rgb.shape[:2]
        prob, mask = self._work_mask(wf, prob, mask)
        if conf is None:
            conf = np.ones((h, w), np.float32)
        s = 1
        if wf is not f:  # processed at a reduced size: back to the input size, mask edges on its depth
            s = f.rgb.shape[1] // w
            prob = upsample(prob, s, f.rgb.shape[:2], cv2.INTER_LINEAR)
            mask = refine_upsampled_mask(mask, s, f.depth, prob, self.cfg.segmentation)
            conf = upsample(conf, s, f.rgb.shape[:2], cv2.INTER_NEAREST) * (f.depth > 0)
        seg = self.cfg.segmentation
        if seg.enabled and seg.colour_snap_px and self.step.needs_depth and f.depth is not None and mask.any():
            # the sensor's pixels without depth near the boundary: by colour, at the input size
            mask = snap_holes_to_colour_edges((mask > 0).astype(np.uint8), f.depth, f.rgb, seg.colour_snap_px * s,
                                              seg.min_area_frac) * np.uint8(255)
        conf = (conf * (1.0 - prob)).astype(np.float32)
        integration = None
        if f.depth is not None:
            stride = self.cfg.map.pixel_stride * s if self.cfg.map.pixel_stride > 0 else None
            integration = (f.depth, f.rgb, f.K, pose.copy(), mask == 0, conf, stride)
        return FrameResult(stamp=f.stamp, key=f.key, status='ok', reason='', pose=pose,
                           depth=f.depth, mask=mask, dynamic_prob=prob, confidence=conf, K=f.K), integration
