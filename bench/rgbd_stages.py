"""RGB-D pose + flow stage profile: CPU milliseconds per frame of flow and pose and their parts.

Usage: python bench/rgbd_stages.py [--sizes 320x240,640x480] [--frames 90] [--seed 0] [--profile N]
       [--set section.name=value ...]
Runs the default pipeline on the synthetic sequence with OpenCV on one thread (so the calling
thread's CPU time, ``time.thread_time``, is all the work of a stage: figures hold on a shared,
loaded machine) and prints per frame: CPU ms of flow (of which DIS), pose (RANSAC, direct refinement,
the rest), alignment, segmentation, the processing size, checks, outputs at the input size and the map
integration (carving, merging; on the map thread), the process's CPU in all, and of the forward-backward
checks wherever they run (in flow before they were deferred; now in pose, on its grid, and
segmentation); the counts of pairs, DIS computations and checks; ATE and mask IoU. ``--profile N``
prints the top N functions of a cProfile of the stream (cumulative time). With --set
segmentation.threads=1 every stage's CPU is on the threads the wrappers time.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import time

import numpy as np

from pipeline import parse_set  # bench/pipeline.py: the same --set syntax


class CPUTimer:
    """Thread CPU milliseconds and call counts of wrapped functions (nested calls counted in each)."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.ms[name] = self.ms.get(name, 0.0) + (time.thread_time() - t) * 1e3
                self.calls[name] = self.calls.get(name, 0) + 1
        setattr(obj, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='320x240,640x480')
    ap.add_argument('--frames', type=int, default=90)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--profile', type=int, default=0)
    ap.add_argument('--set', nargs='*', default=[])
    args = ap.parse_args()

    import cv2
    cv2.setNumThreads(1)
    import dynrecon_ros.flow as flow_mod
    import dynrecon_ros.predictors.rgbd as rgbd_mod
    import dynrecon_ros.rgbd_step as step_mod
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    from dynrecon_ros.evaluation import mask_metrics, trajectory_metrics
    from dynrecon_ros.reconstructor import Reconstructor

    tm = CPUTimer()
    tm.wrap(flow_mod.FlowCache, 'get', 'flow')
    tm.wrap(flow_mod.DISFlow, 'compute', 'flow.dis')
    if hasattr(flow_mod, '_fb_planar'):  # checks run where first used (pose grid, segmentation): all of them
        tm.wrap(flow_mod, '_fb_planar', 'fb_checks')
    else:
        tm.wrap(flow_mod, 'fb_consistency', 'fb_checks')
    tm.wrap(rgbd_mod.RGBDPredictor, 'relative_pose', 'pose')
    tm.wrap(rgbd_mod, 'ransac_rigid', 'pose.ransac')
    tm.wrap(rgbd_mod.RGBDPredictor, '_refine', 'pose.refine')
    tm.wrap(step_mod.RGBDStep, '_align', 'alignment')
    tm.wrap(step_mod.RGBDStep, '_segment', 'segmentation')
    tm.wrap(step_mod.RGBDStep, 'step', 'step')
    # the rest of a frame's CPU: processing size and checks, outputs at input size, map integration
    import dynrecon_ros.reconstructor as rec_mod
    import dynrecon_ros.static_map as map_mod
    tm.wrap(step_mod.RGBDStep, 'work_frame', 'work_frame')
    tm.wrap(rec_mod.Reconstructor, '_image_stats' if hasattr(rec_mod.Reconstructor, '_image_stats') else '_check',
            'checks')  # (the image figures of the checks: computed in stage A since issue 19)
    tm.wrap(rec_mod.Reconstructor, '_outputs', 'outputs')
    tm.wrap(map_mod.VoxelMap, 'integrate', 'map')
    tm.wrap(map_mod.VoxelMap, '_carve', 'map.carve')
    tm.wrap(map_mod.VoxelMap, '_merge', 'map.merge')
    print(f'machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; OpenCV threads 1; CPU ms per frame')
    for size in args.sizes.split(','):
        w, h = (int(v) for v in size.split('x'))
        seq = render_sequence(SyntheticConfig(width=w, height=h, frames=args.frames, seed=args.seed))
        cfg = ReconConfig()
        parse_set(cfg, args.set)
        rec = Reconstructor(cfg)
        tm.ms.clear()
        tm.calls.clear()
        out = []
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        c0 = time.process_time()
        for f in seq.frames:
            out += rec.push(f)
        out += rec.flush()
        rec.static_map()
        cpu = time.process_time() - c0
        if prof:
            prof.disable()
        ok = [r for r in out if r.status == 'ok']
        tr = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps, seq.poses)
        mm = mask_metrics({r.key: r.mask > 0 for r in ok}, dict(zip(seq.keys, seq.masks)))
        n = len(seq.frames)
        print(f'== {w}x{h}, {n} frames')
        print('  CPU ms/frame: ' + '  '.join(f'{k} {tm.ms.get(k, 0.0) / n:.1f}' for k in
              ['step', 'flow', 'flow.dis', 'pose', 'pose.ransac', 'pose.refine', 'alignment', 'segmentation',
               'fb_checks']))
        print('  CPU ms/frame, the rest: ' + '  '.join(f'{k} {tm.ms.get(k, 0.0) / n:.1f}' for k in
              ['work_frame', 'checks', 'outputs', 'map', 'map.carve', 'map.merge'])
              + f'; process CPU {1e3 * cpu / n:.1f} (all threads; segmentation.threads {cfg.segmentation.threads}: '
              'its workers count here, not in segmentation, unless --set segmentation.threads=1)')
        print(f'  per frame: pairs {tm.calls.get("pose", 0) / n:.2f}, DIS computations '
              f'{tm.calls.get("flow.dis", 0) / n:.2f} (FlowCache.computed {rec.flows.computed / n:.2f}), '
              f'forward-backward checks {tm.calls.get("fb_checks", 0) / n:.2f}')
        print(f'  ATE RMSE SE3: {tr["ate_rmse_se3"] * 1000:.3f} mm  RPE {tr["rpe_trans_rmse"] * 1000:.3f} mm  '
              f'mask IoU {mm["iou"]:.4f}  ({len(ok)} ok)')
        if prof:
            pstats.Stats(prof).sort_stats('cumulative').print_stats(args.profile)


if __name__ == '__main__':
    main()
