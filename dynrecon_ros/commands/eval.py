"""`dynrecon eval`: ATE/RPE (evo) and dynamic-mask metrics against ground truth, plus a trajectory plot."""
from __future__ import annotations

import json
import math
import pathlib

from dynrecon_ros.errors import InputError


def add_arguments(parser) -> None:
    parser.add_argument('--traj', metavar='EST', help='estimated trajectory, TUM format')
    parser.add_argument('--gt', metavar='GT', help='ground-truth trajectory (TUM format) or a TUM directory')
    parser.add_argument('--masks', metavar='DIR', help='predicted dynamic masks (<key>.png, 255 = dynamic)')
    parser.add_argument('--gt-masks', metavar='DIR', help='ground-truth masks (default: GT directory/masks_gt)')
    parser.add_argument('--plot', metavar='PNG', help='trajectory plot (default: next to EST, <EST stem>_traj.png)')
    parser.add_argument('--no-plot', action='store_true', help='do not write the trajectory plot')
    parser.add_argument('--max-dt', type=float, default=0.02, help='stamp association tolerance in seconds')
    parser.add_argument('--json', action='store_true', help='print the metrics as one JSON object')


def _gt_paths(gt) -> tuple[pathlib.Path | None, pathlib.Path | None]:
    """--gt as file or TUM directory -> (groundtruth file, masks_gt directory or None)."""
    if gt is None:
        return None, None
    gt = pathlib.Path(gt)
    if gt.is_dir():
        masks = gt / 'masks_gt'
        return gt / 'groundtruth.txt', masks if masks.is_dir() else None
    return gt, None


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def run(args) -> int:
    from dynrecon_ros.data.tum import read_masks, read_trajectory
    from dynrecon_ros.evaluation import format_metrics, mask_metrics, plot_trajectories, trajectory_metrics

    if not args.traj and not args.masks:
        raise InputError('nothing to evaluate: give --traj EST --gt GT and/or --masks DIR')
    gt_file, gt_masks_dir = _gt_paths(args.gt)
    traj = masks = plot = None
    if args.traj:
        if gt_file is None:
            raise InputError('--traj needs --gt (ground-truth trajectory file or TUM directory)')
        est_stamps, est_poses = read_trajectory(args.traj)
        gt_stamps, gt_poses = read_trajectory(gt_file)
        traj = trajectory_metrics(est_stamps, est_poses, gt_stamps, gt_poses, max_dt=args.max_dt)
        if not args.no_plot:
            est = pathlib.Path(args.traj)
            plot = pathlib.Path(args.plot) if args.plot else est.with_name(est.stem + '_traj.png')
            plot_trajectories(est_stamps, est_poses, gt_stamps, gt_poses, plot, max_dt=args.max_dt,
                              title=f'{est.name} vs {pathlib.Path(gt_file).name}')
    if args.masks:
        gt_dir = args.gt_masks or gt_masks_dir
        if gt_dir is None:
            raise InputError('--masks needs --gt-masks DIR (or --gt pointing at a TUM directory with masks_gt/)')
        masks = mask_metrics(read_masks(args.masks), read_masks(gt_dir))
    if args.json:
        out = {'trajectory': traj and _clean(traj), 'masks': masks and _clean(masks),
               'plot': str(plot) if plot else None}
        print(json.dumps(out))
    else:
        print(format_metrics(traj, masks))
        if plot:
            print(f'trajectory plot    {plot}')
    return 0
