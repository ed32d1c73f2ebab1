"""Stage 7 in a process of its own: the static voxel map integrated beside the pipeline.

:class:`MapProcess` has the interface of :class:`~dynrecon_ros.static_map.VoxelMap` that the
Reconstructor uses (``integrate``, ``points``, ``save_ply``, ``len``) and runs a VoxelMap in a child
process (``python -m dynrecon_ros.map_process``: a fresh interpreter that imports numpy, OpenCV and
the map, not the caller's main module). The map's integration (~8 ms of CPU a 640x480 frame) on a
thread of the pipeline's process competes with the pipeline's own threads for the cores and for that
process's interpreter lock; in a process of its own, at a lower priority (``NICE``), it runs in the
time the pipeline leaves idle. The results are those of an in-process VoxelMap: the same code on the
same arrays, in the same order.

A frame's arrays travel through shared memory (an anonymous file mapped by both processes), a ring of
``SLOTS`` slots of one frame each, sized for the first frame (copying a 640x480 frame in costs ~0.2 ms;
pickling it through a pipe ~8 ms of the sender's CPU); a larger frame later goes through the pipe. The
pipe carries the small messages. ``integrate`` returns once the frame is in a slot: it waits only while
every slot holds a frame the child has not finished. An error of the child's integration is raised by
the next call (as the map thread's errors are). If the child dies, the call that finds out raises a
:class:`MapProcessError` saying so, and the next call starts a new, empty map; if it could not even
start (no answer), the error says so and the map runs in this process from then on.

Why by hand: multiprocessing's pools and executors pickle every frame through a pipe, and its spawned
processes import the caller's main module (the ROS node's, with rclpy and torch) again.
"""
from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection

import numpy as np

from dynrecon_ros.static_map import MapConfig, VoxelMap, check_frame

SLOTS = 3  # frames in flight at most (one being integrated, the next ones waiting)
NICE = 10  # the child's niceness: below the pipeline, which waits for nothing the map does
START_TIMEOUT_S = 60.0  # for the child to answer (a new interpreter importing numpy and OpenCV: ~0.2 s)
BYTES_PER_PIXEL = 4 + 3 + 1 + 4  # depth float32, rgb, static bool, confidence float32


class MapProcessError(RuntimeError):
    """The map's process failed (died, or did not start); the map it held is lost."""


def _views(mem, base: int, specs) -> list:
    """The arrays that ``specs`` ((shape, dtype str, offset) or None each) place in ``mem`` from ``base``."""
    return [None if s is None else
            np.frombuffer(mem, np.dtype(s[1]), int(np.prod(s[0])), base + s[2]).reshape(s[0]) for s in specs]


def _copy_in(mem, base: int, specs, arrays) -> None:
    """Copy ``arrays`` into ``mem`` where ``specs`` place them (no view of ``mem`` outlives the call)."""
    for a, v in zip(arrays, _views(mem, base, specs)):
        if a is not None:
            np.copyto(v, a)


def _answer(vm: VoxelMap, msg: tuple):
    """A query ('points', 'save_ply' with its path, 'len') answered by ``vm`` (the child's map, or the parent's
    own when no child could start)."""
    op = msg[0]
    if op == 'points':
        return vm.points()
    if op == 'save_ply':
        return vm.save_ply(msg[1])
    if op == 'len':
        return len(vm)
    raise ValueError(f'unknown request {op!r}')


def _serve(conn: Connection, mem, slot_bytes: int) -> None:
    """The child's loop: a VoxelMap driven by ``conn``'s messages (the first one: its MapConfig)."""
    vm = VoxelMap(conn.recv())
    conn.send(('ready',))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        op = msg[0]
        try:
            if op == 'integrate':
                _, slot, specs, arrays, K, pose, stride = msg
                if arrays is None:
                    arrays = _views(mem, slot * slot_bytes, specs)
                t = time.thread_time()
                vm.integrate(arrays[0], arrays[1], K, pose, arrays[2], arrays[3], pixel_stride=stride)
                reply = ('done', slot, (time.thread_time() - t) * 1e3, None)
                del arrays  # (views of the slot: released before the parent may reuse it)
            elif op == 'close':
                conn.send(('ok', None))
                return
            else:
                reply = ('ok', _answer(vm, msg))
        except Exception as e:  # noqa: BLE001 - every error goes back to the parent, which raises it
            text = f'{type(e).__name__}: {e}\n{traceback.format_exc()}'
            reply = ('done', msg[1], 0.0, text) if op == 'integrate' else ('error', text)
        conn.send(reply)


def main(argv=None) -> None:
    """The child's entry point: ``python -m dynrecon_ros.map_process CONN_FD MEM_FD SLOT_BYTES``."""
    conn_fd, mem_fd, slot_bytes = (int(a) for a in (argv or sys.argv[1:]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    os.nice(NICE)
    mem = mmap.mmap(mem_fd, 0)
    os.close(mem_fd)
    _serve(Connection(conn_fd), mem, slot_bytes)


def _stop(proc: subprocess.Popen, conn: Connection) -> None:
    """Ask the child to exit, then make sure it did (the finaliser of a MapProcess's child)."""
    try:
        conn.send(('close',))
    except (OSError, ValueError):
        pass
    try:
        proc.wait(2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(2.0)
    conn.close()


class MapProcess:
    """A :class:`VoxelMap` in a child process (see the module docstring). Thread-safe.

    Args:
        cfg: the map's parameters.
        on_integrated: ``on_integrated(ms)`` with each integration's CPU time in the child (milliseconds),
            called from the thread that calls this object when it learns of it.
    """

    def __init__(self, cfg: MapConfig, on_integrated=None):
        self.cfg = cfg
        self._on_integrated = on_integrated
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._mem = None
        self._slot_bytes = 0
        self._free: list[int] = []
        self._ready = False
        self._error: str | None = None  # an integration's error, raised by the next call
        self._finalizer = None
        self._local = None  # the VoxelMap in this process, once a child could not start

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it starts)."""
        return None if self._proc is None else self._proc.pid

    def start(self, h: int, w: int) -> None:
        """Start the child now, its slots sized for (h, w) frames (else the first ``integrate`` does), so
        that it boots while the pipeline works on the first frames. Nothing if it runs already."""
        with self._lock:
            if self._proc is None and self._local is None:
                self._start(h * w * BYTES_PER_PIXEL + 4 * 64)

    # ------------------------------------------------------------------ the VoxelMap interface
    def integrate(self, depth: np.ndarray, rgb: np.ndarray, K: np.ndarray, pose: np.ndarray,
                  static: np.ndarray | None = None, confidence: np.ndarray | None = None,
                  pixel_stride: int | None = None) -> None:
        """:meth:`VoxelMap.integrate` in the child (same arguments, checked here: bad input raises at once)."""
        depth = np.asarray(depth, dtype=np.float32)
        check_frame(depth, rgb, static, confidence)
        arrays = [depth, np.asarray(rgb, dtype=np.uint8),
                  None if static is None else np.asarray(static, dtype=bool),
                  None if confidence is None else np.asarray(confidence, dtype=np.float32)]
        specs, size = [], 0
        for a in arrays:
            specs.append(None if a is None else (a.shape, a.dtype.str, size))
            size += 0 if a is None else -(-a.nbytes // 64) * 64  # 64-byte aligned
        with self._lock:
            self._raise_pending()
            if self._proc is None and self._local is None:
                self._start(size)
            if self._local is not None:
                return self._local.integrate(*arrays[:2], K, pose, *arrays[2:], pixel_stride=pixel_stride)
            slot = self._take_slot()
            inline = size > self._slot_bytes  # (a frame larger than the first: through the pipe)
            if not inline:
                _copy_in(self._mem, slot * self._slot_bytes, specs, arrays)
            self._send(('integrate', slot, specs, arrays if inline else None, np.asarray(K, np.float64),
                        np.asarray(pose, np.float64), pixel_stride))

    def points(self) -> np.ndarray:
        """:meth:`VoxelMap.points` of the map as every frame given so far left it."""
        return self._call(('points',))

    def save_ply(self, path) -> int:
        """:meth:`VoxelMap.save_ply` (written by the child)."""
        return self._call(('save_ply', os.path.abspath(path)))

    def __len__(self) -> int:
        return self._call(('len',))

    def close(self) -> None:
        """Stop the child (the map is lost); a later ``integrate`` starts a new one."""
        with self._lock:
            self._shutdown()

    # ------------------------------------------------------------------ internals
    def _call(self, msg):
        with self._lock:
            self._raise_pending()
            if self._local is not None or self._proc is None:  # this process's map, or an empty one (no child yet)
                return _answer(VoxelMap(self.cfg) if self._local is None else self._local, msg)
            self._send(msg)
            while True:
                reply = self._handle(self._recv())  # (integrations that finished before the answer: taken)
                if reply is not None and reply[0] == 'ok':
                    self._raise_pending()  # an integration given before this call failed: that comes first
                    return reply[1]
                if reply is not None:
                    raise MapProcessError(f'static map process: {msg[0]} failed: {reply[1]}')

    def _start(self, slot_bytes: int) -> None:
        """A new child with ``SLOTS`` slots of ``slot_bytes`` (rounded up to pages); does not wait for it."""
        self._shutdown()
        self._slot_bytes = -(-max(slot_bytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        mine, theirs = socket.socketpair()
        if hasattr(os, 'memfd_create'):  # (Linux) anonymous shared memory
            fd = os.memfd_create('dynrecon-map')
        else:
            fd = os.dup(tempfile.TemporaryFile().fileno())  # (elsewhere) an unlinked file
        try:
            os.ftruncate(fd, SLOTS * self._slot_bytes)
            self._mem = mmap.mmap(fd, SLOTS * self._slot_bytes)
            # the child imports this very package (the parent may have found it through its sys.path only)
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH')) if p))
            proc = subprocess.Popen([sys.executable, '-m', 'dynrecon_ros.map_process', str(theirs.fileno()), str(fd),
                                     str(self._slot_bytes)], pass_fds=(theirs.fileno(), fd),
                                    stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            mine.close()
            self._mem = None
            raise MapProcessError(f'static map process could not start: {e}') from e
        finally:
            theirs.close()
            os.close(fd)
        self._proc = proc
        self._conn = Connection(mine.detach())
        self._free = list(range(SLOTS))
        self._ready = False
        self._finalizer = weakref.finalize(self, _stop, proc, self._conn)
        self._send(self.cfg)

    def _shutdown(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # (runs _stop once)
        if self._mem is not None:
            self._mem.close()
        self._proc = self._conn = self._mem = self._finalizer = None
        self._free = []

    def _take_slot(self) -> int:
        while not self._free:
            self._handle(self._recv())
        return self._free.pop(0)

    def _handle(self, reply):
        """A child's message: 'ready' (booted) and 'done' (an integration finished: its slot is free again,
        its error kept for the next call) are taken here (None); an answer ('ok' / 'error') is returned."""
        if reply[0] == 'ready':
            self._ready = True
            return None
        if reply[0] == 'done':
            _, slot, ms, err = reply
            self._free.append(slot)
            if err is not None:
                self._error = self._error or err
            elif self._on_integrated is not None:
                self._on_integrated(ms)
            return None
        return reply

    def _raise_pending(self) -> None:
        while self._conn is not None and self._conn.poll(0):  # what came meanwhile, without waiting
            self._handle(self._recv())
        if self._error is not None:
            err, self._error = self._error, None
            raise MapProcessError(f'static map process: a frame\'s integration failed: {err}')

    def _send(self, msg) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError) as e:
            self._died(e)

    def _recv(self):
        """The child's next message (a child that has not booted yet gets START_TIMEOUT_S to do so)."""
        try:
            if not self._ready and not self._conn.poll(START_TIMEOUT_S):
                raise TimeoutError(f'no answer within {START_TIMEOUT_S:.0f} s of its start')
            return self._conn.recv()
        except (EOFError, OSError, pickle.UnpicklingError) as e:
            self._died(e)

    def _died(self, e) -> None:
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        booted = self._ready
        self._shutdown()
        if not booted:  # it would fail again: the map runs in this process from now on
            self._local = VoxelMap(self.cfg)
            raise MapProcessError(f'static map process could not start (exit code {code}; {type(e).__name__}: {e}); '
                                  f'the map now runs in this process (the frames given so far are lost)') from e
        raise MapProcessError(f'static map process exited (exit code {code}; {type(e).__name__}: {e}): the map it '
                              'held is lost; the next frame starts a new one') from e


if __name__ == '__main__':
    main()
