import numpy as np
import pytest

from dynrecon_ros.config import WindowConfig
from dynrecon_ros.frames import Frame
from dynrecon_ros.window import SlidingWindow, rotation_angle_deg


def _frame(k):
    return Frame(stamp=float(k), rgb=np.zeros((4, 4, 3), np.uint8))


def _pose(x=0.0):
    T = np.eye(4)
    T[0, 3] = x
    return T


def test_window_keeps_last_n_and_reports_leavers():
    w = SlidingWindow(WindowConfig(size=3, neighbours=1))
    left_all = []
    for k in range(5):
        e, left = w.add(_frame(k))
        left_all += [x.index for x in left]
    assert [e.index for e in w.entries] == [2, 3, 4]
    assert left_all == [0, 1]


def test_pairs_neighbours_and_keyframes():
    w = SlidingWindow(WindowConfig(size=4, neighbours=2, keyframes=2, keyframe_max_gap=100, keyframe_translation_m=0.5))
    e0, _ = w.add(_frame(0))
    e0.pose = _pose(0)
    w.mark_keyframe(e0)
    for k in range(1, 7):
        e, _ = w.add(_frame(k))
        e.pose = _pose(0.1 * k)
        if w.is_keyframe(e.pose, e.index):
            w.mark_keyframe(e)
    # keyframe rule: 0.5 m from frame 0 first reached by frame 6 (0.6 m)
    assert [k.index for k in w.keyframes] == [0, 6]
    pairs = [(a.index, b.index) for a, b in w.pairs_for_newest()]
    assert pairs[:2] == [(5, 6), (4, 6)]  # nearest neighbours first
    assert (0, 6) in pairs  # long pair to the old keyframe outside the window
    assert all(b == 6 for _, b in pairs)
    g = w.graph()
    assert (3, 4) in g and (3, 5) in g and (3, 6) not in g  # +-2 neighbours only
    assert (0, 3) in g  # keyframe anchors pair with window frames


def test_keyframe_rule_by_rotation_and_gap():
    w = SlidingWindow(WindowConfig(size=3, keyframe_rotation_deg=5.0, keyframe_max_gap=3, keyframe_translation_m=10))
    e, _ = w.add(_frame(0))
    e.pose = np.eye(4)
    w.mark_keyframe(e)
    R = np.eye(4)
    c, s = np.cos(np.radians(6)), np.sin(np.radians(6))
    R[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    assert abs(rotation_angle_deg(R[:3, :3]) - 6.0) < 1e-6
    assert w.is_keyframe(R, 1)
    assert not w.is_keyframe(np.eye(4), 2)
    assert w.is_keyframe(np.eye(4), 3)


def test_window_rejects_tiny_size():
    with pytest.raises(ValueError):
        SlidingWindow(WindowConfig(size=1))
