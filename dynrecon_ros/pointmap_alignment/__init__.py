"""Global alignment of pairwise pointmaps over a window (DUSt3R + MonST3R objective), online.

Unknowns (torch, CPU or CUDA):
    per-frame log-depth (N, H, W) at full pointmap resolution;
    per-frame pose cam-to-world: unit quaternion (N, 4) (x, y, z, w) + translation (N, 3) stored
        as signed log1p (as DUSt3R);
    log focal, one shared or one per frame; principal point fixed (default image centre);
    per-pair similarity P_e = (R_e, t_e, s_e) mapping pair e's frame (view i's camera) to world.
Loss: sum_e sum_{v in (i, j)} sum_px w_v^e * ||chi_v - s_e (R_e X_v^e + t_e)|| / (P * H * W) with
    w = log(conf) (DUSt3R's 'log' transform) times the static mask of frame v; plus MonST3R's flow
    term (smooth-L1 between the ego flow of the current estimate and the given optical flow on
    static pixels, errors > 50 px ignored, on after 10 % of the iterations, dropped if it exceeds
    the guard) and camera smoothness (||dR - I||_F + w_t ||dt|| for consecutive frames).
Gauge: without a warm start the pairwise log-scales are normalised to mean log(0.5) (DUSt3R's
    base_scale). With a warm start (``init`` = previous window's state) frames shared with it start
    from their previous pose and depth; 'freeze' mode keeps them all fixed (only pairs touching a
    new frame are optimised), 'refine' mode refines all and holds the pose of the oldest shared
    frame (or of the ``frozen_ids`` frames). Warm steps default to a few sweeps of closed-form
    block-coordinate descent (:func:`refine_closed_form`; without a flow term its last sweeps are
    joint Gauss-Newton steps on all unknowns) instead of Adam, on the data term plus
    MonST3R's flow term in object space: the distance of a static pixel's world point to the line
    of sight of its flow target in the other frame (a 3-D distance like the data term, weighted by
    ``flow_weight_closed_form``; Lu-Hager-Mjolsness' orthogonal iteration for the poses; pixels
    gated by ``flow_max_px`` at the warm start, pairs dropped by ``flow_guard``), so every block stays
    a closed-form majorise-minimise step. The warm path has no camera smoothness term (off by
    default in the Adam path too, see ``AlignConfig.smooth_weight``: it shortened translations).
    The held frames fix the frame (and, when several, the scale: their depths keep their mean
    log-depth); with one held frame the scale gauge is DUSt3R's (pairs' mean log-scale held at its
    warm-start value). A shared focal is refined when one frame is held (the window's objective is
    then the first window's, whatever the earlier windows were) and held with several
    (``AlignConfig.warm_focal``); per-frame focals of the frames not held are refined.
Init: maximum-confidence spanning tree over the pairs, chained weighted Procrustes (Umeyama, refitted
    without outlying points and with Horn's symmetric scale: :func:`~dynrecon_ros.geometry.robust_similarity`)
    from the root, focal from the pointmaps (intrinsics.estimate_focal), depth = z of the registered
    camera-frame pointmap. In a warm start the tree grows from the frozen frames.

Modules (dust3r's cloud_opt split): :mod:`.state` (settings, result, checks), :mod:`.init` (tree
init), :mod:`.adam` (the first window's schedule), :mod:`.problem` (the closed-form problem and its
objective), :mod:`.closed_form` (the warm sweeps), :mod:`.joint` (the joint Gauss-Newton step),
:mod:`.aligner` (:class:`PointmapAligner`, which ties them). Figures: docs/ALIGNMENT.md.
"""
from dynrecon_ros.pointmap_alignment.aligner import PointmapAligner
from dynrecon_ros.pointmap_alignment.closed_form import refine_closed_form
from dynrecon_ros.pointmap_alignment.problem import closed_form_objective
from dynrecon_ros.pointmap_alignment.state import (AlignConfig, AlignmentState, check_pair_outputs,
                                                   metric_scale_from_depth, scale_state, transform_state, window_loss)

__all__ = ['AlignConfig', 'AlignmentState', 'PointmapAligner', 'check_pair_outputs', 'closed_form_objective',
           'metric_scale_from_depth', 'refine_closed_form', 'scale_state', 'transform_state', 'window_loss']
