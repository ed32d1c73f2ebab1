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
        self._thread = self._out_thread = None
        if self.overlap:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._out_thread = threading.Thread(target=self._run_output, name=name + '-out', daemon=True)
            self._thread.start()
            self._out_thread.start()

    # ------------------------------------------------------------------ caller's thread
    def submit(self, frame) -> None:
        """Stage A of ``frame`` here, then stage B (on the stage thread with overlap). Waits first while
        an earlier frame still waits for stage B, so stage A of this frame runs during stage B of the
        previous one."""
        self._raise_pending()
        self.submitted += 1
        if not self.overlap:
            with self.lock:
                results = self.rec.push(frame)
            self.completed += 1
            self.on_results(results)
            return
        # wait for the slot first, then prepare: the frame prepared is the newest the caller has when
        # stage B is about to be free (a frame prepared early would wait, stale, while newer ones queue)
        t0 = time.perf_counter()
        with self._cond:
            while self._slot is not None and self._alive():
                self._cond.wait(0.5)
            self._check_alive()
        self.wait_seconds += time.perf_counter() - t0
        prepared = self.rec.prepare(frame, ahead=True)
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
            try:
                with self.lock:
                    results = self.rec.push_prepared(item, deferred=True)
            except BaseException as exc:  # noqa: BLE001 - one bad frame must not stop the stage thread
                self._failed(item.frame, exc)
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
                try:
                    self.on_results(results)
                except BaseException as exc:  # noqa: BLE001
                    self._failed(None, exc)
            finally:
                with self._cond:
                    self._emitting = False
                    self._cond.notify_all()

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
