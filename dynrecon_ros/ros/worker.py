"""Backpressure between subscription callbacks and the reconstruction worker.

Callbacks only convert and :meth:`DropOldestQueue.put`; one :class:`Worker` thread takes frames and runs
the pipeline. When the worker is behind, the oldest waiting frames are dropped (a live robot wants the
newest view, not a growing backlog) and counted, so memory is bounded by ``maxsize`` frames.
No rclpy here: the node owns logging and publishing.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

import numpy as np


class DropOldestQueue:
    """Thread-safe FIFO of at most ``maxsize`` items; a put on a full queue drops the oldest item."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f'queue_size must be >= 1, got {maxsize}')
        self.maxsize = int(maxsize)
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self.received = 0
        self.dropped = 0
        self.high_water = 0
        self._closed = False

    def put(self, item: Any) -> int:
        """Append ``item``; returns how many old items were dropped to make room (0 or 1)."""
        with self._cond:
            self.received += 1
            dropped = 0
            while len(self._items) >= self.maxsize:
                self._items.popleft()
                dropped += 1
            self.dropped += dropped
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify()
            return dropped

    def get(self, timeout: float | None = None) -> Any | None:
        """Oldest item, or None after ``timeout`` seconds or once closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class Worker(threading.Thread):
    """Runs ``handle(item)`` for each queued item on its own thread until :meth:`stop`.

    ``on_error(item, exc)`` gets exceptions from ``handle`` (the worker keeps going). ``busy_seconds``
    and ``processed`` let the node report throughput.
    """

    def __init__(self, queue: DropOldestQueue, handle: Callable[[Any], None],
                 on_error: Callable[[Any, BaseException], None] | None = None, name: str = 'recon-worker',
                 on_idle: Callable[[], None] | None = None, idle_after: float = 0.0,
                 ready: Callable[[float], bool] | None = None):
        super().__init__(name=name, daemon=True)
        self.queue = queue
        self.handle = handle
        self.on_error = on_error
        self.on_idle = on_idle  # called once when no item came for idle_after seconds after some work
        self.idle_after = idle_after
        self.ready = ready  # ready(timeout) -> bool: take the next item only once True (the pipeline has room)
        self._last_item = None
        self._stop_event = threading.Event()
        self.processed = 0
        self.busy_seconds = 0.0
        self._idle = threading.Event()
        self._idle.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            if self.ready is not None and not self.ready(0.1):
                continue  # busy downstream: newer frames replace older ones in the queue meanwhile
            item = self.queue.get(timeout=0.1)
            if item is None:
                if (self.on_idle is not None and self.idle_after > 0 and self._last_item is not None
                        and time.monotonic() - self._last_item >= self.idle_after):
                    self._last_item = None
                    self._idle.clear()
                    try:
                        self.on_idle()
                    except BaseException as exc:  # noqa: BLE001
                        if self.on_error is not None:
                            self.on_error(None, exc)
                    finally:
                        self._idle.set()
                continue
            self._idle.clear()
            t0 = time.perf_counter()
            try:
                self.handle(item)
            except BaseException as exc:  # noqa: BLE001 - one bad frame must not kill the worker
                if self.on_error is not None:
                    self.on_error(item, exc)
            finally:
                self.busy_seconds += time.perf_counter() - t0
                self.processed += 1
                self._last_item = time.monotonic()
                self._idle.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the frame in progress (waiting frames are discarded)."""
        self._stop_event.set()
        self.queue.close()
        if self.is_alive():
            self.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once the queue is empty and no frame is in progress (or False after ``timeout``)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.queue) == 0 and self._idle.is_set():
                return True
            time.sleep(0.01)
        return False


class LatencyStats:
    """Seconds from an image's stamp to its mask and pose being published: the last ``keep`` of them
    (bounded memory) and a count of all."""

    def __init__(self, keep: int = 2000):
        self._recent: collections.deque = collections.deque(maxlen=keep)
        self._since_line: list = []
        self.count = 0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._recent.append(seconds)
            self._since_line.append(seconds)
            del self._since_line[:-self._recent.maxlen]
            self.count += 1

    def line(self, output_lag: int, total: bool = False) -> str:
        """'latency stamp->mask+pose p50 X ms, p95 Y ms over N frames (...)' of the frames since the last
        line (``total``: of the last ``keep``)."""
        with self._lock:
            vals = list(self._recent) if total else self._since_line
            self._since_line = [] if not total else self._since_line
        if not vals:
            return 'latency stamp->mask+pose: no frame published'
        p50, p95 = np.percentile(np.asarray(vals) * 1e3, [50, 95])
        return (f'latency stamp->mask+pose p50 {p50:.0f} ms, p95 {p95:.0f} ms over {len(vals)} frames '
                f'(includes output_lag {output_lag} frames held for the window)')
