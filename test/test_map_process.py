"""The static map in a process of its own (dynrecon_ros/map_process.py): the same map as in-process, errors
raised by the next call, a dead child reported and replaced, the child gone with its owner."""
import os
import signal
import time

import numpy as np
import pytest

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.errors import InputError
from dynrecon_ros.map_process import SLOTS, MapProcess, MapProcessError
from dynrecon_ros.reconstructor import Reconstructor
from dynrecon_ros.static_map import MapConfig, VoxelMap, read_ply

F, W, H = 120.0, 160, 120
K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])


def _frames(n, h=H, w=W, seed=0):
    """n frames of a noisy wall with a box in front, the camera sliding sideways, a 'mover' masked out."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        d = (2.0 + 0.01 * rng.standard_normal((h, w))).astype(np.float32)
        d[h // 4:h // 2, w // 4:w // 2] = 1.2
        d[rng.random((h, w)) < 0.03] = 0  # holes
        rgb = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        static = np.ones((h, w), bool)
        static[h // 2:, w // 2 + k:w // 2 + k + 20] = False
        conf = rng.uniform(0.5, 1.0, (h, w)).astype(np.float32)
        T = np.eye(4)
        T[0, 3] = 0.01 * k
        out.append((d, rgb, T, static, conf))
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a parent) counts as gone
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return True


def _wait_gone(pid, s=10.0):
    t = time.monotonic() + s
    while _alive(pid) and time.monotonic() < t:
        time.sleep(0.05)
    return not _alive(pid)


def test_the_process_map_is_the_in_process_map(tmp_path):
    """Every frame through the slots (more frames than slots: the ring is reused), one larger frame
    through the pipe, and the optional arguments left out: points, len and the PLY as VoxelMap's, bit for bit."""
    cfg = MapConfig(pixel_stride=0, min_weight=1.5)
    ref, mp = VoxelMap(cfg), MapProcess(cfg)
    try:
        assert len(mp) == 0 and mp.points().shape == (0, 6) and mp.pid is None  # (nothing started yet)
        for i, (d, rgb, T, st, cf) in enumerate(_frames(3 * SLOTS + 2)):
            args = (d, rgb, K, T) + ((st, cf, 1) if i % 3 else ())
            ref.integrate(*args)
            mp.integrate(*args)
        big = _frames(1, 2 * H, 2 * W, seed=1)[0]
        K2 = K * [[2], [2], [1]]
        ref.integrate(big[0], big[1], K2, big[2], big[3], big[4], 2)
        mp.integrate(big[0], big[1], K2, big[2], big[3], big[4], 2)
        want = ref.points()
        assert len(want) > 1000
        np.testing.assert_array_equal(mp.points(), want)
        assert len(mp) == len(ref)
        assert mp.save_ply(tmp_path / 'm.ply') == len(want)
        np.testing.assert_array_equal(read_ply(tmp_path / 'm.ply'), read_ply(ref.save_ply(tmp_path / 'r.ply') and
                                                                                 tmp_path / 'r.ply'))
    finally:
        mp.close()


def test_errors_name_the_problem_and_a_dead_child_is_replaced():
    mp = MapProcess(MapConfig(pixel_stride=0))
    frames = _frames(3)
    d, rgb, T, st, cf = frames[0]
    with pytest.raises(InputError, match='rgb'):  # checked here, at once
        mp.integrate(d, rgb[:10], K, T)
    mp.integrate(d, rgb, K, T, st, cf)
    mp.integrate(d, rgb, K, np.zeros((4, 4)), st, cf)  # the child's carve inverts the pose: it fails there
    with pytest.raises(MapProcessError, match='integration failed.*LinAlgError'):
        mp.points()
    assert len(mp) > 0  # the map before the failed frame is kept
    pid = mp.pid
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)
    with pytest.raises(MapProcessError, match='exited.*map it held is lost'):
        mp.points()
    mp.integrate(d, rgb, K, T, st, cf)  # a new, empty map
    assert mp.pid != pid and len(mp) > 0
    mp.close()


def test_the_child_exits_with_its_owner_and_the_reconstructor_gets_the_same_map():
    """A Reconstructor's map process starts with its first frame, gives the map of the in-process map
    thread, and goes away when the Reconstructor is dropped."""
    import gc

    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence

    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=8, movers=1, seed=4))
    maps, pids = [], []
    for process in (True, False):
        rec = Reconstructor(ReconConfig.from_dict({'map_process': process}), device='cpu')
        for f in seq.frames:
            rec.push(f)
        rec.flush()
        maps.append(rec.static_map())
        pids.append(getattr(rec.map, 'pid', None))
        del rec
        gc.collect()
    assert len(maps[0]) > 1000
    np.testing.assert_array_equal(maps[0], maps[1])
    assert pids[0] is not None and pids[1] is None
    assert _wait_gone(pids[0]), 'the map process outlived its Reconstructor'


def test_a_child_that_cannot_start_leaves_the_map_in_this_process(monkeypatch):
    """A child that exits before it answers (here: an interpreter that is not Python): one error saying so, from
    the first call that finds it gone (the frame's send when it died first, else the points' request), then the map
    works in this process (the frames given before the error are lost, as it says)."""
    import sys

    monkeypatch.setattr(sys, 'executable', '/bin/false')
    cfg = MapConfig(pixel_stride=0, min_weight=1)
    mp, ref = MapProcess(cfg), VoxelMap(cfg)
    frames = _frames(4)
    with pytest.raises(MapProcessError, match='could not start.*now runs in this process'):
        mp.integrate(*frames[0][:2], K, frames[0][2])
        mp.points()
    for d, rgb, T, st, cf in frames[1:]:
        mp.integrate(d, rgb, K, T, st, cf)
        ref.integrate(d, rgb, K, T, st, cf)
    np.testing.assert_array_equal(mp.points(), ref.points())
    assert len(mp) == len(ref) > 0 and mp.pid is None
