"""Where the motion masks miss: false negatives and false positives of one condition, by kind.

Usage: python bench/mask_errors.py SCENARIO [--seeds 101,102] [--frames] [--set section.name=value ...]
Renders the condition preset (dynrecon_ros.data.scenarios, full size) for each seed, runs the RGB-D
pipeline as bench/segmentation.py does, and prints the pooled IoU (precision, recall) and the share of
the missed (FN) and wrongly flagged (FP) pixels that are: without a depth reading; within 2 pixels of
the true silhouette; on thin parts (what an opening of radius 6 removes from the true mask: limbs);
within 8 pixels of the image border; in true mover pieces hit for less than 10 % (whole movers
missed); more than 10 pixels from any mover (FP); and in the first 8 frames (evidence accumulating).
The kinds overlap. --frames: per-frame IoU, FP and FN too.
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from pipeline import parse_set  # noqa: E402


def kinds(pred: np.ndarray, gt: np.ndarray, depth: np.ndarray) -> dict[str, tuple[int, int]]:
    """{kind: (FN pixels, FP pixels)} of one frame ((H, W) bool masks, (H, W) depth, 0 = no reading)."""
    fn, fp = gt & ~pred, pred & ~gt
    hole = ~(depth > 0)
    g = gt.astype(np.uint8)
    inner = cv2.erode(g, np.ones((5, 5), np.uint8)) > 0
    near = cv2.dilate(g, np.ones((5, 5), np.uint8)) > 0
    thin = gt & ~(cv2.morphologyEx(g, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13))) > 0)
    border = np.ones_like(gt)
    border[8:-8, 8:-8] = False
    n, lab = cv2.connectedComponents(g)
    hit = np.bincount(lab[pred], minlength=n) >= 0.1 * np.bincount(lab.ravel(), minlength=n)
    hit[0] = True
    far = ~(cv2.dilate(g, np.ones((21, 21), np.uint8)) > 0)
    return {'no depth reading': ((fn & hole).sum(), (fp & hole).sum()),
            'within 2 px of the silhouette': ((fn & ~inner).sum(), (fp & near).sum()),
            'thin parts (limbs)': ((fn & thin).sum(), 0),
            'within 8 px of the border': ((fn & border).sum(), (fp & border).sum()),
            'movers hit < 10 % (missed whole)': ((fn & ~hit[lab]).sum(), 0),
            '> 10 px from any mover': (0, (fp & far).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('scenario')
    ap.add_argument('--seeds', default='101,102')
    ap.add_argument('--frames', action='store_true', help='per-frame figures too')
    ap.add_argument('--set', nargs='*', default=[], help="ReconConfig overrides 'section.name=value'")
    args = ap.parse_args()
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.data.synthetic import render_sequence
    from dynrecon_ros.reconstructor import Reconstructor

    for seed in (int(s) for s in args.seeds.split(',')):
        cfg = scenario_config(args.scenario, seed=seed)
        seq = render_sequence(cfg)
        rc = ReconConfig()
        rc.backend.rolling_shutter_s, rc.backend.depth_delay_s = cfg.rolling_shutter, cfg.depth_delay
        parse_set(rc, args.set)
        rec = Reconstructor(rc)
        out = []
        for f in seq.frames:
            out += rec.push(f)
        out += rec.flush()
        index = {k: i for i, k in enumerate(seq.keys)}
        tot = np.zeros(3, np.int64)  # TP, FP, FN
        by_kind: dict[str, np.ndarray] = {}
        first = np.zeros(2, np.int64)
        rows = []
        for r in (r for r in out if r.status == 'ok'):
            i = index[r.key]
            pred, gt = r.mask > 0, seq.masks[i]
            c = np.array([(pred & gt).sum(), (pred & ~gt).sum(), (gt & ~pred).sum()])
            tot += c
            for k, v in kinds(pred, gt, seq.frames[i].depth).items():
                by_kind[k] = by_kind.get(k, np.zeros(2, np.int64)) + v
            if i < 8:
                first += (c[2], c[1])
            rows.append((i, c))
        tp, fp, fn = (int(x) for x in tot)
        print(f'{args.scenario} seed {seed}: IoU {tp / max(tp + fp + fn, 1):.3f} (precision {tp / max(tp + fp, 1):.3f}, '
              f'recall {tp / max(tp + fn, 1):.3f}); FN {fn} FP {fp} pixels', flush=True)
        for k, (a, b) in list(by_kind.items()) + [('first 8 frames', first)]:
            print(f'  {k:34s} FN {a:8d} ({a / max(fn, 1):4.0%})  FP {b:8d} ({b / max(fp, 1):4.0%})')
        if args.frames:
            for i, (a, b, c) in sorted(rows, key=lambda x: x[0]):
                print(f'    frame {i:3d}: IoU {a / max(a + b + c, 1):.3f}  FP {b:6d}  FN {c:6d}')


if __name__ == '__main__':
    main()
