"""Segmentation stage profile: CPU ms per frame of each part of motion segmentation, per input size.

Usage: python bench/segmentation_profile.py [--sizes 320x240,640x480] [--frames 90] [--seed 0]
       [--save DIR] [--compare DIR] [--cv-threads N] [--scenario NAME] [--set section.name=value ...]
Renders the default synthetic sequence (as bench/pipeline.py; --scenario: a condition preset of
``dynrecon render --scenario`` at each size instead, e.g. walking_people for Kinect holes), runs the RGB-D pipeline with every
function of the segmentation modules wrapped by a CPU-time counter (``time.thread_time`` of the
thread that runs it, so the map thread and other processes on a shared box do not count), and
prints per size: the stage's CPU ms per frame (the segmenter's calls on the caller's thread plus
its worker threads; 'upsampling' is the mask's refinement at the input size, in the map stage),
then per function its own CPU ms per frame (children excluded) and calls, and IoU / ATE. OpenCV's own
worker threads are not counted: --cv-threads 1 keeps OpenCV on the calling thread (0: as configured).
--save DIR writes each frame's mask and pose (npz per size); --compare DIR prints how many mask
pixels and how much pose differ from a saved run (the same result up to noise?).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from pipeline import parse_set  # noqa: E402

# the parts of the stage: (label, module, function)
PARTS = [
    ('flow cue: ego flow', 'flow_cue', '_ego_planes'),
    ('flow cue: error + soft step', 'flow_cue', 'pair_probability'),
    ('flow cue: error + soft step', 'flow_cue', 'pair_probability_and_landing'),
    ('flow cue: edge-tolerant error', 'flow_cue', '_edge_tolerant_error'),
    ('flow cue: soft step', 'flow_cue', '_soft_step'),
    ('hole candidates', 'depth_cue', 'fill_candidates'),
    ('photometric check', 'flow_cue', 'ego_explains_appearance'),
    ('photometric: box means', 'flow_cue', 'nan_box_mean'),
    ('flow matched scenery elsewhere', 'flow_cue', 'matched_scenery_elsewhere'),
    ('exposure gain', 'flow_cue', 'exposure_gain'),
    ('depth cue: nearest reading', 'depth_cue', 'nearest_reading'),
    ('depth cue: pair probability', 'depth_cue', 'pair_depth_probability'),
    ('depth cue: seen from the older frame', 'depth_cue', 'reverse_depth_probability'),
    ('depth cue: pooled over surfaces', 'depth_cue', 'receded_surfaces'),
    ('depth cue: seen through (a pair)', 'depth_cue', 'seen_through_surfaces'),
    ('depth cue: seen empty (far views)', 'depth_cue', 'seen_empty_surfaces'),
    ('carry to older frame (pull)', 'flow_cue', 'pull_from_source'),
    ('carry to older frame (splat)', 'flow_cue', 'splat_to_target'),
    ('temporal memory', 'segmentation', 'MotionSegmenter._remember'),
    ('permanence: carry hold', 'permanence', 'carry_hold'),
    ('permanence: update hold', 'permanence', 'update_hold'),
    ('permanence: complete hold', 'permanence', 'complete_hold'),
    ('permanence: seen as scenery', 'permanence', 'SeenAsScenery.at'),
    ('cleanup: threshold + morphology', 'mask_cleanup', 'clean_mask'),
    ('cleanup: snap to depth edges', 'mask_cleanup', 'snap_to_depth_edges'),
    ('cleanup: drop background', 'mask_cleanup', 'drop_background_segments'),
    ('cleanup: region completion', 'mask_cleanup', 'complete_regions'),
    ('cleanup: surface segments', 'mask_cleanup', 'surface_segments'),
    ('upsampling refinement', 'mask_cleanup', 'refine_upsampled_mask'),
    ('holes: depth across hole bands', 'mask_cleanup', 'across_holes'),
    ('holes: colour snap (map stage)', 'mask_cleanup', 'snap_holes_to_colour_edges'),
]


class Profiler:
    """Own (children excluded) thread CPU time and calls per wrapped function, any thread."""

    def __init__(self):
        self.own = defaultdict(float)
        self.calls = defaultdict(int)
        self.local = threading.local()
        self.lock = threading.Lock()

    def wrap(self, label, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            stack = self.local.__dict__.setdefault('stack', [])
            stack.append(0.0)  # children's inclusive time
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                incl = time.thread_time() - t0
                child = stack.pop()
                if stack:
                    stack[-1] += incl
                with self.lock:
                    self.own[label] += incl - child
                    self.calls[label] += 1
        return inner


def install(prof: Profiler) -> dict:
    """Wrap PARTS in every dynrecon_ros module that holds them by name; the segmenter's stage CPU
    (segment/segment_newest on the caller's thread + its pool's work) goes to 'stage'."""
    import importlib
    mods = [importlib.import_module(f'dynrecon_ros.{m}') for m in
            ('flow_cue', 'depth_cue', 'mask_cleanup', 'permanence', 'segmentation', 'reconstructor', 'rgbd_step')]
    from dynrecon_ros.segmentation import MotionSegmenter
    for label, mod, name in PARTS:
        if '.' in name:  # a method: wrapped on its class
            cls, meth = name.split('.')
            klass = getattr(importlib.import_module(f'dynrecon_ros.{mod}'), cls, None)
            if klass is not None:
                setattr(klass, meth, prof.wrap(label, getattr(klass, meth)))
            continue
        orig = getattr(importlib.import_module(f'dynrecon_ros.{mod}'), name, None)
        if orig is None:  # a part this version of the code does not have (comparing with an older one)
            continue
        wrapped = prof.wrap(label, orig)
        for m in mods:
            if getattr(m, name, None) is orig:
                setattr(m, name, wrapped)
    stage = {'cpu': 0.0, 'calls': 0}
    seg = MotionSegmenter.segment
    pool_map = MotionSegmenter._map

    def segment(self, *a, **k):
        t0 = time.thread_time()
        try:
            return seg(self, *a, **k)
        finally:
            stage['cpu'] += time.thread_time() - t0
            stage['calls'] += 1

    def _map(self, fn, items):
        if self.cfg.threads <= 1 or len(items) <= 1:
            return pool_map(self, fn, items)  # on the caller's thread: counted there

        def timed(x):
            t0 = time.thread_time()
            try:
                return fn(x)
            finally:
                with prof.lock:
                    stage['cpu'] += time.thread_time() - t0
        return pool_map(self, timed, items)

    MotionSegmenter.segment = segment
    MotionSegmenter._map = _map
    return stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='320x240,640x480')
    ap.add_argument('--frames', type=int, default=90)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--save', default='')
    ap.add_argument('--compare', default='')
    ap.add_argument('--cv-threads', type=int, default=0)
    ap.add_argument('--set', nargs='*', default=[])
    ap.add_argument('--scenario', default='', help='a condition preset (dynrecon_ros.data.scenarios) instead of '
                    'the default sequence')
    args = ap.parse_args()
    if args.cv_threads > 0:
        import cv2
        cv2.setNumThreads(args.cv_threads)

    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    from dynrecon_ros.evaluation import mask_metrics, trajectory_metrics
    from dynrecon_ros.reconstructor import Reconstructor

    prof = Profiler()
    stage = install(prof)
    print(f'machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at start')
    for size in args.sizes.split(','):
        w, h = (int(v) for v in size.split('x'))
        if args.scenario:
            from dynrecon_ros.data.scenarios import scenario_config
            syn = scenario_config(args.scenario, width=w, height=h, frames=args.frames, seed=args.seed)
        else:
            syn = SyntheticConfig(width=w, height=h, frames=args.frames, seed=args.seed)
        seq = render_sequence(syn)
        cfg = ReconConfig()
        cfg.backend.rolling_shutter_s, cfg.backend.depth_delay_s = syn.rolling_shutter, syn.depth_delay
        parse_set(cfg, args.set)
        prof.own.clear()
        prof.calls.clear()
        stage.update(cpu=0.0, calls=0)
        rec = Reconstructor(cfg)
        out = []
        t0 = time.perf_counter()
        for f in seq.frames:
            out += rec.push(f)
        out += rec.flush()
        wall = time.perf_counter() - t0
        n = len(seq.frames)
        ok = [r for r in out if r.status == 'ok']
        tm = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps, seq.poses)
        mm = mask_metrics({r.key: r.mask > 0 for r in ok}, dict(zip(seq.keys, seq.masks)))
        up = prof.own.get('upsampling refinement', 0.0)
        print(f'== {w}x{h}, {n} frames (segmentation threads {cfg.segmentation.threads}); load average '
              f'{os.getloadavg()[0]:.1f}; wall {wall:.1f} s')
        print(f'  segmentation stage CPU: {1e3 * stage["cpu"] / n:.1f} ms/frame ({stage["calls"]} calls); wall '
              f'{rec.timings.get("segmentation", 0):.1f} ms/frame; upsampling (map stage) CPU {1e3 * up / n:.1f} ms/frame')
        for label in dict.fromkeys(label for label, _, _ in PARTS):  # (a label may name two functions)
            if prof.calls.get(label):
                print(f'    {label:34s} {1e3 * prof.own[label] / n:7.2f} ms/frame  {prof.calls[label]:5d} calls')
        print(f'  ATE RMSE SE3: {tm["ate_rmse_se3"] * 1000:.3f} mm   mask IoU: {mm["iou"]:.4f} '
              f'(precision {mm["precision"]:.4f}, recall {mm["recall"]:.4f})')
        masks = np.stack([r.mask > 0 for r in ok])
        poses = np.stack([r.pose for r in ok])
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            np.savez_compressed(os.path.join(args.save, f'{w}x{h}.npz'), masks=masks, poses=poses)
        if args.compare:
            ref = np.load(os.path.join(args.compare, f'{w}x{h}.npz'))
            if ref['masks'].shape == masks.shape:
                diff = ref['masks'] != masks
                print(f'  vs {args.compare}: {int(diff.sum())} mask pixels differ ({100 * diff.mean():.4f} %, '
                      f'{int(diff.any(axis=(1, 2)).sum())} frames); max pose difference '
                      f'{1e3 * float(np.abs(ref["poses"][:, :3, 3] - poses[:, :3, 3]).max()):.4f} mm')
            else:
                print(f'  vs {args.compare}: shapes differ {ref["masks"].shape} vs {masks.shape}')


if __name__ == '__main__':
    main()
