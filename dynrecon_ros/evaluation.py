"""Evaluation: trajectory metrics (ATE, RPE via evo), dynamic-mask metrics, trajectory plots.

Trajectory conventions: stamps (N,) seconds, poses (N, 4, 4) camera-to-world, as TUM's files.
"""
from __future__ import annotations

import copy
import pathlib

import numpy as np

from dynrecon_ros.errors import InputError


def _evo_trajectory(stamps, poses, name: str):
    from evo.core.trajectory import PoseTrajectory3D
    stamps = np.asarray(stamps, dtype=np.float64).reshape(-1)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4)
    if len(stamps) != len(poses):
        raise InputError(f'{name}: {len(stamps)} stamps for {len(poses)} poses')
    if not np.all(np.isfinite(poses)):
        raise InputError(f'{name}: non-finite pose values')
    return PoseTrajectory3D(poses_se3=list(poses), timestamps=stamps)


def associate_trajectories(est_stamps, est_poses, gt_stamps, gt_poses, max_dt: float = 0.02):
    """Associate an estimate with ground truth by nearest stamp (evo) -> (gt, est) evo PoseTrajectory3D."""
    from evo.core import sync
    est = _evo_trajectory(est_stamps, est_poses, 'estimate')
    gt = _evo_trajectory(gt_stamps, gt_poses, 'ground truth')
    try:
        gt_m, est_m = sync.associate_trajectories(gt, est, max_diff=max_dt)
    except sync.SyncException as exc:
        raise InputError(f'no estimated pose matches a ground-truth stamp within {max_dt * 1000:.0f} ms ({exc})') \
            from None
    return gt_m, est_m


def trajectory_metrics(est_stamps, est_poses, gt_stamps, gt_poses, max_dt: float = 0.02) -> dict:
    """ATE and RPE of an estimated trajectory against ground truth, computed with evo.

    Poses are associated by nearest stamp within ``max_dt`` s. ATE: RMSE of the translation
    differences after Umeyama alignment of the estimate to the ground truth, rigid (SE(3)) and with
    scale (Sim(3)); ``sim3_scale`` is the scale that alignment applies to the estimate. RPE: per-frame
    (delta 1 between consecutive matched poses) translation RMSE in metres and rotation RMSE in degrees,
    on the estimate as is (invariant to the rigid alignment); ``rpe_trans_rmse_sim3`` after Sim(3)
    alignment (meaningful for up-to-scale monocular estimates).

    Returns a dict with ate_rmse_se3, ate_rmse_sim3, sim3_scale, rpe_trans_rmse, rpe_rot_rmse,
    rpe_trans_rmse_sim3 (floats) and n_matched (int). Needs at least 3 matched poses.
    """
    from evo.core import metrics
    from evo.core.units import Unit

    gt, est = associate_trajectories(est_stamps, est_poses, gt_stamps, gt_poses, max_dt)
    n = gt.num_poses
    if n < 3:
        raise InputError(f'only {n} estimated poses match ground-truth stamps within {max_dt * 1000:.0f} ms; '
                         'need at least 3 for aligned metrics')

    def ape(aligned):
        m = metrics.APE(metrics.PoseRelation.translation_part)
        m.process_data((gt, aligned))
        return float(m.get_statistic(metrics.StatisticsType.rmse))

    def rpe(traj, relation):
        m = metrics.RPE(relation, delta=1, delta_unit=Unit.frames, all_pairs=False)
        m.process_data((gt, traj))
        return float(m.get_statistic(metrics.StatisticsType.rmse))

    est_se3 = copy.deepcopy(est)
    est_se3.align(gt, correct_scale=False)
    est_sim3 = copy.deepcopy(est)
    _, _, scale = est_sim3.align(gt, correct_scale=True)
    return {
        'ate_rmse_se3': ape(est_se3),
        'ate_rmse_sim3': ape(est_sim3),
        'sim3_scale': float(scale),
        'rpe_trans_rmse': rpe(est, metrics.PoseRelation.translation_part),
        'rpe_rot_rmse': rpe(est, metrics.PoseRelation.rotation_angle_deg),
        'rpe_trans_rmse_sim3': rpe(est_sim3, metrics.PoseRelation.translation_part),
        'n_matched': int(n),
    }


def _match_keys(pred: dict, gt: dict, max_dt: float = 0.005) -> list[tuple[str, str]]:
    """Pair mask keys: identical strings first, then remaining numeric keys by nearest stamp."""
    from dynrecon_ros.data.tum import associate

    pairs = [(k, k) for k in pred if k in gt]
    rest_p = [k for k in pred if k not in gt]
    rest_g = [k for k in gt if k not in pred]

    def numeric(keys):
        out = []
        for k in keys:
            try:
                out.append((float(k), k))
            except ValueError:
                pass
        return out
    num_p, num_g = numeric(rest_p), numeric(rest_g)
    for a, b in associate([s for s, _ in num_p], [s for s, _ in num_g], max_dt):
        pairs.append((num_p[a][1], num_g[b][1]))
    return sorted(pairs, key=lambda p: p[1])


def mask_metrics(pred: dict, gt: dict) -> dict:
    """IoU, precision and recall of predicted dynamic masks against ground truth.

    pred, gt: {key: (H, W) bool}. Keys are matched exactly, then numeric keys by nearest stamp (5 ms).
    Counts are pooled over all pixels of all matched frames (one TP/FP/FN total, not a mean of
    per-frame ratios); ``iou_mean`` is the mean of per-frame IoU over frames where either mask is
    non-empty. A ratio with a zero denominator is NaN. ``n`` = matched frames.
    """
    pairs = _match_keys(pred, gt)
    if not pairs:
        raise InputError(f'no predicted mask matches a ground-truth mask key ({len(pred)} predicted, {len(gt)} '
                         f'ground truth)')
    tp = fp = fn = 0
    per_frame = []
    for kp, kg in pairs:
        p, g = np.asarray(pred[kp], dtype=bool), np.asarray(gt[kg], dtype=bool)
        if p.shape != g.shape:
            raise InputError(f'mask {kp}: predicted size {p.shape[1]}x{p.shape[0]} differs from ground truth '
                             f'{g.shape[1]}x{g.shape[0]}')
        t, f_p, f_n = int(np.sum(p & g)), int(np.sum(p & ~g)), int(np.sum(~p & g))
        tp, fp, fn = tp + t, fp + f_p, fn + f_n
        if t + f_p + f_n:
            per_frame.append(t / (t + f_p + f_n))

    def ratio(a, b):
        return float(a / b) if b else float('nan')
    return {'iou': ratio(tp, tp + fp + fn), 'precision': ratio(tp, tp + fp), 'recall': ratio(tp, tp + fn),
            'iou_mean': float(np.mean(per_frame)) if per_frame else float('nan'), 'n': len(pairs)}


def plot_trajectories(est_stamps, est_poses, gt_stamps, gt_poses, path_png, max_dt: float = 0.02,
                      correct_scale: bool = False, title: str | None = None) -> pathlib.Path:
    """Plot the ground truth and the aligned estimate (SE(3), or Sim(3) with ``correct_scale``) in the
    x-y and x-z planes of the ground-truth world, with the matched pairs' errors; writes a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    gt, est = associate_trajectories(est_stamps, est_poses, gt_stamps, gt_poses, max_dt)
    if gt.num_poses >= 3:
        est.align(gt, correct_scale=correct_scale)
    g, e = gt.positions_xyz, est.positions_xyz
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (i, j, names) in zip(axes, ((0, 1, 'xy'), (0, 2, 'xz'))):
        ax.plot(g[:, i], g[:, j], '-', color='0.3', label='ground truth')
        ax.plot(e[:, i], e[:, j], '-', color='tab:blue', label='estimate (aligned)')
        for a, b in zip(g[::max(1, len(g) // 60)], e[::max(1, len(g) // 60)]):
            ax.plot([a[i], b[i]], [a[j], b[j]], '-', color='tab:red', lw=0.6, alpha=0.6)
        ax.set_xlabel(f'{names[0]} [m]')
        ax.set_ylabel(f'{names[1]} [m]')
        ax.set_aspect('equal', adjustable='datalim')
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc='best')
    fig.suptitle(title or f'trajectory ({gt.num_poses} matched poses, {"Sim(3)" if correct_scale else "SE(3)"} '
                          'aligned)')
    fig.tight_layout()
    path = pathlib.Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_metrics(traj: dict | None = None, masks: dict | None = None) -> str:
    """Human-readable lines for the metric dicts above."""
    lines = []
    if traj:
        lines += [f'matched poses      {traj["n_matched"]}',
                  f'ATE RMSE (SE(3))   {traj["ate_rmse_se3"]:.4f} m',
                  f'ATE RMSE (Sim(3))  {traj["ate_rmse_sim3"]:.4f} m  (scale {traj["sim3_scale"]:.4f})',
                  f'RPE trans RMSE     {traj["rpe_trans_rmse"]:.4f} m/frame',
                  f'RPE rot RMSE       {traj["rpe_rot_rmse"]:.4f} deg/frame']
    if masks:
        lines += [f'mask frames        {masks["n"]}',
                  f'mask IoU           {masks["iou"]:.4f}  (per-frame mean {masks["iou_mean"]:.4f})',
                  f'mask precision     {masks["precision"]:.4f}',
                  f'mask recall        {masks["recall"]:.4f}']
    return '\n'.join(lines)
