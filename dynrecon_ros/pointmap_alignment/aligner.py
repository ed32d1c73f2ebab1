"""The aligner that ties the stages of a window's alignment: the checks, the spanning-tree init
(:mod:`.init`), then the first window's Adam schedule (:mod:`.adam`) or, warm-started from the
previous window, the closed-form refinement (:mod:`.closed_form`) with the gauges it needs."""
from __future__ import annotations

import math

import numpy as np
import torch

from dynrecon_ros.errors import InputError
from dynrecon_ros.intrinsics import default_principal_point
from dynrecon_ros.pointmap_alignment.adam import adam_schedule
from dynrecon_ros.pointmap_alignment.closed_form import refine_closed_form
from dynrecon_ros.pointmap_alignment.init import tree_init
from dynrecon_ros.pointmap_alignment.state import AlignConfig, AlignmentState, check_pair_outputs


class PointmapAligner:
    """DUSt3R global alignment with MonST3R's terms, warm-startable across windows."""

    def __init__(self, cfg: AlignConfig | None = None):
        self.cfg = cfg or AlignConfig.from_backend()

    def align(self, pairs, pair_outputs, masks=None, flows=None, init: AlignmentState | None = None,
              frame_ids=None, fixed_focal=None, pp=None, iterations: int | None = None,
              frozen_ids=None) -> AlignmentState:
        """Align a window.

        pairs: [(i, j)] local frame indices 0..N-1 (P pairs). pair_outputs: dict with pts3d_1,
        pts3d_2_in_1 (P, H, W, 3) and conf_1, conf_2 (P, H, W) (the network's output).
        masks: optional (N, H, W) dynamic masks (True/>0 = dynamic, excluded from the loss).
        flows: optional dict {(i, j): (H, W, 2)} optical flow from frame i to j (pixels); a NaN
        (non-finite) pixel means no flow there (e.g. it failed the forward-backward check): it has
        no weight in the flow term nor in its guard, in the Adam and the closed-form path alike.
        init: previous window's state; frames with the same id (``frame_ids`` (N,), default
        0..N-1) are frozen to it. fixed_focal: a focal (px) from camera_info, kept fixed.
        pp: (2,) principal point, default the image centre. iterations: overrides the config.
        frozen_ids: in 'refine' mode, ids of shared frames that stay frozen (e.g. frames whose
        result was already published); default (and when none is shared) the oldest shared frame.
        """
        cfg = self.cfg
        pairs = [tuple(map(int, p)) for p in pairs]
        arr = check_pair_outputs(pairs, pair_outputs)
        P, H, W = arr['conf_1'].shape
        n = max(max(p) for p in pairs) + 1
        frame_ids = list(range(n)) if frame_ids is None else list(frame_ids)
        if len(frame_ids) != n:
            raise InputError(f'frame_ids has {len(frame_ids)} entries for {n} frames')
        pp = default_principal_point(H, W) if pp is None else np.asarray(pp, np.float64)
        static = np.ones((n, H, W)) if masks is None else (~(np.asarray(masks) > 0)).astype(np.float64)
        ff = None if fixed_focal is None else np.broadcast_to(np.asarray(fixed_focal, np.float64), (n,)).copy()

        known_world, known_pose, known_depth, known_focal = {}, {}, {}, {}
        if init is not None:
            prev = {fid: k for k, fid in enumerate(init.frame_ids)}
            for f, fid in enumerate(frame_ids):
                if fid in prev:
                    k = prev[fid]
                    known_pose[f], known_depth[f], known_focal[f] = init.poses[k], init.depths[k], init.focals[k]
                    known_world[f] = init.world_points(k)
            if not known_pose:
                raise InputError('warm start: the window shares no frame with the previous state')
        warm = bool(known_pose)
        all_pairs, keep = pairs, np.arange(len(pairs))
        frozen = sorted(known_pose)
        if warm and cfg.warm_mode == 'refine':
            held = [f for f in frozen if frozen_ids is not None and frame_ids[f] in set(frozen_ids)]
            frozen = held or frozen[:1]
        elif warm and cfg.warm_mode != 'freeze':
            raise InputError(f"warm_mode must be 'freeze' or 'refine', got {cfg.warm_mode!r}")
        if warm and cfg.warm_mode == 'freeze':  # pairs between two frozen frames only move their own similarity
            keep = np.array([e for e, (i, j) in enumerate(pairs) if i not in known_pose or j not in known_pose])
            if keep.size == 0:
                raise InputError('warm start: every frame of the window is already aligned (no new frame)')
            pairs = [pairs[e] for e in keep]
            arr = {k: a[keep] for k, a in arr.items()}
        poses, depths, focals, pw = tree_init(cfg, n, pairs, arr, static, pp, ff, known_world, known_pose,
                                                known_depth, known_focal)
        if not warm:  # gauge: mean pair log-scale = log(base_scale)
            k = cfg.base_scale / math.exp(np.mean([math.log(s) for s, _, _ in pw]))
            poses[:, :3, 3] *= k
            depths = depths * k
            pw = [(s * k, R, t * k) for s, R, t in pw]
        iters = iterations if iterations is not None else (cfg.warm_iterations if warm else cfg.iterations)
        if cfg.warm_optimizer not in ('closed_form', 'adam'):
            raise InputError(f"warm_optimizer must be 'closed_form' or 'adam', got {cfg.warm_optimizer!r}")
        threads = torch.get_num_threads()
        if cfg.cpu_threads and cfg.device == 'cpu':
            torch.set_num_threads(cfg.cpu_threads)
        try:
            if warm and cfg.warm_optimizer == 'closed_form':
                st0 = AlignmentState(poses=poses, depths=depths, focals=focals, pp=pp,
                                     pair_scales=np.array([sc for sc, _, _ in pw]), frame_ids=list(frame_ids), loss=float('nan'))
                # held frames keep their pose; in 'refine' their depth is refined with its mean log-depth
                # kept (the scale gauge: a free scale would let the objective shrink the world)
                refine = cfg.warm_mode == 'refine'
                # one held frame fixes only the frame: the scale gauge is then DUSt3R's (mean pair
                # log-scale, so the window minimises the same objective as the plain schedule); more
                # held frames fix the scale with their poses, and their depths keep their mean log
                one = refine and len(frozen) == 1
                refine_focal = one if cfg.warm_focal is None else cfg.warm_focal
                state = refine_closed_form(st0, pairs, arr, None if masks is None else np.asarray(masks), frozen=frozen,
                                           sweeps=iters, pair_sims=pw, frozen_depth=[] if refine else None,
                                           scale_anchor=frozen if refine and not one else (), pair_scale_gauge=one,
                                           device=cfg.device,
                                           flows=flows, flow_weight=cfg.flow_weight_closed_form,
                                           flow_max_px=cfg.flow_max_px, flow_guard=cfg.flow_guard,
                                           joint_sweeps=cfg.warm_joint_sweeps,
                                           focal='hold' if ff is not None or (cfg.shared_focal and not refine_focal)
                                           else 'shared' if cfg.shared_focal else 'per_frame')
                state.iterations = iters
                scales = np.full(len(all_pairs), np.nan)
                scales[keep] = state.pair_scales
                state.pair_scales = scales
                return state
            # warm start: a shared focal was fitted on the earlier windows and the frozen frames' world
            # points depend on it, so it is held (freeing it let it drift ~0.3 % per step); per-frame
            # focals of the frames that are not frozen are refined
            hold_focal = ff is not None or (warm and cfg.shared_focal)
            state = adam_schedule(cfg, pairs, arr, static, flows, pp, poses, depths, focals, pw, hold_focal,
                                  frozen=frozen, iters=iters, frame_ids=frame_ids, gauge=not warm,
                                   lr=cfg.warm_lr if warm else cfg.lr)
        finally:
            torch.set_num_threads(threads)
        scales = np.full(len(all_pairs), np.nan)  # NaN: pair not optimised (both frames frozen)
        scales[keep] = state.pair_scales
        state.pair_scales = scales
        return state
