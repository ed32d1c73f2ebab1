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
    without outlying points and with Horn's symmetric scale: :func:`~dynrecon_ros.geometry.robust_similarity`) from the root, focal from the pointmaps (intrinsics.estimate_focal), depth = z of the registered
    camera-frame pointmap. In a warm start the tree grows from the frozen frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import (fit_rigid_from_moments, fit_similarity, fit_similarity_torch, hat, intrinsics_matrix,
                                   pixel_grid, robust_similarity, transform_points, unproject)
from dynrecon_ros.intrinsics import default_principal_point, estimate_focal


@dataclass
class AlignConfig:
    iterations: int = 300          # from MST init (DUSt3R/MonST3R demo default)
    warm_iterations: int = 5       # when warm-started from the previous window (closed-form sweeps or Adam steps)
    warm_joint_sweeps: int = 2     # closed-form warm steps: the last sweeps are joint Gauss-Newton steps
    # on all unknowns, a refined focal included (see refine_closed_form; not with a flow term).
    # They bring each window much closer to the objective's optimum (bench/alignment.py, one held
    # frame: N=32 ATE 13.9 -> 3.9 mm). In the product path (published frames held, align_flow off,
    # 64x48 oracle pointmaps, 40 frames) that optimum is not always the better trajectory: ATE at
    # 0.2 % pointmap noise 10.1 -> 8.6 mm (no K), 5.7 -> 5.9 mm (K given); at 1 % noise 11.9 -> 17.0
    # and 12.8 -> 16.9 mm, as with 20 block sweeps instead (15.8 mm): the objective's optimum there
    # is pulled by mover pixels the new frame's carried-over mask misses (without movers, 1 %, K
    # given: 5.8 -> 6.4 mm only), which the robust placement plus 5 block sweeps leave mostly
    # unfitted. The product default (align_flow on) does not run them.
    warm_mode: str = 'refine'      # 'freeze': frames shared with the previous window keep pose and depth,
    # only pairs with a new frame are optimised (cheapest); 'refine': all frames start from the
    # previous estimate and are refined, only the oldest shared frame is frozen (fixes frame + scale)
    lr: float = 0.01
    warm_lr: float = 0.002         # Adam moves every parameter by ~lr per step at first: a warm start
    # near the optimum needs a smaller step or 30 iterations cannot settle again
    warm_optimizer: str = 'closed_form'  # warm steps: 'closed_form' (warm_iterations sweeps of
    # refine_closed_form: from a near-optimal warm start each block is solved exactly, no step size)
    # or 'adam' (warm_lr; Adam's normalised steps (~lr per parameter) jitter every converged
    # parameter, so 30 iterations end above the plain schedule's loss)
    lr_min: float = 1e-6
    schedule: str = 'cosine'       # 'cosine' | 'linear'
    shared_focal: bool = True
    warm_focal: bool | None = None  # closed-form warm steps refine the shared focal too (True),
    # hold it (False), or (None) refine it when one frame is held and hold it with several (per-frame
    # focals of the frames not held are always refined; a given focal is always held). With one
    # held frame (the pose gauge) every other unknown is free and the pairs' mean log-scale fixes
    # the scale, so the window's optimum does not depend on the earlier windows (bench/alignment.py
    # --steps 20, N=8 / 16: loss ratio to the plain schedule 1.00002 / 0.9987 refined, 1.017 / 1.007
    # held: each window's optimal focal moves, -0.73 % .. -0.10 % off the truth). Frames held with their
    # poses (the published ones, in the product path) condition it: there a refined focal ratchets,
    # each window's estimate fitted to the held frames' poses fitted under the previous one (product
    # path, 64x48 oracle pointmaps, no K, 40 frames: focal error +4.1 % at the end at 1 % pointmap
    # noise, ATE 29.6 mm; held after the first window: -0.14 % throughout, ATE 21.2 mm; at 0.2 %
    # noise +1.4 % vs -0.02 %; measured before the joint steps).
    base_scale: float = 0.5
    flow_weight: float = 0.01      # Adam path: weight of the smooth-L1 pixel flow term (MonST3R's)
    flow_weight_closed_form: float = 0.5  # closed-form warm steps: weight of one flow pair's pixel
    # (object-space distance to the flow's line of sight, see refine_closed_form) relative to one
    # pointmap pixel of confidence e in the data term. Measured (32x24, the new frame's pairs each
    # misled by ~1 deg, exact flow): its rotation error 1.03 -> 0.58 / 0.37 / 0.18 deg at weight
    # 0.5 / 1 / 2; un-gated random flow (+-10 px) costs +3 / +6 / +14 mm. Product path (64x48
    # oracle pointmaps, DIS flow, principal point assumed at the centre but 1.3 px off): ATE
    # 7.38 -> 7.23 mm at 1 % pointmap noise, 5.75 -> 6.05 mm at 0.2 % (there the pointmaps are as
    # exact as the flow and the principal-point error dominates; 6.40 mm at weight 1)
    flow_start: float = 0.1        # fraction of the iterations before the flow term is on
    flow_max_px: float = 50.0      # per-pixel errors above this are ignored
    flow_guard: float = 25.0       # flow loss above this switches the term off
    smooth_weight: float = 0.0    # MonST3R uses 0.01; with this loss normalisation it shortened a 10 fps
    # synthetic path by ~20 % (depth right, translations short; Sim(3) ATE hides it), so off by default
    smooth_trans_weight: float = 1.0
    device: str = 'cpu'
    cpu_threads: int | None = None  # torch intra-op threads while aligning on CPU (None: leave as is);
    # small problems run several times faster on 1 thread than on oversubscribed cores


@dataclass
class AlignmentState:
    """Result of one window: everything in one world frame and scale.

    poses (N, 4, 4) cam-to-world; depths (N, H, W); focals (N,); pp (2,); pair_scales (P,) (NaN for
    pairs skipped in a warm start because both frames were frozen);
    frame_ids: the ids of the N frames (for warm starts); loss: final objective value.
    """
    poses: np.ndarray
    depths: np.ndarray
    focals: np.ndarray
    pp: np.ndarray
    pair_scales: np.ndarray
    frame_ids: list
    loss: float
    iterations: int = 0
    history: list = field(default_factory=list)
    pair_sims: list | None = None  # [(s, R, t)] per pair after a closed-form refinement (else None)

    def world_points(self, n: int) -> np.ndarray:
        """(H, W, 3) world points of frame n."""
        return transform_points(self.poses[n], unproject(self.depths[n], intrinsics_matrix(self.focals[n], self.pp)))


def _quat_to_R(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternion (x, y, z, w), normalised here -> (..., 3, 3)."""
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1).reshape(q.shape[:-1] + (3, 3))


def _R_to_quat(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(R).as_quat()  # (x, y, z, w)


def _signed_log1p(x):
    return torch.sign(x) * torch.log1p(torch.abs(x))


def _signed_expm1(x):
    return torch.sign(x) * torch.expm1(torch.abs(x))


# ---------------------------------------------------------------------------------------------

def metric_scale_from_depth(est_depths, sensor_depths, masks=None, min_pixels: int = 50) -> float:
    """Robust metric scale: median over valid static pixels of sensor depth / estimated depth.

    est_depths, sensor_depths (N, H, W) (sensor 0 = no reading); masks (N, H, W) dynamic (excluded).
    """
    e = np.asarray(est_depths, np.float64)
    s = np.asarray(sensor_depths, np.float64)
    if e.shape != s.shape:
        raise InputError(f'depth topic size {s.shape} does not match the estimated depth {e.shape}')
    ok = (s > 0) & (e > 0) & np.isfinite(s) & np.isfinite(e)
    if masks is not None:
        ok &= ~(np.asarray(masks) > 0)
    if ok.sum() < min_pixels:
        raise InputError(f'metric scale: only {int(ok.sum())} valid depth pixels (need {min_pixels})')
    return float(np.median(s[ok] / e[ok]))


def scale_state(state: AlignmentState, scale: float) -> AlignmentState:
    """The same state with the world scaled by ``scale`` (e.g. a metric_scale parameter)."""
    poses = state.poses.copy()
    poses[:, :3, 3] *= scale
    return replace(state, poses=poses, depths=state.depths * scale, pair_scales=state.pair_scales * scale)


def transform_state(state: AlignmentState, T: np.ndarray, scale: float = 1.0) -> AlignmentState:
    """The same state in another world: x' = T (scale x) for a rigid (4, 4) ``T`` (world gauge)."""
    s = scale_state(state, scale)
    poses = np.einsum('ij,njk->nik', np.asarray(T, np.float64), s.poses)
    return replace(s, poses=poses)


class PointmapAligner:
    """DUSt3R global alignment with MonST3R's terms, warm-startable across windows."""

    def __init__(self, cfg: AlignConfig | None = None):
        self.cfg = cfg or AlignConfig()

    # -- input checks ------------------------------------------------------------------------
    @staticmethod
    def _check(pairs, out):
        """The pair outputs as host arrays, without a copy where they are float32 or float64 numpy
        arrays already (other dtypes: float32; torch tensors: copied to the host, and kept as they
        are under the name + '_t', which the tensor builders use). Optional, passed through:
        'logw_1', 'logw_2' (P, H, W) precomputed log-confidence weights log(max(conf, 1)), and the
        device tensors 'pts3d_1_t', 'pts3d_2_in_1_t' (P, H, W, 3), 'logw_1_t', 'logw_2_t' (P, H, W)
        (see :func:`_slot_tensors`)."""
        for k in ('pts3d_1', 'conf_1', 'pts3d_2_in_1', 'conf_2'):
            if k not in out:
                raise InputError(f'pair outputs lack {k!r}')
        P = len(pairs)
        arr = {}
        for k in ('pts3d_1', 'conf_1', 'pts3d_2_in_1', 'conf_2', 'logw_1', 'logw_2'):
            if k not in out:
                continue
            v = out[k]
            if hasattr(v, 'detach'):
                arr.setdefault(k + '_t', v.detach())
                v = v.detach().cpu().numpy()
            v = np.asarray(v)
            arr[k] = v if v.dtype in (np.float32, np.float64) else v.astype(np.float32)
        for k in ('pts3d_1_t', 'pts3d_2_in_1_t', 'logw_1_t', 'logw_2_t'):
            if k in out:
                arr[k] = out[k]
        if arr['pts3d_1'].ndim != 4 or arr['pts3d_1'].shape[0] != P or arr['pts3d_1'].shape[-1] != 3:
            raise InputError(f'pts3d_1 must be (P={P}, H, W, 3), got {arr["pts3d_1"].shape}')
        for k, v in arr.items():
            want = arr['pts3d_1'].shape[:3] + ((3,) if k.startswith('pts3d') else ())
            if tuple(v.shape) != want:
                raise InputError(f'{k} must be {want}, got {tuple(v.shape)}')
        return arr

    # -- initialisation ----------------------------------------------------------------------
    def _init_tree(self, n, pairs, arr, static, pp, fixed_focal, known_world, known_pose, known_depth,
                   known_focal):
        """Spanning-tree init. known_*: dicts frame -> world points / pose / depth / focal (frozen frames)."""
        P = len(pairs)
        score = np.array([arr['conf_1'][e].mean() * arr['conf_2'][e].mean() for e in range(P)])
        world = dict(known_world)
        order = np.argsort(-score)
        if not world:  # root: the best pair in pair i's frame
            e0 = int(order[0])
            i, j = pairs[e0]
            world[i] = arr['pts3d_1'][e0]
            world[j] = arr['pts3d_2_in_1'][e0]
        # Prim-like growth over edges by confidence (maximum spanning tree from the known set)
        while len(world) < n:
            grown = False
            for e in order:
                i, j = pairs[e]
                if (i in world) == (j in world):
                    continue
                if i in world:
                    src, dst, c = arr['pts3d_1'][e], world[i], arr['conf_1'][e] ** static[i]
                    s, R, t = robust_similarity(src.reshape(-1, 3), dst.reshape(-1, 3), np.log(c).reshape(-1).clip(0))
                    world[j] = s * arr['pts3d_2_in_1'][e] @ R.T + t
                else:
                    src, dst, c = arr['pts3d_2_in_1'][e], world[j], arr['conf_2'][e] ** static[j]
                    s, R, t = robust_similarity(src.reshape(-1, 3), dst.reshape(-1, 3), np.log(c).reshape(-1).clip(0))
                    world[i] = s * arr['pts3d_1'][e] @ R.T + t
                grown = True
                break
            if not grown:
                missing = sorted(set(range(n)) - set(world))
                raise InputError(f'pair graph does not connect frames {missing} to the rest of the window')
        # per frame: its best own-frame pointmap (view 1 of some pair), focal and pose
        best_e = {}
        for e, (i, j) in enumerate(pairs):
            if i not in best_e or arr['conf_1'][e].mean() > arr['conf_1'][best_e[i]].mean():
                best_e[i] = e
        focals, poses, depths = np.zeros(n), np.zeros((n, 4, 4)), [None] * n
        for f in range(n):
            if f in known_pose:
                poses[f], focals[f], depths[f] = known_pose[f], known_focal[f], known_depth[f]
            elif f not in best_e:
                raise InputError(f'frame {f} is never view 1 of a pair (use symmetric pairs)')
            else:
                e = best_e[f]
                focals[f] = fixed_focal[f] if fixed_focal is not None else estimate_focal(
                    arr['pts3d_1'][e], arr['conf_1'][e], pp)
        if fixed_focal is None and self.cfg.shared_focal:
            free = [f for f in range(n) if f not in known_focal]
            focals[free] = np.median(focals[free]) if not known_focal else np.median(list(known_focal.values()))
        for f in range(n):
            if f in known_pose:
                continue
            e = best_e[f]
            c = arr['conf_1'][e]
            # register the pointmap as the model sees it (its z unprojected with the model's focal and
            # pp), so depth and pose are consistent with the unknowns even where the network's rays differ
            cam = unproject(np.clip(arr['pts3d_1'][e][..., 2], 1e-6, None), intrinsics_matrix(focals[f], pp))
            s, R, t = robust_similarity(cam.reshape(-1, 3), world[f].reshape(-1, 3),
                                        np.log(c).reshape(-1).clip(0) * static[f].reshape(-1))
            poses[f] = np.eye(4)
            poses[f, :3, :3], poses[f, :3, 3] = R, t
            depths[f] = np.clip(s * cam[..., 2], 1e-4, None)
        depths = np.stack(depths)
        return poses, depths, focals, self._pair_similarities(pairs, arr, static, poses, depths, focals, pp)

    def _pair_similarities(self, pairs, arr, static, poses, depths, focals, pp, chunk: int = 8):
        """[(s, R (3, 3), t (3,))] per pair: the weighted Umeyama fit of the pair's two pointmaps to its
        frames' world points (weights log-confidence x static), batched in torch on the aligner's device,
        ``chunk`` pairs at a time (float64 on CPU). poses (N, 4, 4), depths (N, H, W), focals (N,)."""
        dev = torch.device(self.cfg.device)
        dt = torch.float64 if dev.type == 'cpu' else torch.float32
        T = lambda x: torch.as_tensor(np.asarray(x), dtype=dt, device=dev)  # noqa: E731
        n, H, W = depths.shape
        cam = T(unproject(depths, np.stack([intrinsics_matrix(f, pp) for f in focals]))).reshape(n, -1, 3)
        world = _rotate(T(poses[:, :3, :3]), cam) + T(poses[:, :3, 3])[:, None]  # (N, HW, 3)
        st = T(static).reshape(n, -1)
        ii = torch.tensor([p[0] for p in pairs], device=dev)
        jj = torch.tensor([p[1] for p in pairs], device=dev)
        out = []
        for e0 in range(0, len(pairs), chunk):
            X, L = _slot_tensors({k: a[e0:e0 + chunk] for k, a in arr.items()}, dev, dt)  # (2p, HW, 3), (2p, HW)
            p = X.shape[0] // 2
            ij = torch.stack([ii[e0:e0 + p], jj[e0:e0 + p]], 1).reshape(-1)  # each slot's frame
            sc, R, t = fit_similarity_torch(X.view(p, -1, 3), world[ij].view(p, -1, 3), (L * st[ij]).view(p, -1))[:3]
            out += [(float(sc[k]), R[k].cpu().double().numpy(), t[k].cpu().double().numpy()) for k in range(p)]
        return out

    # -- main entry ---------------------------------------------------------------------------
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
        arr = self._check(pairs, pair_outputs)
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
        poses, depths, focals, pw = self._init_tree(n, pairs, arr, static, pp, ff, known_world, known_pose,
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
            state = self._optimise(pairs, arr, static, flows, pp, poses, depths, focals, pw, hold_focal,
                                   frozen=frozen, iters=iters, frame_ids=frame_ids, gauge=not warm,
                                   lr=cfg.warm_lr if warm else cfg.lr)
        finally:
            torch.set_num_threads(threads)
        scales = np.full(len(all_pairs), np.nan)  # NaN: pair not optimised (both frames frozen)
        scales[keep] = state.pair_scales
        state.pair_scales = scales
        return state

    def _optimise(self, pairs, arr, static, flows, pp, poses, depths, focals, pw, focal_fixed, frozen, iters,
                  frame_ids, gauge, lr):
        cfg = self.cfg
        dev = torch.device(cfg.device)
        T = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32, device=dev)  # noqa: E731
        n, H, W = depths.shape
        P = len(pairs)
        ii = torch.tensor([p[0] for p in pairs], device=dev)
        jj = torch.tensor([p[1] for p in pairs], device=dev)
        X, L = _slot_tensors(arr, dev, torch.float32)
        X1, X2 = X.view(P, 2, H, W, 3).unbind(1)
        st = T(static)
        w1 = L.view(P, 2, H, W)[:, 0] * st[ii]
        w2 = L.view(P, 2, H, W)[:, 1] * st[jj]
        u, v = T(pixel_grid(H, W)).unbind(-1)
        ppt = T(pp)
        ray = torch.stack([u - ppt[0], v - ppt[1]], -1)  # (H, W, 2)

        free = torch.ones(n, dtype=torch.bool, device=dev)
        free[frozen] = False
        logd = T(np.log(depths)).requires_grad_()
        quat = T(np.stack([_R_to_quat(p[:3, :3]) for p in poses])).requires_grad_()
        trans = _signed_log1p(T(poses[:, :3, 3])).requires_grad_()
        fixed_logd, fixed_quat, fixed_trans = logd.detach().clone(), quat.detach().clone(), trans.detach().clone()
        shared = cfg.shared_focal and not focal_fixed
        logf = T(np.log(focals[:1] if shared else focals)).requires_grad_(not focal_fixed)
        fixed_logf = logf.detach().clone()
        pq = T(np.stack([_R_to_quat(R) for _, R, _ in pw])).requires_grad_()
        pt = T(np.stack([t for _, _, t in pw])).requires_grad_()
        pls = T(np.log([s for s, _, _ in pw])).requires_grad_()
        params = [logd, quat, trans, pq, pt, pls] + ([logf] if not focal_fixed else [])
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.9))
        fl = None
        if flows:
            fe = [(e, torch.as_tensor(np.asarray(flows[p]), dtype=torch.float32, device=dev))
                  for e, p in enumerate(pairs) if p in flows]
            if fe:
                fs = torch.stack([f for _, f in fe])
                # NaN (or inf) flow = no flow at that pixel (e.g. it failed the forward-backward
                # check): zero weight in the term and the guard; set to 0 here so no NaN reaches
                # the loss or a gradient (0 * NaN = NaN)
                fok = torch.isfinite(fs).all(-1)
                fl = (torch.tensor([e for e, _ in fe], device=dev), torch.where(fok[..., None], fs, 0.0), fok)
        free_f = free.float()[:, None, None]
        free_p = free.float()[:, None]
        flow_on = True
        history = []

        def compute(it_frac):
            d = torch.exp(free_f * logd + (1 - free_f) * fixed_logd)
            q = free_p * quat + (1 - free_p) * fixed_quat
            tr = _signed_expm1(free_p * trans + (1 - free_p) * fixed_trans)
            R = _quat_to_R(q)
            f = torch.exp(logf).expand(n) if logf.numel() == 1 else torch.exp(free.float() * logf
                                                                              + (1 - free.float()) * fixed_logf)
            cam = torch.cat([ray / f[:, None, None, None] * d[..., None], d[..., None]], -1)  # (n,H,W,3)
            world = torch.einsum('nij,nhwj->nhwi', R, cam) + tr[:, None, None, :]
            s = torch.exp(pls - pls.mean() + math.log(cfg.base_scale)) if gauge else torch.exp(pls)
            Rp = _quat_to_R(pq)
            a1 = s[:, None, None, None] * (torch.einsum('pij,phwj->phwi', Rp, X1) + pt[:, None, None, :])
            a2 = s[:, None, None, None] * (torch.einsum('pij,phwj->phwi', Rp, X2) + pt[:, None, None, :])
            loss = ((world[ii] - a1).norm(dim=-1) * w1).sum() / (P * H * W) \
                + ((world[jj] - a2).norm(dim=-1) * w2).sum() / (P * H * W)
            total = loss
            if cfg.smooth_weight > 0 and n > 1:
                dR = R[:-1].transpose(-1, -2) @ R[1:]
                dt = torch.einsum('nji,nj->ni', R[:-1], tr[1:] - tr[:-1])
                eye = torch.eye(3, device=dev)
                sm = ((dR - eye).flatten(1).norm(dim=-1) + cfg.smooth_trans_weight * dt.norm(dim=-1)).sum()
                total = total + cfg.smooth_weight * sm
            if fl is not None and flow_on and it_frac >= cfg.flow_start and cfg.flow_weight > 0:
                e_idx, flow, fok = fl
                i_, j_ = ii[e_idx], jj[e_idx]
                Rj, tj = R[j_], tr[j_]
                pc = torch.einsum('pji,phwj->phwi', Rj, world[i_] - tj[:, None, None, :])
                z = pc[..., 2].clamp(min=1e-4)
                proj = pc[..., :2] / z[..., None] * f[j_][:, None, None, None] + ppt
                ego = proj - torch.stack([u, v], -1)
                err = torch.nn.functional.smooth_l1_loss(ego, flow, reduction='none').sum(-1)
                keep = fok & (st[i_] > 0) & ((ego - flow).norm(dim=-1) < cfg.flow_max_px)
                fterm = (err * keep).sum() / keep.sum().clamp(min=1)
                total = total + cfg.flow_weight * fterm
                return total, loss, world, R, tr, f, s, fterm
            return total, loss, world, R, tr, f, s, None

        for it in range(iters):
            frac = it / max(iters, 1)
            if cfg.schedule == 'cosine':
                lr_now = cfg.lr_min + (lr - cfg.lr_min) * (1 + math.cos(math.pi * frac)) / 2
            else:
                lr_now = cfg.lr_min + (lr - cfg.lr_min) * (1 - frac)
            for g in opt.param_groups:
                g['lr'] = lr_now
            opt.zero_grad(set_to_none=True)
            total, loss, *_, fterm = compute(frac)
            if fterm is not None and float(fterm.detach()) > cfg.flow_guard:
                flow_on = False  # MonST3R's guard: flow disagrees wholesale (bad flow), drop the term
            total.backward()
            opt.step()
            history.append(float(loss.detach()))
        with torch.no_grad():
            total, loss, world, R, tr, f, s, _ = compute(1.0)
            d = torch.exp(free_f * logd + (1 - free_f) * fixed_logd)
        poses_out = np.tile(np.eye(4), (n, 1, 1))
        poses_out[:, :3, :3] = R.cpu().double().numpy()
        poses_out[:, :3, 3] = tr.cpu().double().numpy()
        return AlignmentState(poses=poses_out, depths=d.cpu().double().numpy(), focals=f.detach().cpu().double().numpy(),
                              pp=np.asarray(pp, np.float64), pair_scales=s.detach().cpu().double().numpy(),
                              frame_ids=list(frame_ids), loss=float(loss), iterations=iters, history=history)


def pairs_from_ground_truth(depths, poses, K, pairs, mover_ids=None, mover_centers=None, scale_range=(0.5, 2.0),
                            noise: float = 0.002, seed: int = 0, conf_range=(2.0, 6.0),
                            mover_conf: float | None = None) -> dict:
    """Pairwise pointmaps as a network would give them, from ground truth (tests and benches).

    depths (N, H, W) metres; poses (N, 4, 4) cam-to-world; K (3, 3); pairs [(i, j)].
    Pair e = (i, j): X_i = frame i's points in camera i; X_j = frame j's points also in camera i;
    both multiplied by a random per-pair scale, with relative Gaussian noise ``noise``.
    mover_ids (N, H, W) int (-1 = static, m = mover m) and mover_centers (N, M, 2) world xy (z up):
    a network that assumes a static scene explains view j's moving object where it is at time i,
    so those points are shifted by c_m(i) - c_m(j): inconsistent across pairs, like real output.
    mover_conf: confidence given to mover pixels (default: drawn like the rest).
    Returns dict pts3d_1, pts3d_2_in_1 (P, H, W, 3), conf_1, conf_2 (P, H, W) (float32).
    """
    rng = np.random.default_rng(seed)
    depths = np.asarray(depths, np.float64)
    n, h, w = depths.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    cams = np.stack([(u - K[0, 2]) * depths / K[0, 0], (v - K[1, 2]) * depths / K[1, 1], depths], -1)
    worlds = np.einsum('nij,nhwj->nhwi', poses[:, :3, :3], cams) + poses[:, None, None, :3, 3]
    out = {k: [] for k in ('pts3d_1', 'pts3d_2_in_1', 'conf_1', 'conf_2')}
    for i, j in pairs:
        wj = worlds[j].copy()
        if mover_ids is not None:
            for m in range(mover_centers.shape[1]):
                sel = mover_ids[j] == m
                wj[sel, :2] += mover_centers[i, m] - mover_centers[j, m]
        inv = np.linalg.inv(poses[i])
        xj = wj @ inv[:3, :3].T + inv[:3, 3]
        sc = np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1])))
        out['pts3d_1'].append(sc * cams[i] * (1 + noise * rng.standard_normal(cams[i].shape)))
        out['pts3d_2_in_1'].append(sc * xj * (1 + noise * rng.standard_normal(xj.shape)))
        c1, c2 = rng.uniform(*conf_range, (h, w)), rng.uniform(*conf_range, (h, w))
        if mover_conf is not None and mover_ids is not None:
            c1[mover_ids[i] >= 0], c2[mover_ids[j] >= 0] = mover_conf, mover_conf
        out['conf_1'].append(c1)
        out['conf_2'].append(c2)
    return {k: np.stack(a).astype(np.float32) for k, a in out.items()}


def mover_ids_from_sequence(seq) -> np.ndarray:
    """(N, H, W) int mover index per dynamic pixel of a SyntheticSequence (-1 = static): the
    mover whose axis is nearest (in xy) to the pixel's world point."""
    n, h, w = seq.masks.shape
    ids = np.full((n, h, w), -1, np.int64)
    for f in range(n):
        pts = seq.world_points(f, seq.masks[f])
        d = np.linalg.norm(pts[:, None, :2] - seq.mover_centers[f][None], axis=-1)
        ids[f][seq.masks[f]] = d.argmin(1)
    return ids


def window_pairs(n: int, neighbours: int = 3) -> list[tuple[int, int]]:
    """Each frame paired with its next ``neighbours`` frames, both directions (n=8, 3 -> 36 pairs)."""
    return [p for i in range(n) for j in range(i + 1, min(n, i + neighbours + 1)) for p in ((i, j), (j, i))]


def window_loss(state: AlignmentState, pairs, pair_outputs, masks=None) -> float:
    """The data term of the objective for a state, comparable across runs: each pair's similarity
    is refitted by weighted Procrustes to the state's world points, and the loss is expressed in
    DUSt3R's gauge (mean pair scale 0.5), so states in different world scales compare fairly."""
    arr = PointmapAligner._check([tuple(p) for p in pairs], pair_outputs)
    P, H, W = arr['conf_1'].shape
    n = len(state.poses)
    static = np.ones((n, H, W)) if masks is None else (~(np.asarray(masks) > 0)).astype(np.float64)
    world = [state.world_points(k).reshape(-1, 3) for k in range(n)]
    total, logs = 0.0, []
    for e, (i, j) in enumerate(pairs):
        src = np.concatenate([arr['pts3d_1'][e].reshape(-1, 3), arr['pts3d_2_in_1'][e].reshape(-1, 3)])
        dst = np.concatenate([world[i], world[j]])
        wgt = np.concatenate([(np.log(arr['conf_1'][e]).clip(0) * static[i]).reshape(-1),
                              (np.log(arr['conf_2'][e]).clip(0) * static[j]).reshape(-1)])
        s, R, t = fit_similarity(src, dst, wgt)
        total += (wgt * np.linalg.norm(s * src @ R.T + t - dst, axis=1)).sum()
        logs.append(math.log(s))
    return float(total / (P * H * W) * 0.5 / math.exp(np.mean(logs)))


# batched 3x3 products as bmm: several times faster than the equivalent torch.einsum on CPU
def _rotate(R, X):
    """(B, M, 3): R (B, 3, 3) applied to the points X (B, M, 3)."""
    return torch.bmm(X, R.transpose(1, 2))


def _rotate_inv(R, X):
    """(B, M, 3): R^T applied to X."""
    return torch.bmm(X, R)


def _dot(X, Y):
    """(...,): X . Y over the last axis (as einsum: (X * Y).sum(-1) is ~4x slower on CPU)."""
    return torch.einsum('...i,...i->...', X, Y)


def _wsum(w, X):
    """(B, 3): sum_m w (B, M) X (B, M, 3)."""
    return torch.bmm(w[:, None], X)[:, 0]


def _slot_tensors(arr, device, dtype):
    """(X (2P, H*W, 3), logw (2P, H*W)) of checked pair outputs ``arr`` (:meth:`PointmapAligner._check`)
    on ``device`` in ``dtype``, pair-major: slot 2p is view 1 of pair p, slot 2p + 1 its view 2 (so
    ``X.view(P, 2 * H * W, 3)`` holds each pair's two pointmaps, no copy); logw =
    log(max(conf, 1)), DUSt3R's 'log' confidence transform (0 for conf <= 1).

    Each is made by one copy: from the device tensors '*_t' when given (a copy on the device when
    they are on it already: no host->device transfer), else from the host arrays, converting while
    copying; the weights from the precomputed 'logw_*' when given, else from the confidences."""
    dev = torch.device(device)
    P, H, W = arr['conf_1'].shape
    X = torch.empty(P, 2, H * W, 3, dtype=dtype, device=dev)
    L = torch.empty(P, 2, H * W, dtype=dtype, device=dev)
    for v, (p, c) in enumerate((('pts3d_1', 'conf_1'), ('pts3d_2_in_1', 'conf_2'))):
        sl = (slice(None), v)
        pts = arr.get(p + '_t')
        X[sl] = (torch.from_numpy(np.ascontiguousarray(arr[p])) if pts is None else pts).reshape(P, -1, 3)
        lw = arr.get(f'logw_{v + 1}_t')
        if lw is None:
            lw = arr.get(f'logw_{v + 1}')
            lw = np.log(np.maximum(arr[c], 1)) if lw is None else lw
            lw = torch.from_numpy(np.ascontiguousarray(lw))
        L[sl] = lw.reshape(P, -1)
    return X.view(2 * P, H * W, 3), L.view(2 * P, H * W)


class _ClosedFormProblem:
    """The objective of :func:`refine_closed_form` on a window: tensors and evaluation (see there)."""

    def __init__(self, state, pairs, pair_outputs, masks, device, flows, flow_weight, flow_max_px, flow_guard,
                 gate_state=None):
        arr = PointmapAligner._check([tuple(p) for p in pairs], pair_outputs)
        self.P, self.H, self.W = P, H, W = arr['conf_1'].shape
        self.n = n = len(state.poses)
        self.dev = dev = torch.device(device)
        self.dt = dt = torch.float64 if dev.type == 'cpu' else torch.float32
        T = self.T
        static = np.ones((n, H, W)) if masks is None else (~(np.asarray(masks) > 0)).astype(np.float64)
        ii = torch.tensor([p[0] for p in pairs], device=dev)
        jj = torch.tensor([p[1] for p in pairs], device=dev)
        self.fs = torch.stack([ii, jj], 1).reshape(-1)  # frame of each (pair, view) slot (pair-major)
        self.uv = T(pixel_grid(H, W)).reshape(-1, 2)
        self.pp = T(state.pp)
        self.uvc = self.uv - self.pp  # (HW, 2) pixel offsets from the principal point
        self.set_focals(T(state.focals))
        self.X, logw = _slot_tensors(arr, dev, dt)  # (2P, HW, 3), (2P, HW)
        self.st = T(static).reshape(n, -1)
        self.Wt = logw.mul_(self.st[self.fs])  # (2P, HW)
        self.flow = None
        keys = [k for k in sorted(flows or {}) if k[0] != k[1] and 0 <= k[0] < n and 0 <= k[1] < n]
        if keys and flow_weight > 0:
            for k in keys:
                if np.shape(flows[k]) != (H, W, 2):
                    raise InputError(f'flow {k} has shape {np.shape(flows[k])}, expected ({H}, {W}, 2)')
            fa = torch.tensor([k[0] for k in keys], device=dev)
            fb = torch.tensor([k[1] for k in keys], device=dev)
            q = self.uv + T(np.stack([np.asarray(flows[k], np.float64) for k in keys])).reshape(len(keys), -1, 2)
            finite = torch.isfinite(q).all(-1)  # NaN flow (e.g. failed forward-backward check): not used
            q = torch.where(finite[..., None], q, self.uv)
            self.qc = q - self.pp  # (F, HW, 2)
            rq = torch.cat([self.qc / self.focals[fb][:, None, None], torch.ones_like(q[..., :1])], -1)
            self.flow = (fa, fb, rq, (rq * rq).sum(-1), None)
            # the gate (fixed for the whole refinement, so the objective is one fixed sum): static
            # pixels of the source frame whose flow ends inside frame b, in front of camera b, with
            # the ego flow of the gate state within flow_max_px of it; a pair whose mean smooth-L1
            # error (px) exceeds flow_guard is dropped (MonST3R's guard: the flow disagrees wholesale)
            gs = state if gate_state is None else gate_state
            R, t = T(gs.poses[:, :3, :3]), T(gs.poses[:, :3, 3])
            chi = self.world(R, t, T(gs.depths).reshape(n, -1))[fa]
            Y = _rotate_inv(R[fb], chi - t[fb][:, None])
            z = Y[..., 2]
            proj = Y[..., :2] / z.clamp_min(1e-12)[..., None] * self.focals[fb][:, None, None] + self.pp
            err = proj - q
            inside = (q[..., 0] >= 0) & (q[..., 0] <= W - 1) & (q[..., 1] >= 0) & (q[..., 1] <= H - 1)
            keep = finite & (self.st[fa] > 0) & (z > 0) & inside & (err.norm(dim=-1) < flow_max_px)
            sl1 = torch.nn.functional.smooth_l1_loss(err, torch.zeros_like(err), reduction='none').sum(-1)
            mean_err = (sl1 * keep).sum(1) / keep.sum(1).clamp_min(1)
            keep &= (mean_err <= flow_guard)[:, None]
            self.flow = (fa, fb, rq, (rq * rq).sum(-1), flow_weight * keep.to(dt))

    def set_focals(self, focals):
        """Focals (n,) (px): the rays of every pixel and of every flow target."""
        n, HW = self.n, self.uvc.shape[0]
        self.focals = focals
        self.rays = torch.cat([self.uvc / focals[:, None, None],
                               torch.ones(n, HW, 1, dtype=self.dt, device=self.dev)], -1)  # (n, HW, 3)
        self.ray2 = (self.rays * self.rays).sum(-1)
        if getattr(self, 'flow', None) is not None:
            fa, fb, _, _, g = self.flow
            rq = torch.cat([self.qc / focals[fb][:, None, None], torch.ones_like(self.qc[..., :1])], -1)
            self.flow = (fa, fb, rq, (rq * rq).sum(-1), g)

    def T(self, x):
        return torch.as_tensor(np.asarray(x), dtype=self.dt, device=self.dev)

    def sim_tensors(self, pair_sims):
        """[(s, R, t)] (P) -> (s (P,), R (P, 3, 3), t (P, 3)) tensors."""
        return tuple(self.T(np.stack(x)) for x in zip(*pair_sims))

    def world(self, R, t, d):
        """(n, HW, 3) world points of depths d (n, HW) with poses R (n, 3, 3), t (n, 3)."""
        return _rotate(R, d[..., None] * self.rays) + t[:, None]

    def targets(self, sims, translate: bool = True):
        """(2P, HW, 3): each slot's pointmap mapped to the world by its pair's similarity (without its
        translation unless ``translate``)."""
        sc, Rp, tp = sims
        A = _rotate(Rp, self.X.view(self.P, -1, 3)).mul_(sc[:, None, None])
        if translate:
            A += tp[:, None]
        return A.view(2 * self.P, -1, 3)

    def flow_geometry(self, R, t, chi):
        """Per flow pair (a, b) and pixel p of a: X = chi_a(p) (F, HW, 3); c (F, HW, 3) its orthogonal
        projection onto camera b's line of sight through q = p + flow(p), in camera b; L = the same
        point in the world; dist = ||X - L||, the object-space reprojection error (F, HW)."""
        fa, fb, rq, rq2, _ = self.flow
        X = chi[fa]
        Y = _rotate_inv(R[fb], X - t[fb][:, None])
        c = rq * (_dot(Y, rq) / rq2)[..., None]
        L = _rotate(R[fb], c) + t[fb][:, None]
        return X, c, L, (X - L).norm(dim=-1)

    def objective(self, R, t, d, sims, parts: bool = False, targets=None):
        """(data term, weighted flow term), both divided by P * H * W (floats); with ``parts`` also
        the world points chi (n, HW, 3) and the data residuals' norms (2P, HW) (for reuse).
        targets: optional ``self.targets(sims)`` when already at hand."""
        chi = self.world(R, t, d)
        norm = self.P * self.H * self.W
        res = (chi[self.fs] - (self.targets(sims) if targets is None else targets)).norm(dim=-1)
        data = float((self.Wt * res).sum()) / norm
        flow = 0.0
        if self.flow is not None:
            flow = float((self.flow[4] * self.flow_geometry(R, t, chi)[3]).sum()) / norm
        return (data, flow, chi, res) if parts else (data, flow)


# refine_closed_form's extrapolation of the state along each sweep's step (0: off). Measured
# (bench/alignment.py, 64x48, 5 sweeps, focal refined): loss ratio online / plain at N=8
# 1.00049 -> 1.00022, N=16 0.99865 -> 0.99838, N=32 0.99119 -> 0.98648
EXTRAPOLATE = 1.0
EXTRAPOLATE_MAX = 4.0


def _rot_extrapolate(Rk, Rp, alpha):
    """(B, 3, 3): Rk moved on by alpha times the rotation from Rp to Rk."""
    from scipy.spatial.transform import Rotation
    dR = (Rk @ Rp.transpose(-1, -2)).cpu().double().numpy()
    Re = Rotation.from_rotvec(alpha * Rotation.from_matrix(dR).as_rotvec()).as_matrix()
    return torch.as_tensor(Re, dtype=Rk.dtype, device=Rk.device) @ Rk


def _extrapolate(prob, last, cur, alpha, targets=None):
    """Extrapolation of the whole state along the last sweep's step (poses, log-depths, log-focals,
    pair similarities with log-scales), kept only if it lowers the objective (so the descent stays
    monotone). Linear in log-depth, log-scale and log-focal, so the gauges (held poses, the mean
    log-depth of anchored frames, the pairs' mean log-scale) are kept. Returns ((R, t, d, sims), ok,
    (world points, data residual norms) of the returned state, which the next sweep reuses).
    targets: optional prob.targets(cur's sims)."""
    R0, t0, d0, s0, f0 = last
    R1, t1, d1, s1 = cur
    f1 = prob.focals
    Re = _rot_extrapolate(R1, R0, alpha)
    te = t1 + alpha * (t1 - t0)
    de = d1 * (d1 / d0) ** alpha
    fe = f1 * (f1 / f0) ** alpha
    se = (s1[0] * (s1[0] / s0[0]) ** alpha, _rot_extrapolate(s1[1], s0[1], alpha), s1[2] + alpha * (s1[2] - s0[2]))
    *ref, chi1, res1 = prob.objective(R1, t1, d1, s1, parts=True, targets=targets)
    prob.set_focals(fe)
    *ext, chie, rese = prob.objective(Re, te, de, se, parts=True)
    if sum(ext) < sum(ref):
        return (Re, te, de, se), True, (chie, rese)
    prob.set_focals(f1)
    return cur, False, (chi1, res1)


def _depth_step(prob, parts, k, d, free_d, anchor, uvc=None):
    """The depth block of :func:`refine_closed_form` at k = 1 / focal (n,): per pixel the minimiser
    of the IRLS majoriser den d^2 - 2 num d (+ const) with num = k b + a + fnum, den = W (1 + k^2
    |uvc|^2) + fden (``parts`` = (W, a, b, fnum, fden), each (n, HW): the data term's weights and
    moments and the flow term's, see there); pixels whose target is behind the camera and frames not
    ``free_d`` keep d, ``anchor`` frames keep their mean log-depth. uvc: prob.uvc in the parts'
    dtype (default prob.uvc). Returns (depths (n, HW), the majoriser's value per frame (n,), up to
    a constant)."""
    Wsum, a, b, fnum, fden = parts
    uvc = prob.uvc if uvc is None else uvc
    r2 = _dot(uvc, uvc)
    num = k[:, None] * b + a + fnum
    den = Wsum * (1 + k[:, None] ** 2 * r2) + fden
    dn = num / den.clamp_min(1e-30)
    upd = (den > 0) & (dn > 1e-6) & free_d[:, None]  # targets behind the camera (garbage): keep
    d_new = torch.where(upd, dn, d)
    if anchor.any():
        d_new[anchor] = _anchored_depth(dn[anchor], den[anchor], d[anchor], upd[anchor])
    return d_new, (den * d_new * d_new - 2 * num * d_new).sum(1)


def _focal_depth_block(prob, mode, free, parts, d, d_std, free_d, anchor, R, t, sims, iters: int = 2,
                       span: float = 0.05):
    """The joint focal + depth block of :func:`refine_closed_form`: the data term's majoriser is
    quadratic in the depths for every focal, so the depths are re-solved in closed form for each
    trial k = 1 / f and k found by ``iters`` Newton steps on log k (central differences, steps
    within +-``span``) of the majoriser's minimum over the depths, a step kept only where it
    lowers that minimum. mode 'shared' (one k) or 'per_frame' (the ``free`` frames' own k, searched side by side).
    The flow term's part of the majoriser is taken at the current focal (its lines of sight move
    with k), so with flow the result is checked on the objective and d_std (the depth step at the
    current focal) kept when it is not lower. Sets prob's focals; returns the depths (n, HW).
    The search runs in float64 whatever the problem's dtype: the central differences of a sum over
    every pixel are lost in float32 rounding (float32 on CUDA barely moved the focal).
    Hand-written: batched over the frames (scipy's minimize_scalar does one scalar at a time)."""
    dt = d.dtype
    parts = tuple(p.double() for p in parts)  # (no copies on CPU: float64 already)
    d, uvc = d.double(), prob.uvc.double()
    k0 = 1 / prob.focals.double()
    vary = free if mode == 'per_frame' else torch.ones_like(free)
    x0 = torch.log(k0[:1] if mode == 'shared' else k0)

    def ks(x):
        return torch.where(vary, torch.exp(x).expand(len(k0)), k0)

    def f(x):
        v = _depth_step(prob, parts, ks(x), d, free_d, anchor, uvc)[1]
        return v.sum()[None] if mode == 'shared' else v

    x, fx = x0, f(x0)
    h = 1e-3
    for _ in range(iters):  # Newton steps on log k, derivatives by central differences
        fm, fp = f(x - h), f(x + h)
        grad, curv = (fp - fm) / (2 * h), (fp - 2 * fx + fm) / h ** 2
        step = torch.where(curv > 0, -grad / curv.clamp_min(torch.finfo(curv.dtype).tiny),
                           -span * torch.sign(grad)).clamp(-span, span)
        fn = f(x + step)
        better = fn < fx  # (so the block never increases the majoriser)
        x, fx = torch.where(better, x + step, x), torch.where(better, fn, fx)
    k = ks(x)
    d_new = _depth_step(prob, parts, k, d, free_d, anchor, uvc)[0].to(dt)
    k = k.to(dt)
    if prob.flow is None:
        prob.set_focals(1 / k)
        return d_new
    f_old = prob.focals
    ref = sum(prob.objective(R, t, d_std, sims))
    prob.set_focals(1 / k)
    if sum(prob.objective(R, t, d_new, sims)) <= ref:
        return d_new
    prob.set_focals(f_old)
    return d_std


def _anchored_depth(dn, den, d_old, upd, newton: int = 8):
    """Per row (a frame), the depth minimising sum den (d - dn)^2 over the pixels ``upd`` (the
    others keep d_old) with the mean log-depth held at d_old's (the scale gauge). KKT:
    2 den (d - dn) d = lam, so d = (dn + sqrt(dn^2 + 2 lam / den)) / 2, lam by Newton's method
    from 0 (the unconstrained minimiser; the constraint moves it little); a row whose solution does
    not beat d_old keeps d_old (so the step never increases the objective). dn, den, d_old (B, M),
    upd (B, M) bool. Also used for the pair scales."""
    tiny = torch.finfo(dn.dtype).tiny  # (1e-300 is 0 in float32)
    den = torch.where(upd, den, torch.ones_like(den))
    dn = torch.where(upd, dn, d_old)
    C = torch.log(d_old).mean(1)
    lo = torch.where(upd, -den * dn * dn / 2, torch.full_like(dn, -float('inf'))).amax(1)  # sqrt >= 0 above

    def depth(lam):
        root = torch.sqrt((dn * dn + 2 * lam[:, None] / den).clamp_min(tiny))
        return torch.where(upd, (dn + root) / 2, d_old), root

    lam = torch.zeros_like(C)
    for _ in range(newton):
        d, root = depth(lam)
        h = torch.log(d).mean(1) - C
        dh = (upd / (den * root * d)).mean(1)  # d log d / d lam = 1 / (den root d)
        lam = torch.maximum(lam - h / dh.clamp_min(tiny), lo + 0.5 * (lam - lo))  # stay inside the domain
    d = depth(lam)[0]
    better = (den * (d - dn) ** 2 * upd).sum(1) <= (den * (d_old - dn) ** 2 * upd).sum(1)
    return torch.where(better[:, None], d, d_old)


def _vee(M):
    """(B, 3): sum a x b from M = sum a b^T (B, 3, 3)."""
    return torch.stack([M[:, 1, 2] - M[:, 2, 1], M[:, 2, 0] - M[:, 0, 2], M[:, 0, 1] - M[:, 1, 0]], 1)


def _slot_normal_equations(w, y, z, c, r):
    """Per slot, the Gauss-Newton normal equations (H (2P, 13, 13), g (2P, 13)) of sum_px w |r|^2,
    r = y - z + c, in the slot's 13 unknowns: its frame's pose (rotation increment, translation) and
    its pair's similarity (rotation increment, log-scale, translation), Jacobian
    [-[y]x, I, [z]x, -z, -I]; w (2P, HW), y, z, r (2P, HW, 3), c (2P, 3) (per slot: camera centre
    minus the similarity's translation). J^T J written out blockwise from weighted moments (forming
    J per pixel cost 20x more); J^T r too in float64, but from r in float32 (the moments of y and z
    cancel to the residual's size: 3-4 digits lost, the step 1.6 % off on a test window)."""
    B = w.shape[0]
    W0 = w.sum(1)
    wy, wz = y * w[..., None], z * w[..., None]
    Sy, Sz = wy.sum(1), wz.sum(1)
    Syy = torch.bmm(wy.transpose(1, 2), y)
    Szz = torch.bmm(wz.transpose(1, 2), z)
    Szy = torch.bmm(wz.transpose(1, 2), y)  # sum w z y^T
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(B, 3, 3)
    tr = lambda m: m.diagonal(dim1=1, dim2=2).sum(1)  # noqa: E731
    yxz = _vee(Szy.transpose(1, 2))  # sum w y x z
    Sy_x, Sz_x, W0I = hat(Sy), hat(Sz), W0[:, None, None] * eye
    H = w.new_zeros(B, 13, 13)
    H[:, 0:3, 0:3] = tr(Syy)[:, None, None] * eye - Syy
    H[:, 0:3, 3:6] = Sy_x
    H[:, 0:3, 6:9] = Szy - tr(Szy)[:, None, None] * eye
    H[:, 0:3, 9] = -yxz
    H[:, 0:3, 10:13] = -Sy_x
    H[:, 3:6, 3:6] = W0I
    H[:, 3:6, 6:9] = Sz_x
    H[:, 3:6, 9] = -Sz
    H[:, 3:6, 10:13] = -W0I
    H[:, 6:9, 6:9] = tr(Szz)[:, None, None] * eye - Szz
    H[:, 6:9, 10:13] = Sz_x
    H[:, 9, 9] = tr(Szz)
    H[:, 9, 10:13] = Sz
    H[:, 10:13, 10:13] = W0I
    H = torch.triu(H) + torch.triu(H, 1).transpose(1, 2)
    if w.dtype == torch.float64:
        Sr = Sy - Sz + W0[:, None] * c  # sum w r
        g = torch.cat([torch.linalg.cross(Sy, c) - yxz,  # sum w y x r
                       Sr,
                       yxz - torch.linalg.cross(Sz, c),  # -sum w z x r
                       (tr(Szz) - tr(Szy) - _dot(Sz, c))[:, None],  # -sum w z . r
                       -Sr], 1)
    else:
        Sr = _wsum(w, r)
        g = torch.cat([_wsum(w, torch.linalg.cross(y, r)), Sr, -_wsum(w, torch.linalg.cross(z, r)),
                       -torch.einsum('bm,bm->b', w, _dot(z, r))[:, None], -Sr], 1)
    return H, g


def _joint_step(prob, R, t, d, sims, free, free_d, anchor, pair_gauge, fcol=None):
    """One Gauss-Newton step on all unknowns of :func:`refine_closed_form` at once (:func:`_joint_delta`),
    kept only if the objective falls (else the half step is tried; prob's focals are those of the
    returned state). Returns ((R, t, d, sims), accepted)."""
    out = _joint_delta(prob, R, t, d, sims, free, free_d, anchor, pair_gauge, fcol)
    if out is None:
        return (R, t, d, sims), False
    dpose, dsim, dd, dk, ref = out
    sc, Rp, tp = sims
    f_old = prob.focals
    for step in (1.0, 0.5):
        if dk is not None:  # log k increments, k = 1 / f
            prob.set_focals(torch.where(fcol >= 0, f_old * torch.exp(-step * dk[fcol.clamp_min(0)]), f_old))
        Rn, tn, dn = R.clone(), t.clone(), d.clone()
        if len(dpose):
            Rn[free] = torch.linalg.matrix_exp(hat(step * dpose[:, :3])) @ R[free]
            tn[free] = t[free] + step * dpose[:, 3:]
        for f, x in dd.items():
            dn[f] = torch.maximum(d[f] + step * x, 0.5 * d[f])  # (a pixel pushed behind the camera: half way)
            if anchor[f]:  # the gauge held exactly (the step holds it to first order)
                dn[f] = dn[f] * torch.exp(torch.log(d[f]).mean() - torch.log(dn[f]).mean())
        ds = step * dsim
        sn = (sc * torch.exp(ds[:, 3]), torch.linalg.matrix_exp(hat(ds[:, :3])) @ Rp, tp + ds[:, 4:])
        if sum(prob.objective(Rn, tn, dn, sn)) < ref:
            return (Rn, tn, dn, sn), True
    prob.set_focals(f_old)
    return (R, t, d, sims), False


def _joint_delta(prob, R, t, d, sims, free, free_d, anchor, pair_gauge, fcol=None, eps: float = 1e-6):
    """The Gauss-Newton step on all unknowns of :func:`refine_closed_form` at once (the data term, no
    flow term). The sweeps' blocks each solve their block exactly, but poses, depths, pair
    similarities and focals are coupled, so block-coordinate descent zig-zags slowly near the
    optimum; this step moves them together.

    Unknowns: per free frame a rotation increment w (R <- exp([w]x) R) and a translation increment;
    per pair a rotation increment, a log-scale increment and a translation increment of its
    similarity; per pixel of a ``free_d`` frame its depth increment; per focal unknown (``fcol`` (n,):
    each frame's focal unknown 0.. or -1 where its focal is held; None: all held) the increment of
    log k, k = 1 / f. The Jacobian J of r = chi - (s R_e X + t_e) per slot pixel: pose [-[y]x, I]
    (y = chi - t), similarity [[z]x, -z, -I] (z = s R_e X), depth a = R ray, log k
    q = d R (k (u - cx), k (v - cy), 0). On the IRLS quadratic (weights w = W / |r| at the current
    residuals r): its curvature along r overestimates that of |r| (none), so the steps converge at a
    linear rate, about halving the gap to the optimum each (dropping 70 % of that curvature cut the
    gap after 2 steps from 6e-5 to 1.2e-5 of the loss on bench/alignment.py's N=8 window, at +40 %
    step time; not kept).
    The depths (one per pixel: a diagonal block) are eliminated by the Schur complement frame by
    frame; the rest (6 per free frame + 7 per pair + the focals) is one dense Cholesky solve.
    Gauges as linear constraints (Lagrange multipliers): ``pair_gauge``: the pairs' log-scale
    increments sum to 0; each ``anchor`` frame: sum over its pixels of dd / d = 0 (its mean
    log-depth, to first order).
    Hand-written: a bundle-adjustment-like sparse solve on these tensors that no installed library does.
    Returns (pose increments (n_free, 6), similarity increments (P, 7), {frame: depth increments (HW,)},
    log k increments (n_k,) or None, the objective now), or None when the system is not positive
    definite. Per-pixel terms in the problem's dtype; the assembled system (Schur complement,
    damping, solves: a few hundred to a few thousand unknowns) in float64 whatever it is (float32 on
    CUDA), since its 1e-9 relative damping of the gauge directions is below float32's precision (on
    a 32x24 test window a float32 system reached the same objective values to 1e-7 too; not
    measured at 512x384)."""
    dt, sd, dev, n, P = prob.dt, torch.float64, prob.dev, prob.n, prob.P
    fs = prob.fs
    pe = torch.arange(2 * P, device=dev) // 2  # each slot's pair
    nfree = int(free.sum())
    pose_base = torch.full((n,), -1, dtype=torch.long, device=dev)
    pose_base[free] = 6 * torch.arange(nfree, device=dev)
    nk = 0 if fcol is None else int(fcol.max()) + 1
    kb = 6 * nfree + 7 * P  # the focals' columns
    G = kb + nk
    # each slot's 13 global columns (6 pose, 7 similarity); G is a dummy for held poses
    ar6, ar7 = torch.arange(6, device=dev), torch.arange(7, device=dev)
    pcols = torch.where(pose_base[fs][:, None] >= 0, pose_base[fs][:, None] + ar6, torch.full_like(ar6, G))
    cols = torch.cat([pcols, 6 * nfree + 7 * pe[:, None] + ar7], 1)  # (2P, 13)
    chi = prob.world(R, t, d)
    z = prob.targets(sims, translate=False)  # (2P, HW, 3)
    Wt = prob.Wt
    c = t[fs] - sims[2][pe]  # (2P, 3)
    y = (chi - t[:, None])[fs]  # (2P, HW, 3) the slot's world point relative to its camera centre
    r = (y - z).add_(c[:, None])
    rn = r.norm(dim=-1)
    w = Wt / rn.clamp_min(eps)  # (2P, HW) IRLS weights
    ref = float((Wt * rn).sum()) / (P * prob.H * prob.W)  # the objective now (no flow term here)
    a = _rotate(R, prob.rays)  # (n, HW, 3) d chi / d depth
    Hg = torch.zeros(G + 1, G + 1, dtype=sd, device=dev)
    gg = torch.zeros(G + 1, dtype=sd, device=dev)
    kept = []  # per frame with free depths: (frame, its columns, B (HW, c), 1 / h (HW,), g_d (HW,)), float64
    Hs, gs = _slot_normal_equations(w, y, z, c, r)
    Hg.index_put_((cols[:, :, None].expand(-1, 13, 13), cols[:, None, :].expand(-1, 13, 13)), Hs.to(sd),
                  accumulate=True)
    gg.index_put_((cols,), gs.to(sd), accumulate=True)
    if nk:  # the focals' rows: J = q = d R (k uvc, 0) (the slot's frame), against the slot's 13 columns
        fk = torch.where(fcol >= 0, kb + fcol, torch.full_like(fcol, G))  # each frame's focal column (G: held)
        kuv = prob.rays[..., :2]  # (n, HW, 2) k (u - cx, v - cy)
        q = (_rotate(R, torch.cat([kuv, torch.zeros_like(kuv[..., :1])], -1)) * d[..., None])[fs]  # (2P, HW, 3)
        wq = q * w[..., None]
        Wq, Qy, Qz = wq.sum(1), torch.bmm(wq.transpose(1, 2), y), torch.bmm(wq.transpose(1, 2), z)  # sum w q y^T ...
        c13 = torch.cat([-_vee(Qy), Wq, _vee(Qz), -Qz.diagonal(dim1=1, dim2=2).sum(1)[:, None], -Wq], 1).to(sd)
        hq = (wq * q).sum((1, 2)).to(sd)
        sk = fk[fs][:, None].expand(-1, 13)
        Hg.index_put_((sk, cols), c13, accumulate=True)
        Hg.index_put_((cols, sk), c13, accumulate=True)
        Hg.index_put_((fk[fs], fk[fs]), hq, accumulate=True)
        gg.index_put_((fk[fs],), torch.einsum('bm,bm->b', w, _dot(q, r)).to(sd), accumulate=True)
        k2 = _dot(kuv, kuv)  # (n, HW): a . q / d = k^2 |uvc|^2
    for f in free_d.nonzero()[:, 0].tolist():
        sl = (fs == f).nonzero()[:, 0]
        k = sl.numel()
        if k == 0:
            continue
        af = a[f]
        ws = w[sl].T  # (HW, k)
        zs = z[sl].transpose(0, 1)  # (HW, k, 3)
        # the depth's coupling B (HW, 6 + 7k): pose [y x a = 0, a sum w], per slot w [-(z x a), -z.a, -a],
        # written in place (pixel-major, so no copies to concatenate)
        wsum = ws.sum(1)
        B = torch.zeros(len(af), 6 + 7 * k + (nk > 0), dtype=dt, device=dev)
        B[:, 3:6] = af * wsum[:, None]
        per = B[:, 6:6 + 7 * k].view(-1, k, 7)
        torch.mul(torch.linalg.cross(af[:, None].expand_as(zs), zs), ws[..., None], out=per[..., :3])  # -(z x a) w
        torch.mul(_dot(zs, af[:, None]), ws, out=per[..., 3]).neg_()
        torch.mul(af[:, None], ws[..., None], out=per[..., 4:]).neg_()
        bc = [cols[sl[0], :6], cols[sl, 6:].reshape(-1)]
        if nk:  # the depth's coupling to its frame's focal
            B[:, -1] = wsum * d[f] * k2[f]
            bc.append(fk[f:f + 1])
        B = B.to(sd)  # (no copy on CPU)
        h = (wsum * (af * af).sum(-1)).to(sd)
        gd = torch.einsum('mk,kmi,mi->m', ws, r[sl], af).to(sd)
        bc = torch.cat(bc)
        hinv = torch.where(h > 0, 1 / h.clamp_min(torch.finfo(sd).tiny), torch.zeros_like(h))
        # no index repeats within a frame's columns except the held-pose dummy (discarded), so no
        # accumulating scatter is needed
        Hg[bc[:, None], bc[None]] -= B.T @ (B * hinv[:, None])
        kept.append((f, bc, B, hinv, gd))
    S = Hg[:G, :G]
    # right-hand sides: the gradient, then one column per gauge constraint (global part, depth part)
    Cg = [torch.zeros(G, dtype=sd, device=dev)]
    Cd = [{}]
    if pair_gauge:
        cg = torch.zeros(G, dtype=sd, device=dev)
        cg[6 * nfree + 7 * torch.arange(P, device=dev) + 3] = 1
        Cg.append(cg)
        Cd.append({})
    for f in (anchor & free_d).nonzero()[:, 0].tolist():
        Cg.append(torch.zeros(G, dtype=sd, device=dev))
        Cd.append({f: 1 / d[f].to(sd)})
    m = len(Cg)
    rg = torch.cat([torch.stack(Cg, 1), torch.zeros(1, m, dtype=sd, device=dev)])  # (G + 1, m), row G: dummy
    rg[:, 0] = gg
    rd = {}
    for f, bc, B, hinv, gd in kept:
        col = torch.stack([gd] + [cd.get(f, torch.zeros_like(gd)) for cd in Cd[1:]], 1)  # (HW, m)
        rd[f] = col
        red = B.T @ (hinv[:, None] * col)
        rg.index_put_((bc[:, None].expand(-1, m), torch.arange(m, device=dev)[None].expand(len(bc), -1)), -red,
                      accumulate=True)
    # a tiny Levenberg term keeps S positive definite when a pair or a frame is barely constrained
    S = S + (1e-9 * S.diagonal().abs().clamp_min(1e-12)).diag_embed()
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        return None
    Xg = torch.cholesky_solve(rg[:G], L)  # (G, m)
    Xd = {f: hinv[:, None] * (rd[f] - B @ (Xg[bc.clamp_max(G - 1)] * (bc < G)[:, None].to(sd)))
          for f, bc, B, hinv, _ in kept}
    # H^-1 g = column 0, H^-1 C = the rest; Lagrange: delta = -(y0 + Yc lam), C^T delta = 0
    if m > 1:
        Cmat = torch.stack(Cg[1:], 1)  # (G, m-1)
        A = Cmat.T @ Xg
        for j, cd in enumerate(Cd[1:]):
            for f, cf in cd.items():
                A[j] = A[j] + (cf[:, None] * Xd[f]).sum(0)
        lam = -torch.linalg.solve(A[:, 1:], A[:, :1])  # (m-1, 1)
        dg = -(Xg[:, :1] + Xg[:, 1:] @ lam)[:, 0]
        dd = {f: -(x[:, :1] + x[:, 1:] @ lam)[:, 0] for f, x in Xd.items()}
    else:
        dg = -Xg[:, 0]
        dd = {f: -x[:, 0] for f, x in Xd.items()}
    return (dg[:6 * nfree].reshape(nfree, 6).to(dt), dg[6 * nfree:kb].reshape(P, 7).to(dt),
            {f: x.to(dt) for f, x in dd.items()}, dg[kb:].to(dt) if nk else None, ref)


def closed_form_objective(state: AlignmentState, pairs, pair_outputs, pair_sims, masks=None, flows=None,
                          flow_weight: float = 1.0, flow_max_px: float = 50.0, flow_guard: float = 25.0,
                          gate_state: AlignmentState | None = None, device: str = 'cpu') -> tuple[float, float]:
    """The objective :func:`refine_closed_form` minimises, at ``state`` with pair similarities
    ``pair_sims`` [(s, R, t)] (P): (data term, flow_weight * flow term), both / (P * H * W).
    The flow term's pixel gate is taken at ``gate_state`` (default ``state``)."""
    prob = _ClosedFormProblem(state, pairs, pair_outputs, masks, device, flows, flow_weight, flow_max_px,
                              flow_guard, gate_state)
    T = prob.T
    sims = prob.sim_tensors(pair_sims)
    return prob.objective(T(state.poses[:, :3, :3]), T(state.poses[:, :3, 3]), T(state.depths).reshape(prob.n, -1),
                          sims)


def refine_closed_form(state: AlignmentState, pairs, pair_outputs, masks=None, frozen=(), sweeps: int = 5,
                       pair_sims=None, frozen_depth=None, scale_anchor=(), device: str = 'cpu', flows=None,
                       flow_weight: float = 1.0, flow_max_px: float = 50.0, flow_guard: float = 25.0,
                       focal: str = 'hold', pair_scale_gauge: bool = False, history: bool = False,
                       trace: list | None = None, joint_sweeps: int = 2) -> AlignmentState:
    """Block-coordinate descent on the DUSt3R data term plus MonST3R's flow term, each block solved
    in closed form (torch).

    Hand-written (no library does it). Objective (divided by P * H * W):
        sum_slots w ||chi - s (R X + t)||  +  flow_weight * sum_(a,b) sum_p g ||X_a(p) - L_b(q)||
    the data term as DUSt3R's, and the flow term in object space (Lu, Hager & Mjolsness' orthogonal
    iteration): for a flow pair (a, b) and pixel p of frame a with q = p + flow(p), the distance of
    its world point X_a(p) to frame b's line of sight through q (L_b(q): the closest point on that
    line), a 3-D distance in the data term's unit. g: 1 on the gated pixels (static in a, q inside
    frame b and in front of camera b, ego flow of the starting state within ``flow_max_px`` of the
    given flow; a pair whose mean smooth-L1 error exceeds ``flow_guard`` px is dropped), 0 else;
    the gate is fixed at the start so the objective is one fixed function.
    Both terms are sums of 2-norms, so every block is an iteratively re-weighted least-squares
    solution (a majorise-minimise step that never increases the objective):
      pair similarities: weighted Umeyama (the flow term does not involve them);
      frame poses: one rigid Umeyama per frame over its data correspondences (camera point ->
        mean target) and its flow correspondences: ||X - L|| <= ||X - m|| + ||L' - m|| with
        m = the midpoint of X and L (the end of a frozen frame when one is), L' = R_b c + t_b with c
        the current projection onto the line in camera b (LHM's step), so frame a pulls its camera
        point towards m and frame b its point c towards m; all frames at once (the split decouples them);
      depths: per pixel, 1-D weighted least squares along the ray for the data targets and for the
        distance to the flow lines (||e0 + d e1||, affine in d); for ``scale_anchor`` frames the
        minimiser under the constraint of a fixed mean log-depth (exact, by a 1-D search on the
        multiplier).
      focal (``focal`` 'shared': one for all frames; 'per_frame': each frame not ``frozen``; 'hold':
        none), jointly with the depths: a camera point is d (k (u - cx), k (v - cy), 1) with
        k = 1 / f, so for every k the depths' majoriser is minimised in closed form per pixel, and
        k is found by a 1-D search on that minimum (:func:`_focal_depth_block`; a focal step with
        the depths held barely moves, the depths re-adapting to the old focal each sweep);
      extrapolation (``EXTRAPOLATE`` > 0): after each sweep from the second, the whole state is
        moved on along the sweep's step (``EXTRAPOLATE`` times it, doubled after each success up
        to ``EXTRAPOLATE_MAX``, reset after a failure) and kept only if the objective is lower
        (:func:`_extrapolate`): the blocks' zig-zag along coupled directions (poses and depths)
        makes plain block-coordinate descent converge slowly;
      joint steps (``joint_sweeps``, only with no flow term): the last sweeps are each one
        Gauss-Newton step on all unknowns at once, the focal included, instead of the blocks
        (:func:`_joint_step`: the IRLS quadratic, depths eliminated by the Schur complement, gauges
        as constraints, kept only if the objective falls); the sweeps before them then hold the
        focal (their focal block cost ~40 % of a warm step and ended no lower). Measured
        (bench/alignment.py, 64x48): the window's ATE at N=32 13.9 -> 3.9 mm, loss ratio to the
        plain schedule 0.986 -> 0.968, step time +15 %; from a focal 2 % off (32x24 test window),
        8 block sweeps + 2 joint steps end at the objective's optimum focal (0.58 % below the
        truth), 10 block sweeps still 1.15 % above it. Off with a flow term (its quadratic has none;
        an earlier version of the step run with one raised the product path's oracle ATE
        5.9 -> 8.9 mm).
    The ``frozen`` frames' poses (local indices) are held. No autograd, no step size; used
    to refine a warm-started window. float64 on CPU, float32 on CUDA.
    pairs [(i, j)] (P); pair_outputs as :meth:`PointmapAligner.align`; masks (N, H, W) dynamic.
    pair_sims: optional initial [(s, R, t)] per pair (default: fitted in the first sweep).
    frozen_depth: frames whose depth is held (default: ``frozen``). scale_anchor: frames whose depth
    is refined with its mean log-depth held (a one-number scale gauge). pair_scale_gauge: instead,
    DUSt3R's gauge: the pairs' mean log-scale is held (at ``pair_sims``'), the similarity block
    solved under that constraint (exact, like the anchored depths).
    flows: optional {(a, b): (H, W, 2)} optical flow from frame a to b (px, pointmap resolution); a
    NaN (non-finite) pixel means no flow there (e.g. it failed the forward-backward check): no weight
    in the flow term nor in its pair's flow_guard mean, as in the Adam path.
    history: record the objective (data + flow) at the start of each sweep and at the end in the
    returned state's ``history`` (costs one evaluation per sweep); trace: optional list that
    receives it after every block update.
    Returns the state with ``loss`` = the data term and ``pair_sims`` = the final similarities.
    """
    prob = _ClosedFormProblem(state, pairs, pair_outputs, masks, device, flows, flow_weight, flow_max_px, flow_guard)
    T, P, H, W, n, dev, dt = prob.T, prob.P, prob.H, prob.W, prob.n, prob.dev, prob.dt
    fs, X, Wt = prob.fs, prob.X, prob.Wt
    R, t = T(state.poses[:, :3, :3]), T(state.poses[:, :3, 3])
    d = T(state.depths).reshape(n, -1).clone()
    free = torch.ones(n, dtype=torch.bool, device=dev)
    free[list(frozen)] = False
    free_d = torch.ones(n, dtype=torch.bool, device=dev)
    free_d[list(frozen if frozen_depth is None else frozen_depth)] = False
    anchor = torch.zeros(n, dtype=torch.bool, device=dev)
    anchor[list(scale_anchor)] = True
    anchor &= free_d
    if focal not in ('hold', 'shared', 'per_frame'):
        raise InputError(f"focal must be 'hold', 'shared' or 'per_frame', got {focal!r}")
    fcol = None  # each frame's focal unknown in the joint steps (-1: held)
    # the joint steps refine the focal: the sweeps before them hold it (their focal block, a 1-D
    # search re-solving every depth per trial, cost ~40 % of a warm step and ended no lower)
    joint_focal = focal != 'hold' and joint_sweeps > 0 and prob.flow is None
    if focal == 'shared':
        fcol = torch.zeros(n, dtype=torch.long, device=dev)
    elif focal == 'per_frame':
        fcol = torch.where(free, free.long().cumsum(0) - 1, -1)
    eps = 1e-6
    sims = None
    if pair_sims is not None:
        sims = prob.sim_tensors(pair_sims)
    hist = [] if history else None

    def record(out):
        if out is not None and sims is not None:
            out.append(sum(prob.objective(R, t, d, sims)))

    last, alpha, cached = None, EXTRAPOLATE, None
    for sweep in range(sweeps):
        record(hist)
        if sweep >= sweeps - joint_sweeps and prob.flow is None and sims is not None:
            (R, t, d, sims), ok = _joint_step(prob, R, t, d, sims, free, free_d, anchor, pair_scale_gauge, fcol)
            cached, last = None, None
            record(trace)
            continue
        chi, res = cached if cached is not None else (prob.world(R, t, d), None)
        cached = None
        dst = chi[fs]
        w = Wt
        if sims is not None:
            res = (prob.targets(sims) - dst).norm(dim=-1) if res is None else res
            w = Wt / res.clamp_min(eps)
        # pair similarities: both views of a pair in one weighted Umeyama
        src2, dst2, w2 = X.view(P, -1, 3), dst.view(P, -1, 3), w.reshape(P, -1)  # pair-major: no copies
        s_old = None if sims is None else sims[0]
        *sims, ms, md, var = fit_similarity_torch(src2, dst2, w2)
        if pair_scale_gauge and s_old is not None:
            # DUSt3R's scale gauge: the pairs' mean log-scale held; per pair the majoriser is
            # W var (s - s*)^2 in s (R does not depend on s, t follows), so the constrained
            # minimiser is the one of the anchored depths
            sc = _anchored_depth(sims[0][None], (w2.sum(1) * var)[None], s_old[None],
                                 torch.ones_like(s_old[None], dtype=torch.bool))[0]
            sims = (sc, sims[1], md - sc[:, None] * torch.einsum('bij,bj->bi', sims[1], ms))
        sims = tuple(sims)
        record(trace)
        A = prob.targets(sims)
        # poses: rigid fit of each frame's camera points to its IRLS-weighted mean targets (data),
        # plus the flow correspondences (see the docstring); moments centred on the current camera
        # centre for precision
        Wr = Wt / (dst - A).norm(dim=-1).clamp_min(eps)
        sw = torch.zeros(n, H * W, dtype=dt, device=dev).index_add_(0, fs, Wr)
        sa = torch.zeros(n, H * W, 3, dtype=dt, device=dev).index_add_(0, fs, Wr[..., None] * (A - t[fs][:, None]))
        xc = d[..., None] * prob.rays  # (current focal)
        cnt = (sw > 0).sum(1)
        Mw, Mx, My, Mxy = sw.sum(1), _wsum(sw, xc), sa.sum(1), torch.bmm(sa.transpose(1, 2), xc)
        if prob.flow is not None:
            fa, fb, _, _, g = prob.flow
            Xf, c, L, dist = prob.flow_geometry(R, t, chi)
            fa_free, fb_free = free[fa], free[fb]
            beta = torch.where(~fa_free, torch.ones_like(g[:, 0]),
                               torch.where(~fb_free, torch.zeros_like(g[:, 0]), torch.full_like(g[:, 0], 0.5)))
            m = L + beta[:, None, None] * (Xf - L)
            wa = g * fa_free[:, None] / ((1 - beta)[:, None] * dist).clamp_min(eps)  # frame a: x = d r -> m
            wb = g * fb_free[:, None] / (beta[:, None] * dist).clamp_min(eps)  # frame b: c -> m
            ya = m - t[fa][:, None]
            yb = m - t[fb][:, None]
            xa = xc[fa]
            for fr, ww, x, y in ((fa, wa, xa, ya), (fb, wb, c, yb)):
                Mw = Mw.index_add(0, fr, ww.sum(1))
                Mx = Mx.index_add(0, fr, _wsum(ww, x))
                My = My.index_add(0, fr, _wsum(ww, y))
                Mxy = Mxy.index_add(0, fr, torch.bmm((y * ww[..., None]).transpose(1, 2), x))
                cnt = cnt.index_add(0, fr, (ww > 0).sum(1))
        Rn, tn = fit_rigid_from_moments(Mw, Mx, My, Mxy)
        ok = free & (cnt >= 3)
        R = torch.where(ok[:, None, None], Rn, R)
        t = torch.where(ok[:, None], tn + t, t)
        record(trace)
        # depths: per pixel, 1-D IRLS along the ray to the targets expressed in the camera, plus the
        # distance to the flow lines
        B = _rotate_inv(R[fs], A - t[fs][:, None])
        Wr = Wt / (prob.world(R, t, d)[fs] - A).norm(dim=-1).clamp_min(eps)  # = |d ray - B|
        # the data part split by its dependence on k = 1 / f (ray = (k uvc, 1)):
        # num = k b + a, den = W (1 + k^2 |uvc|^2)
        zero = torch.zeros(n, H * W, dtype=dt, device=dev)
        Wsum = zero.index_add(0, fs, Wr)
        a = zero.index_add(0, fs, Wr * B[..., 2])
        b = zero.index_add(0, fs, Wr * _dot(B[..., :2], prob.uvc.expand_as(B[..., :2])))
        fnum, fden = zero, zero
        if prob.flow is not None:
            fa, fb, rq, rq2, g = prob.flow
            u = _rotate(R[fb], rq)  # world direction of each line

            def perp(x):  # component orthogonal to the line
                return x - u * (_dot(x, u) / rq2)[..., None]
            e0 = perp((t[fa] - t[fb])[:, None].expand_as(u))
            e1 = perp(_rotate(R[fa], prob.rays[fa]))
            om = g / (e0 + d[fa][..., None] * e1).norm(dim=-1).clamp_min(eps)
            fnum = zero.index_add(0, fa, -om * _dot(e0, e1))
            fden = zero.index_add(0, fa, om * _dot(e1, e1))
        parts = (Wsum, a, b, fnum, fden)
        d_std = _depth_step(prob, parts, 1 / prob.focals, d, free_d, anchor)[0]
        if focal == 'hold' or joint_focal:
            d = d_std
        else:
            d = _focal_depth_block(prob, focal, free, parts, d, d_std, free_d, anchor, R, t, sims)
        record(trace)
        if EXTRAPOLATE > 0:
            if last is not None:
                (R, t, d, sims), ok, cached = _extrapolate(prob, last, (R, t, d, sims), alpha, A)
                alpha = min(2 * alpha, EXTRAPOLATE_MAX) if ok else EXTRAPOLATE
                record(trace)
            last = (R, t, d, sims, prob.focals)
    record(hist)
    loss = prob.objective(R, t, d, sims)[0] if sims else float('nan')
    poses = state.poses.copy()
    poses[:, :3, :3], poses[:, :3, 3] = R.cpu().double().numpy(), t.cpu().double().numpy()
    out = replace(state, poses=poses, depths=d.reshape(n, H, W).cpu().double().numpy(), loss=loss, history=hist or [],
                  focals=prob.focals.cpu().double().numpy(),
                  pair_scales=sims[0].cpu().double().numpy() if sims else state.pair_scales)
    if sims:
        out.pair_sims = [(float(s), Rp, tp) for s, Rp, tp in zip(*(x.cpu().double().numpy() for x in sims))]
    return out
