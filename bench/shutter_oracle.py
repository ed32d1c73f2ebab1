"""What the rolling shutter's in-frame motion estimate costs: ATE with the pipeline's estimate vs the exact one.

Usage: python bench/shutter_oracle.py [--scenario every_effect] [--seeds 1302,1326] [--modes estimated,fitted,long,all]

Renders each seed of a scenario with a rolling shutter (dynrecon_ros.data.scenarios; depth rounded to 1/5000 m as
a TUM PNG stores it) and runs the RGB-D pipeline once per mode, printing ATE (SE(3) and the Sim(3) scale) and RPE:
  estimated: the pipeline as it is (each frame's in-frame motion fitted in its pairs, velocities from the trajectory,
             the pairs refined again with the motion of the smoothed trajectory: backend.shutter_smoothing_frames);
  fitted:    the same without that second refinement (shutter_smoothing_frames 0: the pipeline before 2026-12-06);
  long:      the renderer's exact in-frame motion (synthetic.in_frame_motion), held, in the long pairs only;
  all:       the exact in-frame motion, held, in every pair.
The gap between estimated and all is what a better in-frame motion estimate can win (docs/MEASUREMENTS.md). A
diagnostic: it replaces RGBDPredictor._pair_shutter for the runs of the two exact modes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def run(scenario: str, seed: int, modes: list[str]) -> None:
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.data.synthetic import in_frame_motion, render_sequence
    from dynrecon_ros.data.tum import png_rounded_depth
    from dynrecon_ros.evaluation import trajectory_metrics
    from dynrecon_ros.predictors.rgbd import RGBDPredictor
    from dynrecon_ros.reconstructor import Reconstructor
    from dynrecon_ros.rolling_shutter import PairShutter

    cfg = scenario_config(scenario, seed=seed)
    if cfg.rolling_shutter <= 0:
        raise SystemExit(f'shutter_oracle: scenario {scenario!r} has no rolling shutter')
    seq = render_sequence(cfg)
    for f in seq.frames:
        f.depth = png_rounded_depth(f.depth)
    order = RGBDPredictor.shutter_order
    exact = dict(zip(seq.keys, in_frame_motion(cfg, np.asarray(seq.stamps) - seq.stamps[0], order)))
    estimated = RGBDPredictor._pair_shutter

    def held(self, frame_i, frame_j, rows, adjacent, long_only):  # (no smoothing in these modes: nothing to refine)
        if adjacent and long_only:
            return estimated(self, frame_i, frame_j, rows, adjacent)
        gi, gj = exact[frame_i.key], exact[frame_j.key]
        return PairShutter(self.shutter, rows, frame_i.depth.shape[0], frame_j.K, frame_j.stamp - frame_i.stamp,
                           gi, gj, order=order, known_scale=1e-3, velocity_i=(gi[:3], 1e-4),
                           velocity_j=(gj[:3], 1e-4))

    for mode in modes:
        if mode in ('long', 'all'):
            RGBDPredictor._pair_shutter = (lambda self, fi, fj, rows, adj, _=False, lo=(mode == 'long'):
                                           held(self, fi, fj, rows, adj, lo))
        try:
            rc = ReconConfig()
            rc.backend.rolling_shutter_s, rc.backend.depth_delay_s = cfg.rolling_shutter, cfg.depth_delay
            if mode != 'estimated':
                rc.backend.shutter_smoothing_frames = 0
            rec = Reconstructor(rc, device='cpu')
            t0 = time.perf_counter()
            out = [r for f in seq.frames for r in rec.push(f)] + rec.flush()
        finally:
            RGBDPredictor._pair_shutter = estimated
        ok = [r for r in out if r.status == 'ok']
        tm = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps,
                                seq.poses)
        print(f'{scenario} seed {seed} {mode:9s} ATE {tm["ate_rmse_se3"] * 1000:5.2f} mm  Sim(3) scale '
              f'{tm["sim3_scale"]:.4f}  RPE {tm["rpe_trans_rmse"] * 1000:4.2f} mm  {len(ok)}/{len(seq.frames)} ok  '
              f'{time.perf_counter() - t0:.0f} s', flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--scenario', default='every_effect')
    ap.add_argument('--seeds', default='1302,1326')
    ap.add_argument('--modes', default='estimated,fitted,long,all')
    a = ap.parse_args()
    modes = a.modes.split(',')
    bad = [m for m in modes if m not in ('estimated', 'fitted', 'long', 'all')]
    if bad:
        raise SystemExit(f'shutter_oracle: unknown mode(s) {bad}: estimated, fitted, long, all')
    for seed in (int(s) for s in a.seeds.split(',')):
        run(a.scenario, seed, modes)


if __name__ == '__main__':
    main()
