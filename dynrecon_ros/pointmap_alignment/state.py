"""The aligner's settings (:class:`AlignConfig`), one window's result (:class:`AlignmentState`) and
what is done with states: the metric scale, a change of world, the loss comparable across runs;
the check of the pair outputs every entry point makes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import fit_similarity, intrinsics_matrix, transform_points, unproject


# The fields that mirror backend.* of config.BackendConfig (its YAML keys and ROS parameters): they
# have no default here, BackendConfig's are the one source (AlignConfig.from_backend).
_FROM_BACKEND = {'iterations': 'align_iterations', 'warm_iterations': 'align_warm_iterations',
                 'warm_mode': 'align_warm_mode', 'shared_focal': 'shared_focal'}


@dataclass
class AlignConfig:
    """Settings of :class:`~dynrecon_ros.pointmap_alignment.PointmapAligner`.

    The first four mirror ``backend.align_iterations``, ``backend.align_warm_iterations``,
    ``backend.align_warm_mode`` and ``backend.shared_focal`` of :class:`dynrecon_ros.config.BackendConfig`
    and have no default of their own: build the config with :meth:`from_backend`. The measurements
    behind the other defaults are in docs/ALIGNMENT.md.
    """
    iterations: int                # first window: Adam iterations from the MST init (DUSt3R/MonST3R demo: 300)
    warm_iterations: int           # warm-started windows: closed-form sweeps (or Adam steps)
    warm_mode: str                 # 'freeze': frames shared with the previous window keep pose and depth,
    # only pairs with a new frame are optimised (cheapest); 'refine': all frames start from the
    # previous estimate and are refined, only the oldest shared frame (or the frozen_ids) is held
    shared_focal: bool             # one focal for all frames (else one per frame)
    warm_joint_sweeps: int = 2     # closed-form warm steps: the last sweeps are joint Gauss-Newton steps
    # on all unknowns, a refined focal included (see refine_closed_form; not with a flow term)
    lr: float = 0.01
    warm_lr: float = 0.002         # Adam moves every parameter by ~lr per step at first: a warm start
    # near the optimum needs a smaller step or 30 iterations cannot settle again
    warm_optimizer: str = 'closed_form'  # warm steps: 'closed_form' (warm_iterations sweeps of
    # refine_closed_form: from a near-optimal warm start each block is solved exactly, no step size)
    # or 'adam' (warm_lr; Adam's normalised steps (~lr per parameter) jitter every converged
    # parameter, so 30 iterations end above the plain schedule's loss)
    lr_min: float = 1e-6
    schedule: str = 'cosine'       # 'cosine' | 'linear'
    warm_focal: bool | None = None  # closed-form warm steps refine the shared focal too (True),
    # hold it (False), or (None) refine it when one frame is held and hold it with several (per-frame
    # focals of the frames not held are always refined; a given focal is always held). With one
    # held frame (the pose gauge) every other unknown is free and the pairs' mean log-scale fixes
    # the scale, so the window's optimum does not depend on the earlier windows; frames held with
    # their poses (the published ones) condition it, and a refined focal there ratchets
    base_scale: float = 0.5
    flow_weight: float = 0.01      # Adam path: weight of the smooth-L1 pixel flow term (MonST3R's)
    flow_weight_closed_form: float = 0.5  # closed-form warm steps: weight of one flow pair's pixel
    # (object-space distance to the flow's line of sight, see refine_closed_form) relative to one
    # pointmap pixel of confidence e in the data term
    flow_start: float = 0.1        # fraction of the iterations before the flow term is on
    flow_max_px: float = 50.0      # per-pixel errors above this are ignored
    flow_guard: float = 25.0       # flow loss above this switches the term off
    smooth_weight: float = 0.0     # MonST3R uses 0.01; with this loss normalisation it shortened the
    # translations (docs/ALIGNMENT.md), so off by default
    smooth_trans_weight: float = 1.0
    device: str = 'cpu'
    cpu_threads: int | None = None  # torch intra-op threads while aligning on CPU (None: leave as is);
    # small problems run several times faster on 1 thread than on oversubscribed cores

    @classmethod
    def from_backend(cls, backend=None, **overrides) -> AlignConfig:
        """The settings of a :class:`dynrecon_ros.config.BackendConfig` (default: ``BackendConfig()``,
        so its defaults are the ones), with ``overrides`` (any field) on top."""
        if backend is None:
            from dynrecon_ros.config import BackendConfig  # here: config imports stage modules, not the reverse
            backend = BackendConfig()
        return cls(**{**{f: getattr(backend, b) for f, b in _FROM_BACKEND.items()}, **overrides})


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


def check_pair_outputs(pairs, out):
    """The pair outputs as host arrays, without a copy where they are float32 or float64 numpy
    arrays already (other dtypes: float32; torch tensors: copied to the host, and kept as they
    are under the name + '_t', which the tensor builders use). Optional, passed through:
    'logw_1', 'logw_2' (P, H, W) precomputed log-confidence weights log(max(conf, 1)), and the
    device tensors 'pts3d_1_t', 'pts3d_2_in_1_t' (P, H, W, 3), 'logw_1_t', 'logw_2_t' (P, H, W)
    (see :func:`~dynrecon_ros.pointmap_alignment.problem.slot_tensors`)."""
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


def window_loss(state: AlignmentState, pairs, pair_outputs, masks=None) -> float:
    """The data term of the objective for a state, comparable across runs: each pair's similarity
    is refitted by weighted Procrustes to the state's world points, and the loss is expressed in
    DUSt3R's gauge (mean pair scale 0.5), so states in different world scales compare fairly."""
    arr = check_pair_outputs([tuple(p) for p in pairs], pair_outputs)
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
