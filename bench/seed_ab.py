"""A/B of pipeline settings over many seeds: ATE per seed and variant, then the summary a change is judged by.

Usage: python bench/seed_ab.py [--scenario every_effect] [--seeds 1300-1345,850-857] [--jobs 2] [--frames N]
                               [--variant base] [--variant 'backend.shutter_smoothing_frames=0' ...]

Each seed of the scenario (dynrecon_ros.data.scenarios) is rendered once and run through the RGB-D pipeline once per
variant, in memory, with the depth rounded to 1/5000 m as a TUM PNG stores it and the sensor's readout and depth
delay told to the pipeline as the scenario rendered them; ``--frames`` renders that many frames instead of the
scenario's (longer sequences show drift). A variant is ``base`` (the defaults) or
'section.name=value' overrides joined by '+'. Seeds run in ``--jobs`` processes at once.

Prints one line per seed (ATE SE(3) mm and Sim(3) scale per variant), then per variant the mean, median and
largest ATE, how many seeds lie above ``--limit`` mm, and against the first variant how many seeds got better or
worse by more than 0.05 mm with the two-sided sign test's p-value. Why: on the conditions with a close person
(every_effect, close_crossing) single seeds move by +-2 mm under any small change, so a change screened on its
worst seeds always looks good; only many seeds and the sign test tell (docs/MEASUREMENTS.md, session 30).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline import parse_set  # noqa: E402  (bench/pipeline.py's --set parser)


def parse_seeds(text: str) -> list[int]:
    """'1300-1302,850' -> [1300, 1301, 1302, 850]."""
    out = []
    for part in filter(None, text.split(',')):
        lo, _, hi = part.partition('-')
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def run_seed(scenario: str, seed: int, variants: list[str], frames: int = 0) -> tuple[int, list[tuple[float, float]]]:
    """(seed, [(ATE SE(3) m, Sim(3) scale) per variant])."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.data.synthetic import render_sequence
    from dynrecon_ros.data.tum import png_rounded_depth
    from dynrecon_ros.evaluation import trajectory_metrics
    from dynrecon_ros.reconstructor import Reconstructor

    cfg = scenario_config(scenario, seed=seed, **({'frames': frames} if frames > 0 else {}))
    seq = render_sequence(cfg)
    for f in seq.frames:
        if f.depth is not None:
            f.depth = png_rounded_depth(f.depth)
    res = []
    for v in variants:
        rc = ReconConfig()
        rc.backend.rolling_shutter_s, rc.backend.depth_delay_s = cfg.rolling_shutter, cfg.depth_delay
        parse_set(rc, [] if v == 'base' else v.split('+'))
        rec = Reconstructor(rc, device='cpu')
        out = [r for f in seq.frames for r in rec.push(f)] + rec.flush()
        ok = [r for r in out if r.status == 'ok']
        tm = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps, seq.poses)
        res.append((tm['ate_rmse_se3'], tm['sim3_scale']))
    return seed, res


def summary(ate_mm: np.ndarray, variants: list[str], limit: float) -> list[str]:
    """Lines of the summary of (seeds, variants) ATE in mm."""
    from scipy.stats import binomtest
    lines = []
    for k, v in enumerate(variants):
        a = ate_mm[:, k]
        line = (f'{v}: mean {a.mean():.3f} mm, median {np.median(a):.2f}, max {a.max():.2f}, '
                f'above {limit:g} mm {int((a > limit).sum())} of {len(a)}')
        if k:
            d = a - ate_mm[:, 0]
            better, worse = int((d < -0.05).sum()), int((d > 0.05).sum())
            p = binomtest(better, better + worse).pvalue if better + worse else 1.0
            line += f'; against {variants[0]}: {better} better, {worse} worse (sign test p = {p:.2f})'
        lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--scenario', default='every_effect')
    ap.add_argument('--seeds', default='1300-1345,850-857')
    ap.add_argument('--variant', action='append', default=None,
                    help="'base' or 'section.name=value[+section.name=value...]' (repeat; default: base)")
    ap.add_argument('--jobs', type=int, default=2)
    ap.add_argument('--limit', type=float, default=3.0, help='ATE limit in mm the summary counts seeds above')
    ap.add_argument('--frames', type=int, default=0, help="frames to render (0: the scenario's)")
    a = ap.parse_args()
    variants = a.variant or ['base']
    seeds = parse_seeds(a.seeds)
    from dynrecon_ros.config import ReconConfig
    for v in variants:  # bad overrides fail here, before any rendering
        if v != 'base':
            parse_set(ReconConfig(), v.split('+'))
    print(f'{a.scenario}{f" ({a.frames} frames)" if a.frames > 0 else ""}, {len(seeds)} seeds, variants: {" | ".join(variants)}; {a.jobs} processes', flush=True)
    rows = {}
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futs = [pool.submit(run_seed, a.scenario, s, variants, a.frames) for s in seeds]
        for fut in futs:
            seed, res = fut.result()
            rows[seed] = res
            print(f'{seed}: ' + ' | '.join(f'{1000 * ate:.2f} mm (scale {sc:.4f})' for ate, sc in res), flush=True)
    ate_mm = np.array([[1000 * ate for ate, _ in rows[s]] for s in seeds])
    for line in summary(ate_mm, variants, a.limit):
        print(line)


if __name__ == '__main__':
    main()
