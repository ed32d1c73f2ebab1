"""Segmentation benchmark: ATE, mask IoU and static-map purity on the conditions of issue 16.

Usage: python bench/segmentation.py [--seeds 101,102 | 101-110] [--quick] [--only NAME,...] [--device cpu]
       [--set section.name=value ...] [--render field=value ...]
Renders each condition (dynrecon_ros.data.scenarios presets, at their full size: 640x480 where the
issue says so, else 320x240) for every seed, runs the RGB-D pipeline (Reconstructor, as `dynrecon run
--backend rgbd`), and prints per condition and seed: ATE RMSE (SE(3), mm), dynamic-mask IoU (precision,
recall; pooled over all frames), the static map's fraction of points > 5 cm from the static surfaces,
and the render/pipeline seconds; then the mean over seeds. The pipeline is given the sensor's timing
(backend.rolling_shutter_s, backend.depth_delay_s) of the condition, as a user gives their sensor's. The static scene with every sensor effect
runs for 3 seeds (seed, seed+1, seed+2 of the first) and reports the pixels flagged dynamic (must be 0).
--quick: 160x120 (320x240 for the 640 ones), 30 frames, the first seed only: a smoke run. --render: the renderer's
settings changed for every condition (SyntheticConfig fields, e.g. ``width=640 height=480``, ``frames=200``,
``fps=15``): the conditions at other settings than the presets' (where sessions 24-32 found their failures).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from pipeline import parse_set  # noqa: E402  (bench/pipeline.py's --set parser)
from seed_ab import parse_seeds  # noqa: E402  ('101-103,110' -> seeds)

from dynrecon_ros.data.scenarios import parse_overrides  # noqa: E402

# (row label, scenario) in the order of issue 16's table, then the other conditions of the renderer.
CONDITIONS = [
    ('default sequence', 'default'),
    ('3 articulated people, 640x480, Kinect depth + 3 % holes', 'walking_people'),
    ("close crossing + the issue's sensor effects, 320x240", 'close_crossing'),
    ('same people, no sensor effects', 'people_clean'),
    ('same people + 3 % depth holes only', 'people_holes'),
    ('stop-and-go people (~1.5 s stops)', 'stop_and_go'),
    ('camouflaged rigid movers, 640x480', 'camouflage'),
    ('camouflaged rigid movers, 320x240', 'camouflage_small'),
    ('camouflaged rigid movers, 640x480 + 3 % holes', 'camouflage_holes'),
    ('person walking toward the camera', 'toward_camera'),
    ('uniform-colour rigid movers', 'camouflage_uniform'),
    ('close crossing + every sensor effect (+ Kinect, RS)', 'every_effect'),
]


def run_one(scenario: str, seed: int, quick: bool, device: str, sets: list[str], render: dict | None = None) -> dict:
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.data.synthetic import render_sequence
    from dynrecon_ros.evaluation import mask_metrics, trajectory_metrics
    from dynrecon_ros.reconstructor import Reconstructor

    over = {'seed': seed}
    if quick:
        cfg0 = scenario_config(scenario)
        over.update(width=cfg0.width // 2, height=cfg0.height // 2, frames=30)
    over.update(render or {})
    cfg = scenario_config(scenario, **over)
    t0 = time.perf_counter()
    seq = render_sequence(cfg)
    t_render = time.perf_counter() - t0
    rc = ReconConfig()
    # the sensor's timing is part of its calibration, like K: the pose step is told the readout time
    # and the depth delay the sequence was rendered with (--set can override them)
    rc.backend.rolling_shutter_s, rc.backend.depth_delay_s = cfg.rolling_shutter, cfg.depth_delay
    parse_set(rc, sets)
    rec = Reconstructor(rc, device=device)
    t0 = time.perf_counter()
    out = []
    for f in seq.frames:
        out += rec.push(f)
    out += rec.flush()
    t_pipe = time.perf_counter() - t0
    ok = [r for r in out if r.status == 'ok']
    tm = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps, seq.poses)
    pred = {r.key: r.mask > 0 for r in ok}
    mm = mask_metrics(pred, dict(zip(seq.keys, seq.masks)))
    pts = rec.static_map()
    P0 = seq.poses[seq.keys.index(ok[0].key)]
    d = seq.static_surface_distance(pts[:, :3] @ P0[:3, :3].T + P0[:3, 3]) if len(pts) else np.zeros(0)
    return dict(ate=tm['ate_rmse_se3'] * 1000, iou=mm['iou'], precision=mm['precision'], recall=mm['recall'],
                off=100 * float((d > 0.05).mean()) if len(d) else float('nan'), points=len(pts),
                flagged=int(sum(int(m.sum()) for m in pred.values())), frames=len(seq.frames), ok=len(ok),
                size=f'{cfg.width}x{cfg.height}', pixels=cfg.width * cfg.height * len(ok),
                dynamic=100 * float(seq.masks.mean()), t_render=t_render, t_pipe=t_pipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seeds', default='101,102', help="seeds, e.g. '101,102' or '101-110' (each condition runs for each)")
    ap.add_argument('--quick', action='store_true', help='small sizes, 30 frames, first seed: smoke run')
    ap.add_argument('--only', default='', help='comma-separated scenario names (default: all, + static_effects)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--set', nargs='*', default=[], help="ReconConfig overrides 'section.name=value'")
    ap.add_argument('--render', nargs='*', default=[], help="renderer overrides 'field=value' (SyntheticConfig)")
    args = ap.parse_args()
    render = parse_overrides(args.render)
    seeds = parse_seeds(args.seeds)
    if args.quick:
        seeds = seeds[:1]
    only = set(filter(None, args.only.split(',')))
    t_start = time.perf_counter()
    print(f'machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at start; '
          f'seeds {seeds}{" (quick)" if args.quick else ""}{f"; renderer {render}" if render else ""}', flush=True)
    print(f'{"condition":58s} {"seed":>5s} {"size":>8s} {"dyn%":>5s} {"ATE mm":>7s} {"IoU":>6s} {"prec":>6s} '
          f'{"recall":>6s} {"map>5cm%":>8s} {"render s":>8s} {"pipe s":>7s}', flush=True)
    summary = []
    for label, scenario in CONDITIONS:
        if only and scenario not in only:
            continue
        rows = []
        for seed in seeds:
            r = run_one(scenario, seed, args.quick, args.device, args.set, render)
            rows.append(r)
            print(f'{label[:58]:58s} {seed:5d} {r["size"]:>8s} {r["dynamic"]:5.1f} {r["ate"]:7.2f} {r["iou"]:6.3f} '
                  f'{r["precision"]:6.3f} {r["recall"]:6.3f} {r["off"]:8.2f} {r["t_render"]:8.1f} {r["t_pipe"]:7.1f}'
                  + (f'  ({r["ok"]} of {r["frames"]} frames ok)' if r['ok'] < r['frames'] else ''), flush=True)
        summary.append((label, {k: float(np.mean([r[k] for r in rows])) for k in ('ate', 'iou', 'precision', 'recall',
                                                                                 'off')}))
    if not only or 'static_effects' in only:
        flagged = []
        for seed in ([seeds[0]] if args.quick else [seeds[0], seeds[0] + 1, seeds[0] + 2]):
            r = run_one('static_effects', seed, args.quick, args.device, args.set, render)
            flagged.append(r['flagged'])
            print(f'{"static scene, every sensor effect":58s} {seed:5d} {r["size"]:>8s} {r["dynamic"]:5.1f} '
                  f'{r["ate"]:7.2f} flagged pixels {r["flagged"]} ({100 * r["flagged"] / r["pixels"]:.3f} % of '
                  f'the frames\' pixels)  map>5cm {r["off"]:.2f} %  render {r["t_render"]:.1f} s '
                  f'pipe {r["t_pipe"]:.1f} s',
                  flush=True)
    print(f'\nmean over seeds {seeds}:')
    print(f'{"condition":58s} {"ATE mm":>7s} {"IoU":>6s} {"prec":>6s} {"recall":>6s} {"map>5cm%":>8s}')
    for label, m in summary:
        print(f'{label[:58]:58s} {m["ate"]:7.2f} {m["iou"]:6.3f} {m["precision"]:6.3f} {m["recall"]:6.3f} '
              f'{m["off"]:8.2f}')
    if not only or 'static_effects' in only:
        print(f'{"static scene, every sensor effect: pixels flagged per seed":58s} {flagged}')
    print(f'total {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    main()
