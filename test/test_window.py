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


def test_far_anchors_keep_the_dropped_keyframes_and_join_the_alignment_while_linked():
    """window.far_keyframes: keyframes pushed out of the anchors stay (bounded, their per-step data dropped); a far
    anchor paired with a window frame is among all_entries while that frame is in the window, not after."""
    w = SlidingWindow(WindowConfig(size=2, keyframes=1, far_keyframes=2, keyframe_max_gap=1))
    ents = []
    for k in range(7):
        e, _ = w.add(_frame(k))
        e.pose = _pose(0.1 * k)
        e.data['input'] = 'big'
        ents.append(e)
        if w.is_keyframe(e.pose, e.index):
            w.mark_keyframe(e)
    # window 5, 6; anchor outside it 4; far anchors the two before (0-2 dropped past the bound)
    assert [e.index for e in w.entries] == [5, 6]
    assert [k.index for k in w.keyframes if k not in w.entries] == [4]
    assert [f.index for f in w.far] == [2, 3]
    assert all(f.data == {} for f in w.far) and ents[4].data == {'input': 'big'}
    assert 3 not in [e.index for e in w.all_entries()]
    w.link_far(w.far[1], ents[6])
    assert [e.index for e in w.all_entries()] == [3, 4, 5, 6]
    for k in range(7, 10):  # frame 6 leaves the window and the anchors: the far anchor with it
        e, _ = w.add(_frame(k))
        e.pose = _pose(0.1 * k)
        w.mark_keyframe(e)
    assert [k.index for k in w.keyframes if k not in w.entries] == [7]
    assert 3 not in [e.index for e in w.all_entries()]
    with pytest.raises(ValueError, match='far_keyframes'):
        SlidingWindow(WindowConfig(far_keyframes=-1))


def test_pop_last_forgets_a_far_link():
    w = SlidingWindow(WindowConfig(size=2, keyframes=0, far_keyframes=4, keyframe_max_gap=1))
    for k in range(4):
        e, _ = w.add(_frame(k))
        e.pose = _pose(0.1 * k)
        w.mark_keyframe(e)
    assert [f.index for f in w.far] == [0, 1]
    w.link_far(w.far[0], w.entries[-1])
    assert 0 in [e.index for e in w.all_entries()]
    w.pop_last()
    assert 0 not in [e.index for e in w.all_entries()]
