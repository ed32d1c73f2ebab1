"""Memory of the monocular path stays bounded however long the stream runs.

A long monocular stream (a short synthetic sequence replayed back and forth, a new stamp and key per
pushed frame, as a real stream gives) goes through the product path: Reconstructor -> MonocularWindow
-> Dust3rPredictor -> PairNetwork (a tiny random-weight checkpoint loaded by load_network) or an
oracle stand-in for the network (no K given: the focal is estimated). After every push each
container that receives per-frame or per-pair entries is checked against its named bound, and each
bound is checked to be reached (the stream has several times more keys than the bound, so the test
fails when an eviction is missing). The memory the Reconstructor holds (numpy arrays, torch storages
and bytes reachable from it, whatever container holds them) must stop growing after the warm-up
(Theil-Sen slope over the second half of the samples, per frame), and so must the process RSS after
malloc_trim (a looser check that also sees module globals and native memory). Checked to fail when
an eviction is removed (predictor pair caches, input cache, engine token cache, _estimated_K trim,
flow-cache clear, segmenter forgetting) and with an injected leak outside any named container.
"""
import gc
import os
import sys
import types

import numpy as np
import pytest
import torch
from scipy.stats import theilslopes

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.frames import Frame
from dynrecon_ros.memory import resident_after_trim
from dynrecon_ros.network import load_network
from dynrecon_ros.predictors.dust3r import Dust3rConfig, Dust3rPredictor
from dynrecon_ros.reconstructor import Reconstructor

sys.path.insert(0, os.path.dirname(__file__))
from dust3r_tiny import write_tiny_checkpoint  # noqa: E402
from test_monocular import OracleNet  # noqa: E402

W, H = 64, 48
LOOSE = {'max_translation_m': 1000.0, 'max_rotation_deg': 180.0, 'max_speed_m_s': 1e5,
         'max_angular_speed_deg_s': 1e5, 'min_inlier_ratio': 0.0}  # random weights: meaningless geometry
# bytes per frame the memory held by the Reconstructor may still grow by after the warm-up: well below
# one frame's smallest per-frame item (its 64x48 colour image, 9 KiB; one pair's cached outputs are 98 KiB)
MAX_SLOPE_BYTES_PER_FRAME = 2048
# the process RSS (after malloc_trim) catches what is held outside the Reconstructor's object graph
# (module globals, native caches); its sampling noise here is ~16 KiB per frame
MAX_RSS_SLOPE_BYTES_PER_FRAME = 48 * 1024
KEYFRAME_GAP = 4  # the real-engine stream's keyframe period (keyframes by frame gap only)
# frames between two memory samples: the cached pairs follow the keyframe cycle (the held memory
# varies by ~1 MiB within a cycle), so every sample is taken at the same phase of it
SAMPLE_EVERY = KEYFRAME_GAP


def replay(seq, n, with_K):
    """(generator of n monocular Frames replaying seq back and forth (continuous motion) with new
    stamps and keys, {key: index in seq}). Frames are made one at a time, as a stream gives them: the
    Reconstructor sets each frame's depth and K, so a list of the pushed frames would grow."""
    m = len(seq.frames)
    period = 2 * (m - 1)
    src = {}
    for k in range(n):
        src[f'{100.0 + k / 30.0:.6f}'] = k % period if k % period < m else period - k % period

    def frames():
        for key, i in src.items():
            yield Frame(stamp=float(key), rgb=seq.frames[i].rgb, depth=None, K=seq.K.copy() if with_K else None,
                        key=key, meta={})
    return frames(), src


def sizes(rec) -> dict:
    """Size of every container of the monocular path that gets per-frame / per-pair entries."""
    p, m, w = rec.predictor, rec.step, rec.window
    out = {'pairs': len(p._pairs), 'second': len(p._second), 'inputs': len(p._inputs), 'grids': len(p._grids),
           'estimated_K': len(m._estimated_K), 'state': 0 if m.state is None else len(m.state.poses),
           'window': len(w.entries), 'keyframes': len(w.keyframes), 'entries': len(w.all_entries()),
           'entry_data': max((len(e.data) for e in w.all_entries()), default=0), 'pending': len(rec._pending),
           'flows': len(rec.flows), 'segmenter': len(rec.segmenter),
           'stage_times': len(rec._times._acc), 'map': len(rec.map)}
    if hasattr(p.net, '_cache'):  # the real engine: encoder tokens per frame, RoPE tables per grid size
        out['tokens'] = len(p.net._cache)
        out['rope'] = len(p.net.model.rope._cache)
    return out


def bounds(rec, max_call_pairs: int) -> dict:
    """The named bound of each container in :func:`sizes` (max_call_pairs: the most ordered pairs one
    predictor call has asked for so far, i.e. a window step's pair graph in both directions; the pair
    caches keep a call's pairs, what the next step can reuse)."""
    c, p = rec.cfg, rec.predictor
    w = c.window
    # window frames + the keyframes kept outside it + keyframes that left the window since the last
    # keyframe was marked (trimmed at the next mark, at most keyframe_max_gap frames later)
    per_window = w.size + w.keyframes + w.size
    out = {'pairs': max(p.cfg.pair_cache, max_call_pairs), 'second': max(p.cfg.pair_cache, max_call_pairs),
           'inputs': max(64, getattr(p.net, 'cache_frames', 0)), 'grids': 2, 'estimated_K': per_window,
           'state': per_window, 'window': w.size, 'keyframes': per_window, 'entries': per_window,
           'entry_data': 5, 'pending': w.size + w.output_lag, 'flows': 0,
           'segmenter': c.segmentation.max_tracked_frames, 'stage_times': 10, 'map': c.map.max_voxels}
    if hasattr(p.net, '_cache'):
        out['tokens'] = p.net.cache_frames
        out['rope'] = 4
    return out


SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, int, float)


def held_bytes(root) -> int:
    """Bytes of the numpy arrays, torch storages and bytes objects reachable from ``root`` (each
    buffer once; classes, modules and functions are not followed, so module globals do not count):
    the memory a Reconstructor holds, whatever container holds it."""
    seen, buffers, total, stack = set(), set(), 0, [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, SKIP):
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            while isinstance(o.base, np.ndarray):
                o = o.base
            if ('np', id(o)) not in buffers:
                buffers.add(('np', id(o)))
                total += o.nbytes
        elif isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            if ('torch', st.data_ptr()) not in buffers:
                buffers.add(('torch', st.data_ptr()))
                total += st.nbytes()
        elif isinstance(o, (bytes, bytearray)):
            total += len(o)
        else:
            stack.extend(gc.get_referents(o))
    return total


def rss_after_trim() -> int:
    """Resident bytes after a gc pass and glibc's malloc_trim (as the node's trim_memory_period does)."""
    gc.collect()
    return resident_after_trim()


def run_stream(rec, frames, warmup):
    """Push frames; check every bound after every push. Returns (sizes per push, [(frame, bytes held
    by rec, RSS)] every SAMPLE_EVERY frames after warmup, statuses)."""
    seen, mem, status = [], [], []
    pred, calls = rec.predictor, [0]
    for name in ('predict_window', 'reweighted'):  # record the most pairs one call asks for
        def counted(frames_, pairs, *a, _f=getattr(pred, name), **kw):
            calls[0] = max(calls[0], len(pairs))
            return _f(frames_, pairs, *a, **kw)
        setattr(pred, name, counted)
    for k, f in enumerate(frames):
        status += [r.status for r in rec.push(f)]  # results are not kept (they would grow)
        rec.static_map()  # waits for the map thread (its voxels are counted)
        s, b = sizes(rec), bounds(rec, calls[0])
        over = {name: (s[name], b[name]) for name in s if s[name] > b[name]}
        assert not over, f'frame {k}: containers over their bound (size, bound): {over}'
        seen.append(s)
        if k >= warmup and (k - warmup) % SAMPLE_EVERY == 0:
            mem.append((k, held_bytes(rec), rss_after_trim()))
    status += [r.status for r in rec.flush()]
    return seen, mem, status


def assert_plateau(mem, what):
    """Theil-Sen slopes (bytes per frame) over the second half of the samples after the warm-up: the
    memory held by the Reconstructor, and (a looser check) the process RSS; printed with pytest -s."""
    half = mem[len(mem) // 2:]
    k = [m[0] for m in half]
    slope = float(theilslopes([m[1] for m in half], k)[0])
    rss_slope = float(theilslopes([m[2] for m in half], k)[0])
    print(f'{what}: held by the Reconstructor {half[0][1] / 2 ** 20:.2f} -> {half[-1][1] / 2 ** 20:.2f} MiB '
          f'(slope {slope:+.0f} B/frame), RSS {half[0][2] / 2 ** 20:.0f} -> {half[-1][2] / 2 ** 20:.0f} MiB '
          f'(slope {rss_slope / 1024:+.1f} KiB/frame), frames {k[0]}..{k[-1]}')
    assert slope < MAX_SLOPE_BYTES_PER_FRAME, (
        f'{what}: memory held by the Reconstructor still grows after the warm-up: {slope / 1024:.1f} KiB per '
        f'frame (from {half[0][1] / 2 ** 20:.2f} to {half[-1][1] / 2 ** 20:.2f} MiB over frames {k[0]}..{k[-1]})')
    assert rss_slope < MAX_RSS_SLOPE_BYTES_PER_FRAME, (
        f'{what}: process RSS still grows after the warm-up: {rss_slope / 1024:.1f} KiB per frame (from '
        f'{half[0][2] / 2 ** 20:.0f} to {half[-1][2] / 2 ** 20:.0f} MiB over frames {k[0]}..{k[-1]})')


@pytest.fixture(scope='module')
def seq():
    return render_sequence(SyntheticConfig(width=W, height=H, frames=24, seed=2, movers=2))


@pytest.mark.parametrize('n_frames', [100, pytest.param(3 * 64 + 8, marks=pytest.mark.slow)])
def test_memory_bounded_real_engine(seq, tmp_path, n_frames):
    """Tiny random-weight checkpoint through load_network (the real engine and its token cache) at a
    48-pixel network input, segmentation.mode both (flow masks, Easi3R attention + second pass):
    more frames than the input cache's 64 (the slow case: 3x), 12x (25x) the token cache, hundreds
    of pairs through a 16-pair cache; K given (random weights give no focal to estimate)."""
    ckpt = write_tiny_checkpoint(tmp_path / 'tiny.pth')
    cfg = ReconConfig.from_dict({
        'checks': LOOSE, 'segmentation': {'mode': 'both'},
        # random geometry would make every frame a keyframe (a dense graph, slow): keyframes by frame gap
        'window': {'keyframe_translation_m': 1e9, 'keyframe_rotation_deg': 1e9, 'keyframe_max_gap': KEYFRAME_GAP},
        'backend': {'align_iterations': 20, 'align_warm_iterations': 2, 'image_size': 48, 'pair_cache': 16}})
    pred = Dust3rPredictor(load_network(ckpt, cache_frames=8), Dust3rConfig.from_backend(cfg.backend, checkpoint=ckpt))
    rec = Reconstructor(cfg, predictor=pred)
    frames, _ = replay(seq, n_frames, with_K=True)
    seen, mem, status = run_stream(rec, frames, warmup=66)
    assert status.count('ok') >= n_frames - 2 and len(status) == n_frames, status
    # every bound that evicts was reached: the stream exceeded it (so a missing eviction would show)
    b = bounds(rec, 0)
    for name in ('inputs', 'tokens'):
        assert max(s[name] for s in seen) == b[name], (name, max(s[name] for s in seen), b[name])
    assert pred.net.stats['encoded'] >= n_frames > b['inputs']
    final = seen[-1]
    assert final['pairs'] >= b['pairs'] and final['second'] >= b['second'] and final['estimated_K'] == 0
    assert max(s['segmenter'] for s in seen) < b['segmenter']  # forgotten long before the cap
    assert_plateau(mem, 'real engine')


def test_memory_bounded_oracle_no_intrinsics(seq):
    """Oracle pointmaps (exact geometry up to a per-pair scale), no K: the focal is estimated per
    frame and _estimated_K follows the window; the product keyframe rule on real motion; the
    static map reaches its voxel cap. Container bounds only (the plateau of the memory held needs a
    stream longer than the 64-frame input cache: the real-engine test)."""
    n_frames = 48
    frames, src = replay(seq, n_frames, with_K=False)
    net = OracleNet(seq)
    net.index.update(src)  # the oracle looks its pairs up by stream key
    cfg = ReconConfig.from_dict({'backend': {'align_iterations': 50, 'align_warm_iterations': 2, 'pair_cache': 16},
                                 'map': {'max_voxels': 3000}})
    pred = Dust3rPredictor(net, Dust3rConfig.from_backend(cfg.backend))
    rec = Reconstructor(cfg, predictor=pred)
    seen, _, status = run_stream(rec, frames, warmup=n_frames)
    assert status.count('ok') >= n_frames - 2 and len(status) == n_frames, status
    b = bounds(rec, 0)
    assert max(s['estimated_K'] for s in seen) >= cfg.window.size  # K estimated for the whole window
    assert 0.9 * b['map'] <= max(s['map'] for s in seen) <= b['map']  # at its bound (cut to 90 % beyond it)
    assert net.pairs_run > 4 * max(s['pairs'] for s in seen)  # many more pairs went through than are kept
