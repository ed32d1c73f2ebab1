"""Frame pipelining: consecutive frames' stages overlapped on two threads, results as one thread gives.

A :class:`~dynrecon_ros.reconstructor.Reconstructor` step has two stages (see its module docstring):
stage A (:meth:`~dynrecon_ros.reconstructor.Reconstructor.prepare`: processing size, optical flow of
the expected pairs) needs only the frames; stage B (:meth:`~dynrecon_ros.reconstructor.Reconstructor.push_prepared`:
pair poses, alignment, segmentation, emission) needs the window as the previous frame left it.
:class:`FramePipeline` runs stage A of frame t+1 on the caller's thread while stage B of frame t runs
on its stage thread, so the two cores work on two frames at once (OpenCV and NumPy release the GIL in
their loops). The emitted frames' outputs at the input size are made on the reconstructor's map
thread (before their map integration), and an output thread hands the results to ``on_results`` in
order, so the caller's publishing is off stage B's path too. Stage B sees the frames in submit order,
so poses, masks and the map are those of ``push`` (test/test_pipelining.py). ``overlap=False`` runs
everything on the caller's thread.

Why not concurrent.futures: one slot with backpressure (``submit`` waits while a frame is waiting, so
the caller's own bounded queue decides what to drop) and results delivered in order from the stage
thread as they become final; an executor offers neither.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable

OUTPUT_BACKLOG = 4  # frames' results waiting for on_results before stage B waits (bounded memory)

# A frame's path through the pipeline (and the node around it), as named instants; each phase is the time
# between two consecutive instants that the frame has (FrameTrace). 'received' and 'published' come from the
# node; 'emit' is the end of the stage B that emitted the frame (its own, or output_lag frames later).
TRACE_MARKS = ('received', 'submit', 'a0', 'a1', 'b0', 'b1', 'emit', 'out', 'published')
TRACE_PHASES = ('queue', 'slot_wait', 'stage_a', 'to_b', 'stage_b', 'lag', 'outputs', 'publish')


class FrameTrace:
    """Where a frame's latency goes: per frame, the instants of :data:`TRACE_MARKS` (``time.monotonic``),
    and per finished frame the phases between consecutive ones (:data:`TRACE_PHASES`: queue = waiting in
    the node's queue, slot_wait = for stage B to take the previous frame, stage_a, to_b = prepared, waiting
    for stage B, stage_b, lag = held for the window (output_lag), outputs = the map thread's outputs at the
    input size and the in-order hand-over, publish), plus ``transport`` (stamp to the callback, seconds of
    wall time) when the node gives it. Bounded memory: at most ``keep`` finished frames and ``pending``
    unfinished ones (a frame whose results never come, e.g. at a reset, is forgotten oldest first).
    Thread-safe: the worker, stage and output threads mark their instants.
    """

    def __init__(self, keep: int = 2000, pending: int = 256):
        self._lock = threading.Lock()
        self._marks: collections.OrderedDict = collections.OrderedDict()  # key -> {mark: t}
        self._done: collections.deque = collections.deque(maxlen=keep)  # {phase: seconds}
        self._pending = pending

    def mark(self, key: str, name: str, t: float | None = None) -> None:
        """Instant ``name`` (one of TRACE_MARKS, or 'transport' as a duration in s) of frame ``key``."""
        if key is None:
            return
        t = time.monotonic() if t is None else t
        with self._lock:
            m = self._marks.get(key)
            if m is None:
                m = self._marks[key] = {}
                while len(self._marks) > self._pending:
                    self._marks.popitem(last=False)
            m[name] = t

    def finish(self, key: str, keep: bool = True) -> dict | None:
        """The frame's phases in seconds ({phase: s}; None when nothing was marked), recorded when ``keep``."""
        with self._lock:
            m = self._marks.pop(key, None)
            if m is None:
                return None
            have = [k for k in TRACE_MARKS if k in m]
            phases = {}
            for a, b in zip(have, have[1:]):  # a phase the frame lacks a mark inside of: named 'p1+p2+...'
                name = '+'.join(TRACE_PHASES[TRACE_MARKS.index(a):TRACE_MARKS.index(b)])
                phases[name] = m[b] - m[a]
            if 'transport' in m:
                phases['transport'] = m['transport']
            if len(have) >= 2:
                phases['total'] = m[have[-1]] - m[have[0]] + m.get('transport', 0.0)
            if keep:
                self._done.append(phases)
            return phases

    def line(self) -> str:
        """'latency breakdown over N frames, mean / p95 ms: transport a / b, queue c / d, ...' of the kept frames."""
        import numpy as np
        with self._lock:
            done = list(self._done)
        if not done:
            return 'latency breakdown: no frame traced'
        parts = []
        names = list(dict.fromkeys(k for d in done for k in d))
        order = ('transport',) + TRACE_PHASES
        names.sort(key=lambda k: (k == 'total', order.index(k.split('+')[0]) if k.split('+')[0] in order else 0))
        for ph in names:
            v = np.array([d[ph] for d in done if ph in d]) * 1e3
            if len(v):
                parts.append(f'{ph} {v.mean():.0f} / {np.percentile(v, 95):.0f}')
        return f'latency breakdown over {len(done)} frames, mean / p95 ms: ' + ', '.join(parts)


def _result_key(r) -> str:
    """The frame key of a stage B result: a FrameResult, or a Future of one (its ``frame`` attribute)."""
    return getattr(getattr(r, 'frame', None), 'key', None) if isinstance(r, Future) else r.key


class FramePipeline:
    """Runs frames through ``rec`` (a Reconstructor) over two threads.

    Args:
        rec: the reconstructor (the attribute may be replaced between :meth:`drain` and the next submit).
        on_results: ``on_results(list[FrameResult])``, called after each frame's stage B on the output
            thread (with overlap; else on the caller's thread), in submit order, possibly with an empty list.
        on_error: ``on_error(frame, exc)`` for an exception of stage B, of a frame's outputs or of
            ``on_results`` (``frame`` None for the last); the stream continues. None: the exception is re-raised by the next :meth:`submit` / :meth:`drain` /
            :meth:`flush`, with a note naming the frame (nothing waits forever on a dead stage).
        overlap: two threads (True) or both stages on the caller's thread (False).
        lock: held around every use of ``rec`` on the stage thread and in :meth:`flush` (the node's lock
            that guards the reconstructor against its save_map service).
    """

    def __init__(self, rec, on_results: Callable[[list], None], on_error: Callable | None = None,
                 overlap: bool = True, lock=None, name: str = 'dynrecon-stage-b'):
        self.rec = rec
        self.on_results = on_results
        self.on_error = on_error
        self.overlap = bool(overlap)
        self.lock = lock if lock is not None else threading.Lock()
        self._cond = threading.Condition()
        self._slot = None  # the prepared frame waiting for stage B
        self._busy = False  # stage B running
        self._out: collections.deque = collections.deque()  # results of stage B waiting for on_results
        self._emitting = False  # on_results running
        self._closed = False
        self._error: BaseException | None = None
        self.submitted = 0
        self.completed = 0  # frames through stage B (errors included)
        self.wait_seconds = 0.0  # time submit() waited for a free slot (stage B the slower one)
        self.trace = FrameTrace()  # where each frame's time goes (the node adds its queue and publishing)
        self._thread = self._out_thread = None
        if self.overlap:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._out_thread = threading.Thread(target=self._run_output, name=name + '-out', daemon=True)
            self._thread.start()
            self._out_thread.start()

    # ------------------------------------------------------------------ caller's thread
    def submit(self, frame, behind: bool | None = None) -> None:
        """Stage A of ``frame`` here, then stage B (on the stage thread with overlap). Waits first while
        an earlier frame still waits for stage B, so stage A of this frame runs during stage B of the
        previous one. ``behind``: whether the caller keeps up (Reconstructor.prepare: the frame's role)."""
        self._raise_pending()
        self.submitted += 1
        key = getattr(frame, 'key', None)
        self.trace.mark(key, 'submit')
        if not self.overlap:
            self.trace.mark(key, 'b0')
            with self.lock:
                results = self.rec.push(frame, behind=behind)
            self.completed += 1
            self.trace.mark(key, 'b1')
            self._deliver(results, emitted=time.monotonic(), catch=False)
            return
        # wait for the slot first, then prepare: the frame prepared is the newest the caller has when
        # stage B is about to be free (a frame prepared early would wait, stale, while newer ones queue)
        t0 = time.perf_counter()
        with self._cond:
            while self._slot is not None and self._alive():
                self._cond.wait(0.5)
            self._check_alive()
        self.wait_seconds += time.perf_counter() - t0
        self.trace.mark(key, 'a0')
        prepared = self.rec.prepare(frame, ahead=True, behind=behind)
        self.trace.mark(key, 'a1')
        with self._cond:
            self._check_alive()
            self._slot = prepared  # only this thread fills the slot: still empty
            self._cond.notify_all()

    def wait_ready(self, timeout: float) -> bool:
        """True once :meth:`submit` would not wait (no frame waiting for stage B), False after ``timeout`` s.
        A caller with a queue of its own takes its next frame only then: the newest one."""
        with self._cond:
            if self._slot is not None and self._alive():
                self._cond.wait(timeout)
            return self._slot is None

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted frame went through stage B (False after ``timeout`` s)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._slot is not None or self._busy or self._out or self._emitting) and self._alive():
                left = 0.5 if end is None else min(0.5, end - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
        if self.overlap:
            self._check_alive()
        self._raise_pending()
        return True

    def flush(self) -> list:
        """Drain, then the reconstructor's flush (the results still in its window); returned, not passed
        to ``on_results``."""
        self.drain()
        with self.lock:
            return self.rec.flush()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the stage thread after the frame in progress (a waiting frame is discarded)."""
        with self._cond:
            self._closed = True
            self._slot = None
            self._cond.notify_all()
        for th in (self._thread, self._out_thread):
            if th is not None and th is not threading.current_thread():
                th.join(timeout)

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._slot is None and not self._busy and not self._out and not self._emitting

    def _alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self._out_thread.is_alive()
                and not self._closed)

    def _check_alive(self) -> None:
        if not self._alive():
            raise RuntimeError('the pipeline stage thread is not running (closed, or it died: see the log above)')

    def _raise_pending(self) -> None:
        exc, self._error = self._error, None
        if exc is not None:
            raise exc

    # ------------------------------------------------------------------ stage thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._slot is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                item, self._slot = self._slot, None
                self._busy = True
                self._cond.notify_all()
            results = None
            key = getattr(item.frame, 'key', None)
            self.trace.mark(key, 'b0')
            try:
                with self.lock:
                    results = self.rec.push_prepared(item, deferred=True)
            except BaseException as exc:  # noqa: BLE001 - one bad frame must not stop the stage thread
                self._failed(item.frame, exc)
                self.trace.finish(key, keep=False)
            if results is not None:
                t_end = time.monotonic()
                self.trace.mark(key, 'b1', t_end)
                for r in results:
                    self.trace.mark(_result_key(r), 'emit', t_end)
            with self._cond:
                while results is not None and len(self._out) >= OUTPUT_BACKLOG and not self._closed:
                    self._cond.wait(0.5)
                if results is not None:
                    self._out.append(results)
                self._busy = False
                self.completed += 1
                self._cond.notify_all()

    def _run_output(self) -> None:
        """Output thread: each frame's results (futures of the map thread resolved) to on_results, in order."""
        while True:
            with self._cond:
                while not self._out and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                items = self._out.popleft()
                self._emitting = True
                self._cond.notify_all()
            try:
                results = []
                for r in items:
                    if not isinstance(r, Future):
                        results.append(r)
                        continue
                    try:
                        results.append(r.result())
                    except BaseException as exc:  # noqa: BLE001 - that frame's outputs failed
                        self._failed(getattr(r, 'frame', None), exc)
                self._deliver(results)
            finally:
                with self._cond:
                    self._emitting = False
                    self._cond.notify_all()

    def _deliver(self, results: list, emitted: float | None = None, catch: bool = True) -> None:
        """``on_results(results)`` (``catch``: its errors to :meth:`_failed`, else raised), the frames' trace
        marked and finished (only frames with a pose kept: skipped ones are not published). ``emitted``:
        the instant their stage B ended (the overlap marks it on the stage thread)."""
        now = time.monotonic()
        for r in results:
            if emitted is not None:
                self.trace.mark(r.key, 'emit', emitted)
            self.trace.mark(r.key, 'out', now)
        try:
            self.on_results(results)
        except BaseException as exc:  # noqa: BLE001
            if not catch:
                raise
            self._failed(None, exc)
        finally:
            for r in results:
                self.trace.finish(r.key, keep=r.status == 'ok')

    def _failed(self, frame, exc: BaseException) -> None:
        if self.on_error is not None:
            try:
                self.on_error(frame, exc)
                return
            except BaseException as exc2:  # noqa: BLE001 - reported below with the original error
                exc.add_note(f'(and on_error failed: {exc2!r})')
        exc.add_note(f'(raised on the pipeline stage thread, frame {getattr(frame, "key", "?")}; '
                     f'{threading.current_thread().name})')
        if self._error is None:  # the first error is the one re-raised; later ones would hide it
            self._error = exc
