"""The closed-form refinement's problem on one window: its tensors (pointmaps, confidence weights,
rays, the flow term's fixed gate) and its objective (:func:`closed_form_objective`); the tensor
helpers the init, the Adam schedule and the sweeps share."""
from __future__ import annotations

import numpy as np
import torch

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import batched_dot as _dot
from dynrecon_ros.geometry import batched_moment as _moment
from dynrecon_ros.geometry import batched_rotate as _rotate
from dynrecon_ros.geometry import batched_rotate_inv as _rotate_inv
from dynrecon_ros.geometry import batched_wsum as _wsum
from dynrecon_ros.geometry import pixel_grid
from dynrecon_ros.pointmap_alignment.state import AlignmentState, check_pair_outputs


def slot_tensors(arr, device, dtype):
    """(X (2P, H*W, 3), logw (2P, H*W)) of checked pair outputs ``arr``
    (:func:`~dynrecon_ros.pointmap_alignment.state.check_pair_outputs`) on ``device`` in ``dtype``,
    pair-major: slot 2p is view 1 of pair p, slot 2p + 1 its view 2 (so ``X.view(P, 2 * H * W, 3)``
    holds each pair's two pointmaps, no copy); logw = log(max(conf, 1)), DUSt3R's 'log' confidence
    transform (0 for conf <= 1).

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
        arr = check_pair_outputs([tuple(p) for p in pairs], pair_outputs)
        self.P, self.H, self.W = P, H, W = arr['conf_1'].shape
        self.n = n = len(state.poses)
        self.dev = dev = torch.device(device)
        self.dt = dt = torch.float64 if dev.type == 'cpu' else torch.float32
        T = self.T
        static = np.ones((n, H, W)) if masks is None else (~(np.asarray(masks) > 0)).astype(np.float64)
        ii = torch.tensor([p[0] for p in pairs], device=dev)
        jj = torch.tensor([p[1] for p in pairs], device=dev)
        self.fs = torch.stack([ii, jj], 1).reshape(-1)  # frame of each (pair, view) slot (pair-major)
        self.uv = torch.tensor(pixel_grid(H, W), dtype=dt, device=dev).reshape(-1, 2)  # (copied: read-only grid)
        self.pp = T(state.pp)
        self.uvc = self.uv - self.pp  # (HW, 2) pixel offsets from the principal point
        self.set_focals(T(state.focals))
        self.X, logw = slot_tensors(arr, dev, dt)  # (2P, HW, 3), (2P, HW)
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
