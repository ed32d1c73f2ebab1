"""Pipeline benchmark: frames/s, per-stage ms and accuracy on the synthetic sequences (2 movers).

Usage: python bench/pipeline.py [--sizes 320x240,640x480] [--frames 90] [--device cpu]
       [--segmentation-off] [--set section.name=value ...]
Prints one block per size: frames/s over the whole stream (rendering excluded), mean ms per stage
(flow, pose = pair predictor incl. RANSAC + direct refinement, alignment, segmentation, map = outputs
at the input size, total; map_integrate runs on the map thread, overlapping the next frames),
ATE/RPE (evo), dynamic-mask IoU and the static-map outlier fraction (> 5 cm from static surfaces).
Frames wider than max_work_width (default 320) are processed at a reduced size (see ReconConfig).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def parse_set(cfg, items):
    """Apply 'section.name=value' or 'name=value' (top-level) overrides, typed like the default."""
    for it in items:
        key, value = it.split('=', 1)
        *path, name = key.split('.')
        sub = cfg
        for part in path:
            sub = getattr(sub, part)
        old = getattr(sub, name)
        typ = type(old)
        setattr(sub, name, (value.lower() in ('1', 'true', 'yes')) if typ is bool else typ(value))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='320x240,640x480')
    ap.add_argument('--frames', type=int, default=90)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--segmentation-off', action='store_true')
    ap.add_argument('--set', nargs='*', default=[])
    args = ap.parse_args()

    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    from dynrecon_ros.evaluation import mask_metrics, trajectory_metrics
    from dynrecon_ros.reconstructor import Reconstructor

    print(f'machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at start; device {args.device}')
    for size in args.sizes.split(','):
        w, h = (int(v) for v in size.split('x'))
        seq = render_sequence(SyntheticConfig(width=w, height=h, frames=args.frames, seed=args.seed))
        cfg = ReconConfig()
        cfg.segmentation.enabled = not args.segmentation_off
        parse_set(cfg, args.set)
        rec = Reconstructor(cfg, device=args.device)
        out = []
        t0 = time.perf_counter()
        c0 = time.process_time()
        for f in seq.frames:
            out += rec.push(f)
        out += rec.flush()
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0
        ok = [r for r in out if r.status == 'ok']
        tm = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps, seq.poses)
        mm = mask_metrics({r.key: r.mask > 0 for r in ok}, dict(zip(seq.keys, seq.masks)))
        pts = rec.static_map()
        P0 = seq.poses[seq.keys.index(ok[0].key)]
        d = seq.static_surface_distance(pts[:, :3] @ P0[:3, :3].T + P0[:3, 3])
        t = rec.timings
        print(f'== {w}x{h}, {len(seq.frames)} frames, {seq.masks.mean() * 100:.0f}% dynamic pixels'
              f'{" (segmentation off)" if args.segmentation_off else ""}')
        print(f'  frames/s: {len(seq.frames) / dt:.2f} wall ({dt:.1f} s, {len(ok)} ok); CPU time {cpu:.1f} s = '
              f'{len(seq.frames) / cpu:.2f} frames per CPU-second (load-independent-ish on a shared box); '
              f'load average {os.getloadavg()[0]:.1f}')
        print('  ms/frame: ' + '  '.join(f'{k} {t[k]:.1f}' for k in
                                         ['flow', 'pose', 'alignment', 'segmentation', 'map', 'total', 'map_integrate']
                                         if k in t))
        print(f'  ATE RMSE SE3: {tm["ate_rmse_se3"] * 1000:.2f} mm   RPE: {tm["rpe_trans_rmse"] * 1000:.2f} mm, '
              f'{tm["rpe_rot_rmse"]:.3f} deg per frame')
        print(f'  mask IoU: {mm["iou"]:.3f} (precision {mm["precision"]:.3f}, recall {mm["recall"]:.3f})')
        print(f'  static map: {len(pts)} points, {100 * (d > 0.05).mean():.2f}% > 5 cm from static surfaces')


if __name__ == '__main__':
    main()
