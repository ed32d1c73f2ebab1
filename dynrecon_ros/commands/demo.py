"""`dynrecon demo`: render the embedded default synthetic sequence, reconstruct it, print the metrics.

320x240, 90 frames, two walking movers (dynrecon_ros.data.synthetic defaults), written in TUM
layout under DIR/data; the reconstruction goes to DIR/run. Prints ATE/RPE against the ground-truth
trajectory, the dynamic-mask IoU, the static-map outlier fraction and the path of preview.png.
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

import numpy as np


def add_arguments(parser) -> None:
    parser.add_argument('--output', default=None, help='output directory (default: a new temporary one)')
    parser.add_argument('--frames', type=int, default=90, help='frames to render (default 90)')
    parser.add_argument('--device', default='cpu', help="torch device ('cpu', 'cuda')")


def run(args) -> int:
    from dynrecon_ros.commands.run import open_input, reconstruct
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence, write_tum
    from dynrecon_ros.data.tum import read_masks, read_trajectory
    from dynrecon_ros.errors import InputError
    from dynrecon_ros.evaluation import mask_metrics, trajectory_metrics

    if args.frames < 10:
        raise InputError(f'--frames must be >= 10, got {args.frames}')
    out = pathlib.Path(args.output) if args.output else pathlib.Path(tempfile.mkdtemp(prefix='dynrecon-demo-'))
    out.mkdir(parents=True, exist_ok=True)
    print(f'rendering the default synthetic sequence ({args.frames} frames, 320x240, 2 movers) ...', flush=True)
    seq = render_sequence(SyntheticConfig(frames=args.frames))
    data = out / 'data'
    write_tum(seq, data)
    print(f'  written in TUM layout: {data}')
    run_dir = out / 'run'
    summary = reconstruct(open_input(data), run_dir, device=args.device,
                          log=lambda m: print(f'  {m}', file=sys.stderr))
    stamps, poses = read_trajectory(run_dir / 'trajectory.tum')
    tm = trajectory_metrics(stamps, poses, seq.stamps, seq.poses)
    pred = read_masks(run_dir / 'masks')
    gt = {k: m for k, m in zip(seq.keys, seq.masks)}
    mm = mask_metrics(pred, gt)
    from dynrecon_ros.static_map import read_ply
    pts = read_ply(run_dir / 'static_map.ply')
    # the map is in the first camera's frame; the GT surfaces are in the renderer's world frame
    first = seq.keys.index(min(pred, key=float)) if pred else 0
    P0 = seq.poses[first]
    dist = seq.static_surface_distance(pts[:, :3] @ P0[:3, :3].T + P0[:3, 3]) if len(pts) else np.zeros(0)
    far = float((dist > 0.05).mean()) if len(dist) else float('nan')
    print(f'frames: {summary["frames"]} reconstructed of {summary["input_frames"]}, '
          f'{summary["frames_per_second"]:.1f} frames/s')
    print(f'ATE RMSE (SE3): {tm["ate_rmse_se3"] * 1000:.1f} mm   RPE trans: {tm["rpe_trans_rmse"] * 1000:.2f} mm/frame   '
          f'RPE rot: {tm["rpe_rot_rmse"]:.3f} deg/frame')
    print(f'dynamic mask IoU: {mm["iou"]:.3f} (precision {mm["precision"]:.3f}, recall {mm["recall"]:.3f})')
    print(f'static map: {len(pts)} points, {100 * far:.2f}% farther than 5 cm from static surfaces')
    print(f'preview: {run_dir / "preview.png"}')
    return 0
