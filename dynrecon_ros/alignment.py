"""Stage 5, windowed global alignment (torch, CPU or CUDA).

The DUSt3R objective restricted to what the RGB-D backend leaves unknown: per-frame camera poses.
Depths are observed, so the pointmaps are metric data and the per-pair similarity is the identity
(scale fixed = metric). The objective over the window's pair graph (only static, confident pixels):

    sum_e sum_p  w_p · rho(|T_i X_i(p) − T_j X_j(p + F_ij(p))| / sigma_point)         (DUSt3R term)
  + lambda_flow · sum_e sum_p w_p · rho(|pi_j(T_j^-1 T_i X_i(p)) − (p + F_ij(p))| / sigma_flow)   (MonST3R flow term)
  + lambda_smooth · sum_t |dR_t − I|_F^2 + |dt_t|^2                                    (camera smoothness)

rho = Huber, by iteratively reweighted Gauss-Newton (Levenberg damped): the problem has few
unknowns (6 per free frame) and many residuals, where Gauss-Newton converges in a handful of
iterations while first-order Adam (DUSt3R's choice for its much larger problem) would need hundreds.
Online use: the window is warm-started from the previous estimates, and frames that overlap the
previous window (or are keyframe anchors) are held fixed, so the trajectory stays in one frame and
one (metric) scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PairConstraint:
    """Static correspondences between frames a and b of the window (indices into the pose list).

    pts_a: (n, 3) points in camera a; pts_b: (n, 3) matched points in camera b; uv_b: (n, 2) pixel of
    the match in b (p + flow); weight: (n,) confidence weights (log-confidence in DUSt3R).
    """

    a: int
    b: int
    pts_a: np.ndarray
    pts_b: np.ndarray
    uv_b: np.ndarray
    weight: np.ndarray


@dataclass
class AlignmentResult:
    poses: np.ndarray  # (F, 4, 4) world<-camera
    cost_initial: float
    cost_final: float
    iterations: int
    residual_rms_m: float = float('nan')
    info: dict = field(default_factory=dict)


def _hat(w: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) skew-symmetric."""
    z = torch.zeros_like(w[..., 0])
    return torch.stack([torch.stack([z, -w[..., 2], w[..., 1]], -1),
                        torch.stack([w[..., 2], z, -w[..., 0]], -1),
                        torch.stack([-w[..., 1], w[..., 0], z], -1)], -2)


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rodrigues: (3,) axis-angle -> (3, 3)."""
    th = np.linalg.norm(w)
    Wx = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    if th < 1e-12:
        return np.eye(3) + Wx
    return np.eye(3) + np.sin(th) / th * Wx + (1 - np.cos(th)) / th ** 2 * Wx @ Wx


class WindowAligner:
    """Gauss-Newton/IRLS over the poses of the free frames of a window.

    Args:
        iterations: Gauss-Newton iterations per call (warm-started, so few are needed).
        sigma_point_m: scale of the 3D residual (Huber threshold = huber · sigma).
        sigma_flow_px: scale of the flow residual.
        flow_weight: lambda_flow (0 disables the MonST3R flow term).
        smooth_weight: lambda_smooth (0 disables the smoothness term).
        huber: Huber threshold in sigmas.
        device: 'cpu' or 'cuda'.
    """

    def __init__(self, iterations: int = 4, sigma_point_m: float = 0.01, sigma_flow_px: float = 1.0,
                 flow_weight: float = 0.1, smooth_weight: float = 1e-4, huber: float = 1.5,
                 damping: float = 1e-6, device: str = 'cpu'):
        self.iterations = iterations
        self.sigma_point = sigma_point_m
        self.sigma_flow = sigma_flow_px
        self.flow_weight = flow_weight
        self.smooth_weight = smooth_weight
        self.huber = huber
        self.damping = damping
        self.device = torch.device(device)

    def _residuals(self, delta, T0, free_idx, cons, K, weights):
        """Stacked whitened residuals (R,) as a function of delta (F_free*6,)."""
        F = T0.shape[0]
        d = delta.view(-1, 6)
        Rd = torch.eye(3, dtype=T0.dtype, device=T0.device) + _hat(d[:, :3]) + 0.5 * _hat(d[:, :3]) @ _hat(d[:, :3])
        R = T0[:, :3, :3].clone()
        t = T0[:, :3, 3].clone()
        if len(free_idx):
            fi = free_idx
            Rf = T0[fi, :3, :3] @ Rd
            tf = T0[fi, :3, 3] + torch.einsum('nij,nj->ni', T0[fi, :3, :3], d[:, 3:])
            R = R.index_copy(0, fi, Rf)
            t = t.index_copy(0, fi, tf)
        out = []
        for k, (a, b, Pa, Pb, uv, w) in enumerate(cons):
            Xa = Pa @ R[a].T + t[a]
            Xb = Pb @ R[b].T + t[b]
            out.append(((Xa - Xb) / self.sigma_point * weights[k][0][:, None]).reshape(-1))
            if self.flow_weight > 0:
                Xab = (Xa - t[b]) @ R[b]  # into camera b
                z = Xab[:, 2].clamp(min=1e-3)
                u = K[b][0, 0] * Xab[:, 0] / z + K[b][0, 2]
                v = K[b][1, 1] * Xab[:, 1] / z + K[b][1, 2]
                r = torch.stack([u - uv[:, 0], v - uv[:, 1]], -1) / self.sigma_flow
                out.append((r * (weights[k][1][:, None] * float(np.sqrt(self.flow_weight)))).reshape(-1))
        if self.smooth_weight > 0 and F > 1:
            dR = R[:-1].transpose(1, 2) @ R[1:]
            dt = torch.einsum('nji,nj->ni', R[:-1], t[1:] - t[:-1])
            s = float(np.sqrt(self.smooth_weight))
            out.append(((dR - torch.eye(3, dtype=R.dtype, device=R.device)) * s).reshape(-1))
            out.append((dt * s).reshape(-1))
        return torch.cat(out)

    def align(self, poses: np.ndarray, fixed: np.ndarray, constraints: list[PairConstraint],
              K: np.ndarray) -> AlignmentResult:
        """Refine ``poses`` (F, 4, 4) world<-camera; ``fixed`` (F,) bool frames held; K (F, 3, 3)."""
        poses = np.array(poses, dtype=np.float64)
        free = np.flatnonzero(~np.asarray(fixed, bool))
        if len(free) == 0 or not constraints:
            return AlignmentResult(poses, float('nan'), float('nan'), 0)
        dev, dt = self.device, torch.float64
        cons = []
        for c in constraints:
            w = torch.as_tensor(np.sqrt(np.maximum(c.weight, 0)), dtype=dt, device=dev)
            cons.append((c.a, c.b, torch.as_tensor(c.pts_a, dtype=dt, device=dev),
                         torch.as_tensor(c.pts_b, dtype=dt, device=dev),
                         torch.as_tensor(c.uv_b, dtype=dt, device=dev), w))
        Kt = torch.as_tensor(np.asarray(K, dtype=np.float64), device=dev)
        fi = torch.as_tensor(free, device=dev)
        cost0 = None
        cost = float('nan')
        it = 0
        for it in range(1, self.iterations + 1):
            T0 = torch.as_tensor(poses, dtype=dt, device=dev)
            # IRLS Huber weights from the current residual norms per correspondence
            weights = []
            with torch.no_grad():
                for (a, b, Pa, Pb, uv, w) in cons:
                    Xa = Pa @ T0[a, :3, :3].T + T0[a, :3, 3]
                    Xb = Pb @ T0[b, :3, :3].T + T0[b, :3, 3]
                    e = torch.linalg.norm(Xa - Xb, dim=-1) / self.sigma_point
                    hw_p = torch.where(e < self.huber, torch.ones_like(e), self.huber / e.clamp(min=1e-12))
                    Xab = (Xa - T0[b, :3, 3]) @ T0[b, :3, :3]
                    z = Xab[:, 2].clamp(min=1e-3)
                    u = Kt[b][0, 0] * Xab[:, 0] / z + Kt[b][0, 2]
                    v = Kt[b][1, 1] * Xab[:, 1] / z + Kt[b][1, 2]
                    ef = torch.linalg.norm(torch.stack([u - uv[:, 0], v - uv[:, 1]], -1), dim=-1) / self.sigma_flow
                    hw_f = torch.where(ef < self.huber, torch.ones_like(ef), self.huber / ef.clamp(min=1e-12))
                    weights.append((w * hw_p.sqrt(), w * hw_f.sqrt()))
            delta0 = torch.zeros(len(free) * 6, dtype=dt, device=dev)

            def fun(dl):
                return self._residuals(dl, T0, fi, cons, Kt, weights)

            r = fun(delta0)
            J = torch.func.jacfwd(fun)(delta0)
            cost = float((r ** 2).sum())
            if cost0 is None:
                cost0 = cost
            H = J.T @ J
            H = H + self.damping * torch.diag(torch.diagonal(H)) + 1e-12 * torch.eye(H.shape[0], dtype=dt, device=dev)
            step = -torch.linalg.solve(H, J.T @ r)
            s = step.view(-1, 6).cpu().numpy()
            for n, f in enumerate(free):
                Rf = poses[f, :3, :3]
                poses[f, :3, 3] = poses[f, :3, 3] + Rf @ s[n, 3:]
                poses[f, :3, :3] = Rf @ so3_exp(s[n, :3])
            if np.abs(s).max() < 1e-7:
                break
        # final residual RMS (3D, unweighted) for diagnostics
        T0 = torch.as_tensor(poses, dtype=dt, device=dev)
        errs = []
        for (a, b, Pa, Pb, uv, w) in cons:
            e = (Pa @ T0[a, :3, :3].T + T0[a, :3, 3]) - (Pb @ T0[b, :3, :3].T + T0[b, :3, 3])
            errs.append(torch.linalg.norm(e, dim=-1))
        e = torch.cat(errs)
        return AlignmentResult(poses, float(cost0), cost, it,
                               residual_rms_m=float(torch.sqrt(torch.median(e ** 2))))
