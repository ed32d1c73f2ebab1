"""Host-side cost of the monocular window step, with the network cost taken out.

The whole monocular path through the product (``Reconstructor`` + ``Dust3rPredictor`` + the monocular
window step), at 512x384 network resolution with the window-8 pair graph of bench/monocular.py
(keyframes by frame gap), K given, segmentation 'flow'; the network is an oracle stand-in that returns
pointmaps made once per ordered pair from a synthetic sequence's ground truth
(``pairs_from_ground_truth``, as OracleNet in test/test_monocular.py) and cached, so its cost is a
dictionary look-up (timed and reported apart, 'oracle net').

Every function below is wrapped with a timer (those that exist in the code being run), so the same
script measures an old and a new version of the package (run it from an old checkout with
``PYTHONPATH=that_checkout``). Printed, mean ms per steady-state step (after ``--warmup`` frames):
  predict_window (host)  Dust3rPredictor.predict_window minus the oracle net (cache entry, gather)
  finite_views           the non-finite check of the new frame's outputs
  _align prep            MonocularWindow._align minus PointmapAligner.align (non-finite fix, flows)
  align: _check          check_pair_outputs (conversion of the inputs)
  align: _init_tree      tree_init: the spanning-tree placement of the new frame (numpy) and pair similarities (torch)
  align: problem setup   _ClosedFormProblem.__init__ (tensors, weights, flow gate)
  align: sweeps          refine_closed_form minus its problem setup: the aligner's math
in wall-clock ms and in process CPU ms (all threads: comparable under other jobs' load).
The first six are the host overhead this bench isolates; the sweeps are the closed-form math
(float64 on CPU), reported separately and limited by ``--sweeps`` (default 1; the product's 5 cost
5x that figure). The first window uses ``--first-iterations`` Adam steps (default 10: only frame 2).

With ``--device cuda`` the aligner runs on the GPU (float32) and the predictor keeps its cached pair
tensors there (``tensor_device``), as in the product on a GPU; every timer then synchronises the GPU
at its start and end, so each figure holds the GPU work launched inside it.

Usage: python bench/monocular_host.py [--frames 16] [--warmup 9] [--sweeps 1] [--size 512x384]
       [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import itertools
import collections
import functools
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import importlib.util  # noqa: E402

# this checkout's package, unless PYTHONPATH names another one (to measure an old checkout); also when
# PYTHONPATH holds no dynrecon_ros at all (the device's carried-wheel folder, bench/gpu.sh)
if 'PYTHONPATH' not in os.environ or importlib.util.find_spec('dynrecon_ros') is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'test'))  # the oracle pointmaps (pointmap_fixtures)

TIMES: dict = collections.defaultdict(list)  # name -> [ms per call] (wall clock)
CPU: dict = collections.defaultdict(list)  # name -> [ms per call] (process CPU time: all threads)
ACTIVE = {'on': False, 'sync': None}  # sync: torch.cuda.synchronize with --device cuda (timers wait for the GPU)


def timed(owner, name: str, label: str) -> bool:
    """Wrap owner.name (if it exists) so its calls add their ms to TIMES[label]."""
    fn = owner.__dict__.get(name)
    if fn is None:
        return False
    is_static = isinstance(fn, staticmethod)
    f = fn.__func__ if is_static else fn

    @functools.wraps(f)
    def wrapper(*a, **k):
        return _timed_call(label, f, *a, **k)
    setattr(owner, name, staticmethod(wrapper) if is_static else wrapper)
    return True


class Oracle:
    """PairNetwork stand-in: each ordered pair's outputs made once from the ground truth, then looked up."""

    def __init__(self, seq, W):
        from pointmap_fixtures import mover_ids_from_sequence
        self.seq = seq
        self.cfg = SimpleNamespace(img_size=(W, W), patch_size=16)
        self.cache_frames = 16
        self.ids = mover_ids_from_sequence(seq)
        self.made: dict = {}
        self.frame_of: dict = {}

    def predict_pairs(self, images, pairs, frame_ids=None, **kw):
        from pointmap_fixtures import pairs_from_ground_truth
        s = self.seq
        outs = []
        for i, j in pairs:
            gi, gj = self.frame_of[frame_ids[i]], self.frame_of[frame_ids[j]]
            if (gi, gj) not in self.made:  # only the two frames' slices go in (same output, less work)
                f = [gi, gj]
                self.made[(gi, gj)] = pairs_from_ground_truth(s.depth_gt[f], s.poses[f], s.K, [(0, 1)], self.ids[f],
                                                              s.mover_centers[f], noise=0.002, seed=1000 * gi + gj)
            outs.append(self.made[(gi, gj)])
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--frames', type=int, default=16)
    ap.add_argument('--warmup', type=int, default=9, help='frames before the steady state (window full)')
    ap.add_argument('--sweeps', type=int, default=1, help='backend.align_warm_iterations')
    ap.add_argument('--first-iterations', type=int, default=10, help='backend.align_iterations (first window)')
    ap.add_argument('--size', default='512x384')
    ap.add_argument('--render', type=int, default=10, help='synthetic frames rendered (replayed back and forth)')
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='alignment device (default cpu)')
    ap.add_argument('--profile', type=int, default=0, metavar='N',
                    help='then push N more frames under torch.profiler and print where the time goes '
                         '(bench/torch_profile.py)')
    args = ap.parse_args()
    import torch
    if args.device == 'cuda':
        if not torch.cuda.is_available():
            sys.exit('CUDA not available')
        ACTIVE['sync'] = torch.cuda.synchronize
    import dynrecon_ros
    from dynrecon_ros import monocular
    from dynrecon_ros.pointmap_alignment import aligner, init, problem
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    from dynrecon_ros.frames import Frame
    from dynrecon_ros.predictors import dust3r
    from dynrecon_ros.reconstructor import Reconstructor

    W, H = (int(v) for v in args.size.split('x'))
    print(f'package {Path(dynrecon_ros.__file__).parent}, torch {torch.__version__}, {torch.get_num_threads()} '
          f'threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; alignment device '
          f'{args.device}' + (f' ({torch.cuda.get_device_name(0)})' if args.device == 'cuda' else ''))
    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=args.render, fps=30.0, movers=2, seed=0))
    net = Oracle(seq, W)
    plain = net.predict_pairs
    net.predict_pairs = lambda *a, **k: _timed_call('oracle net', plain, *a, **k)
    wrapped = [label for owner, name, label in (
        (dust3r.Dust3rPredictor, 'predict_window', 'predict_window'),
        (dust3r.Dust3rPredictor, '_gather', '  of which _gather'),
        (dust3r.Dust3rPredictor, '_entry', '  of which _entry (new pairs)'),
        (dust3r.Dust3rPredictor, 'finite_views', 'finite_views'),
        (monocular.MonocularWindow, '_align', '_align'),
        (aligner.PointmapAligner, 'align', 'align'),
        (aligner, 'check_pair_outputs', 'align: _check'),
        (problem, 'check_pair_outputs', 'align: _check'),
        (aligner, 'tree_init', 'align: _init_tree'),
        (problem._ClosedFormProblem, '__init__', 'align: problem setup'),
        (problem, 'slot_tensors', '  of which slot tensors (conversion)'),
        (init, 'slot_tensors', '  of which slot tensors (conversion)'),
        (aligner, 'refine_closed_form', 'refine_closed_form'),
    ) if timed(owner, name, label)]
    cfg = ReconConfig.from_dict({'window': {'size': 8, 'keyframe_translation_m': 1e9, 'keyframe_rotation_deg': 1e9},
                                 'segmentation': {'mode': 'flow'},
                                 'backend': {'align_warm_iterations': args.sweeps,
                                             'align_iterations': args.first_iterations},
                                 'checks': {'max_translation_m': 1000.0, 'max_rotation_deg': 180.0, 'max_speed_m_s': 1e5,
                                            'max_angular_speed_deg_s': 1e5, 'min_inlier_ratio': 0.0}})
    rec = Reconstructor(cfg, predictor=dust3r.Dust3rPredictor(net, dust3r.Dust3rConfig.from_backend(cfg.backend)),
                        device=args.device)
    m = len(seq.frames)
    period = 2 * (m - 1)
    steps, pairs_per_step, step_ms, skipped = 0, [], [], collections.Counter()
    def frame(k: int) -> Frame:
        i = k % period
        i = i if i < m else period - i
        stamp = 1000.0 + k / 30.0
        key = f'{stamp:.6f}'
        net.frame_of[key] = i
        return Frame(stamp=stamp, rgb=seq.frames[i].rgb, depth=None, K=seq.K.copy(), key=key, meta={})

    for k in range(args.frames):
        f = frame(k)
        ACTIVE['on'] = k >= args.warmup
        if ACTIVE['sync']:
            ACTIVE['sync']()
        t = time.perf_counter()
        rec.push(f)
        if ACTIVE['sync']:
            ACTIVE['sync']()
        if ACTIVE['on']:
            step_ms.append((time.perf_counter() - t) * 1e3)
            steps += 1
            mono = rec.step
            if mono.state is not None:
                pairs_per_step.append(len(rec.window.graph()) * 2)
    n = max(steps, 1)
    for clock, times in (('wall clock', TIMES), ('process CPU time, all threads', CPU)):
        report(args, steps, W, H, pairs_per_step, wrapped, {lab: sum(v) / n for lab, v in times.items()}, clock)
    for name, ms in sorted(rec._times.means().items()):
        print(f'  stage {name:36s} {ms:8.1f}  (Reconstructor StageTimes, all frames, wall)')
    print(f'  {"whole push (wall)":42s} {np.mean(step_ms) if step_ms else 0:8.1f}')
    print(f'cache sizes: pairs {len(rec.predictor._pairs)}; load average {os.getloadavg()[0]:.2f} at the end')
    if args.profile:
        ACTIVE['on'] = False
        sys.path.insert(0, str(Path(__file__).parent))
        from torch_profile import profile
        more = itertools.count(args.frames)
        profile(lambda: rec.push(frame(next(more))), args.profile, args.device == 'cuda',
                title=f'monocular step (oracle network), alignment on {args.device}, {W}x{H}')


def report(args, steps, W, H, pairs_per_step, wrapped, tot, clock) -> None:
    host = {
        'predict_window (host, minus oracle net)': tot.get('predict_window', 0) - tot.get('oracle net', 0),
        'finite_views': tot.get('finite_views', 0),
        '_align prep (minus align)': tot.get('_align', 0) - tot.get('align', 0),
        'align: _check': tot.get('align: _check', 0),
        'align: _init_tree': tot.get('align: _init_tree', 0),
        'align: problem setup': tot.get('align: problem setup', 0),
    }
    print(f'{steps} steady-state steps at {W}x{H}, ~{np.mean(pairs_per_step) if pairs_per_step else 0:.0f} ordered '
          f'pairs aligned per step, {args.sweeps} closed-form sweep(s); timers: {", ".join(wrapped)}')
    print(f'mean ms per step, {clock} (host overhead isolated by this bench):')
    for lab, v in host.items():
        print(f'  {lab:42s} {v:8.1f}')
    for lab in ('  of which _gather', '  of which _entry (new pairs)', '  of which slot tensors (conversion)'):
        if lab in tot:
            print(f'  {lab:42s} {tot[lab]:8.1f}')
    print(f'  {"TOTAL host overhead":42s} {sum(host.values()):8.1f}')
    print(f'  {"TOTAL without _init_tree":42s} {sum(host.values()) - host["align: _init_tree"]:8.1f}')
    sweeps = tot.get('refine_closed_form', 0) - tot.get('align: problem setup', 0)
    print('separately:')
    print(f'  {"align: closed-form sweeps (math)":42s} {sweeps:8.1f}  ({sweeps / max(args.sweeps, 1):.1f} per sweep)')
    print(f'  {"oracle net (pairs made once, then looked up)":42s} {tot.get("oracle net", 0):8.1f}')


def _timed_call(label, fn, *a, **k):
    sync = ACTIVE['sync'] if ACTIVE['on'] else None
    if sync:
        sync()
    t, c = time.perf_counter(), time.process_time()
    try:
        return fn(*a, **k)
    finally:
        if sync:
            sync()
        if ACTIVE['on']:
            TIMES[label].append((time.perf_counter() - t) * 1e3)
            CPU[label].append((time.process_time() - c) * 1e3)


if __name__ == '__main__':
    main()
