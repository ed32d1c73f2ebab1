"""Bench: online warm-started window step vs the plain DUSt3R schedule (300 iterations from MST).

For each window size N: render N + steps frames of the synthetic sequence, make pairwise pointmaps
from ground truth (random per-pair scale, noise, movers inconsistent as a static-scene network
would give them; pair graph: each frame with its next 3, both directions), then
  plain:  align the window from MST init for 300 iterations (no warm start), once for the first
          window (it is the online init) and once for the last window (loss comparison);
  online: slide the window one frame at a time, warm start from the previous state, seconds per
          step averaged over ``--steps`` steps. Schedules (``--online``):
            closed_form: the product's default: new frame placed by the (robust) spanning-tree init
              from the previous window, then ``--sweeps`` sweeps of closed-form block-coordinate
              descent (refine_closed_form, each sweep from the second followed by the monotone
              extrapolation of the state along it) over every frame; the oldest keeps its pose (frame) and
              the pairs' mean log-scale is held (DUSt3R's scale gauge, as in the plain run); the
              shared focal is refined (AlignConfig.warm_focal's default with one held frame: the
              window's objective is then the plain run's) unless ``--warm-focal hold``;
            adam_freeze / adam_refine: the previous schedule, ``--warm-iters`` Adam iterations
              (lr 0.002) on the new frame's pairs only / on all frames.
Losses: ``window_loss`` of both on the last window (same data, same gauge: each pair's similarity
refitted, mean pair scale 0.5), their ratio (online / plain), plus Sim(3) ATE of the window's poses.
No optical flow is given (the flow term is measured by test/test_pointmap_alignment.py).
Usage: python bench/alignment.py [--size 64x48] [--windows 8 16 32] [--device cpu|cuda|all]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script is in

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence  # noqa: E402
from dynrecon_ros.evaluation import trajectory_metrics  # noqa: E402
from dynrecon_ros.pointmap_alignment import AlignConfig, PointmapAligner, window_loss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'test'))  # the oracle pointmaps
from pointmap_fixtures import mover_ids_from_sequence, pairs_from_ground_truth, window_pairs  # noqa: E402


def _sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def run(n, size, device, steps, warm_iters, threads, online, sweeps, warm_focal='auto', plain_iters=300,
        given_focal=False, joint_sweeps=None):
    w, h = size
    seq = render_sequence(SyntheticConfig(width=w, height=h, frames=n + steps, movers=2, seed=0, fps=10.0))
    ids = mover_ids_from_sequence(seq)
    pairs = window_pairs(n, 3)
    pp = seq.K[:2, 2]
    if online == 'closed_form':
        cfg = AlignConfig.from_backend(iterations=plain_iters, warm_iterations=sweeps, warm_mode='refine',
                                       warm_optimizer='closed_form', device=device, cpu_threads=threads)
        cfg.warm_focal = {'auto': None, 'refine': True, 'hold': False}[warm_focal]
        if joint_sweeps is not None:
            cfg.warm_joint_sweeps = joint_sweeps
    else:
        cfg = AlignConfig.from_backend(iterations=plain_iters, warm_iterations=warm_iters,
                                       warm_mode=online.split('_')[1], warm_optimizer='adam', device=device,
                                       cpu_threads=threads)
    al = PointmapAligner(cfg)

    made = {}

    def pair_output(a, b):
        """Frames a, b's pair output, made once: the same frame pair gives the same output in every window
        (the network is deterministic). Only the two frames' slices go in (the function reads no other
        frame; same seed, same output): with the whole sequence it transformed every frame per pair."""
        if (a, b) not in made:
            f = [a, b]
            made[(a, b)] = pairs_from_ground_truth(seq.depth_gt[f], seq.poses[f], seq.K, [(0, 1)], ids[f],
                                                   seq.mover_centers[f], seed=1000 * a + b)
        return made[(a, b)]

    def window(lo):
        for key in [key for key in made if min(key) < lo]:  # pairs of frames that left the window
            del made[key]
        outs = [pair_output(lo + i, lo + j) for i, j in pairs]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}, seq.masks[lo:lo + n]

    def timed(**kw):
        if given_focal:
            kw['fixed_focal'] = 0.5 * (seq.K[0, 0] + seq.K[1, 1])
        _sync(device)
        t = time.perf_counter()
        st = al.align(pairs, **kw)
        _sync(device)
        return st, time.perf_counter() - t

    out0, m0 = window(0)
    state, t_first = timed(pair_outputs=out0, masks=m0, pp=pp, frame_ids=list(range(n)))
    t_steps = []
    for lo in range(1, steps + 1):
        out, m = window(lo)
        state, t = timed(pair_outputs=out, masks=m, pp=pp, frame_ids=list(range(lo, lo + n)), init=state)
        t_steps.append(t)
    plain, t_plain = timed(pair_outputs=out, masks=m, pp=pp, frame_ids=list(range(steps, steps + n)))
    sl = slice(steps, steps + n)
    ate = lambda st: trajectory_metrics(seq.stamps[sl], st.poses, seq.stamps[sl], seq.poses[sl])['ate_rmse_sim3']  # noqa
    return dict(n=n, pairs=len(pairs), t_plain=t_plain, t_first=t_first, t_step=float(np.mean(t_steps)),
                loss_plain=window_loss(plain, pairs, out, m), loss_online=window_loss(state, pairs, out, m),
                ate_plain=ate(plain), ate_online=ate(state))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--size', default='64x48', help='pointmap W x H (default 64x48 for CPU)')
    ap.add_argument('--windows', type=int, nargs='+', default=[8, 16, 32])
    ap.add_argument('--device', default='all', choices=['cpu', 'cuda', 'all'])
    ap.add_argument('--steps', type=int, default=3, help='online steps averaged')
    ap.add_argument('--online', nargs='+', default=['closed_form'],
                    choices=['closed_form', 'adam_freeze', 'adam_refine'])
    ap.add_argument('--sweeps', type=int, default=5, help='closed-form sweeps per online step')
    ap.add_argument('--warm-focal', default='auto', choices=['auto', 'refine', 'hold'],
                    help="closed_form: the shared focal in the warm steps (AlignConfig.warm_focal None / True / "
                    "False; default 'auto': refined, since one frame is held)")
    ap.add_argument('--given-focal', action='store_true', help='both schedules hold the true focal (camera_info '
                    'K given), so both minimise over the same unknowns')
    ap.add_argument('--joint-sweeps', type=int, default=None, help='closed_form: sweeps that are joint Gauss-Newton '
                    'steps (AlignConfig.warm_joint_sweeps; default: the product default)')
    ap.add_argument('--warm-iters', type=int, default=30, help='Adam iterations per online step (adam_*)')
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1: fastest at these sizes)')
    a = ap.parse_args()
    size = tuple(int(v) for v in a.size.lower().split('x'))
    devices = ['cpu', 'cuda'] if a.device == 'all' else [a.device]
    devices = [d for d in devices if d == 'cpu' or torch.cuda.is_available()]
    print(f'pointmaps {size[0]}x{size[1]}, pair graph: next 3 frames both directions, online step = 1 new frame, '
          f'plain = 300 Adam it from MST; torch threads {a.threads}; load average {os.getloadavg()[0]:.2f}')
    print(f'{"dev":5} {"online":12} {"N":>3} {"pairs":>5} {"plain s":>8} {"step s":>8} {"speedup":>8} '
          f'{"loss plain":>11} {"loss online":>11} {"ratio":>8} {"ATE plain":>9} {"ATE online":>10}')
    for dev in devices:
        for n in a.windows:
            for online in a.online:
                r = run(n, size, dev, a.steps, a.warm_iters, a.threads, online, a.sweeps, a.warm_focal,
                        given_focal=a.given_focal, joint_sweeps=a.joint_sweeps)
                print(f'{dev:5} {online:12} {n:3d} {r["pairs"]:5d} {r["t_plain"]:8.3f} {r["t_step"]:8.4f} '
                      f'{r["t_plain"] / r["t_step"]:7.1f}x {r["loss_plain"]:11.7f} {r["loss_online"]:11.7f} '
                      f'{r["loss_online"] / r["loss_plain"]:8.5f} {r["ate_plain"] * 1000:7.2f}mm '
                      f'{r["ate_online"] * 1000:8.2f}mm', flush=True)
    print(f'load average at the end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
    main()
