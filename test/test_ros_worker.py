"""Backpressure queue/worker and the navigation-mode frame algebra (no DDS needed)."""
import threading
import time

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pytest.importorskip('rclpy')
from dynrecon_ros.ros.tf import body_twist, navigation_pose  # noqa: E402
from dynrecon_ros.ros.worker import DropOldestQueue, Worker  # noqa: E402


def test_queue_drops_oldest_and_counts():
    q = DropOldestQueue(3)
    dropped = [q.put(i) for i in range(10)]
    assert dropped == [0, 0, 0] + [1] * 7
    assert (q.received, q.dropped, q.high_water, len(q)) == (10, 7, 3, 3)
    assert [q.get(0), q.get(0), q.get(0), q.get(0)] == [7, 8, 9, None]
    with pytest.raises(ValueError):
        DropOldestQueue(0)


def test_worker_processes_newest_when_slow_and_stops_cleanly():
    q = DropOldestQueue(2)
    seen, gate = [], threading.Event()

    def handle(i):
        gate.wait(5)
        seen.append(i)
    w = Worker(q, handle)
    w.start()
    q.put(0)
    time.sleep(0.1)  # worker is now blocked in frame 0
    for i in range(1, 50):
        q.put(i)
    gate.set()
    assert w.wait_idle(5)
    assert seen == [0, 48, 49] and q.dropped == 47
    w.stop()
    assert not w.is_alive()


def test_worker_takes_the_next_item_only_when_ready():
    """With a ready hook (the pipeline has room) the worker leaves items in the queue until it is True,
    so the queue keeps the newest ones."""
    q = DropOldestQueue(2)
    seen, room = [], threading.Event()
    w = Worker(q, seen.append, ready=lambda timeout: room.wait(timeout))
    w.start()
    for i in range(10):
        q.put(i)
    time.sleep(0.3)
    assert seen == [] and len(q) == 2  # nothing taken while not ready
    room.set()
    assert w.wait_idle(5)
    assert seen == [8, 9] and q.dropped == 8
    w.stop()


def test_worker_survives_errors_and_flushes_when_idle():
    q = DropOldestQueue(4)
    errors, idles = [], []
    w = Worker(q, lambda i: 1 / i, on_error=lambda item, exc: errors.append((item, type(exc))),
               on_idle=lambda: idles.append(1), idle_after=0.2)
    w.start()
    for i in (1, 0, 2):
        q.put(i)
    time.sleep(0.6)
    w.stop()
    assert errors == [(0, ZeroDivisionError)] and w.processed == 3 and idles == [1]


def rigid(rpy, t):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('xyz', rpy).as_matrix()
    T[:3, 3] = t
    return T


def test_navigation_pose_chain():
    T_b_c = rigid([-np.pi / 2, 0, -np.pi / 2], [0.2, 0.0, 0.5])  # optical frame on a robot
    T_w_c0 = rigid([0.1, 0.2, 0.3], [1, 2, 3])
    # the robot drives 1 m forward (base x) and turns 90 degrees left
    T_o_b_true = rigid([0, 0, np.pi / 2], [1.0, 0, 0])
    T_w_c = T_w_c0 @ np.linalg.inv(T_b_c) @ T_o_b_true @ T_b_c
    assert np.allclose(navigation_pose(T_w_c0, T_w_c0, T_b_c), np.eye(4))
    assert np.allclose(navigation_pose(T_w_c0, T_w_c, T_b_c), T_o_b_true)
    v, w = body_twist(np.eye(4), T_o_b_true, 2.0)
    assert np.allclose(v, [0.5, 0, 0]) and np.allclose(w, [0, 0, np.pi / 4])
