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

    def _normal_equations(self, poses: torch.Tensor, cons, K: torch.Tensor, F: int):
        """Gauss-Newton system over all frames' 6-dof right increments [omega, v] with IRLS Huber.

        Jacobians are analytic (a rigid transform and a pinhole projection: small closed forms, far
        cheaper than autodiff for thousands of residuals). Returns (H (6F, 6F), g (6F,), cost).
        """
        dev, dt = poses.device, poses.dtype
        H = torch.zeros(6 * F, 6 * F, dtype=dt, device=dev)
        g = torch.zeros(6 * F, dtype=dt, device=dev)
        cost = 0.0
        eye = torch.eye(3, dtype=dt, device=dev)
        for (a, b, Pa, Pb, uv, w) in cons:
            n = len(Pa)
            Ra, ta, Rb, tb = poses[a, :3, :3], poses[a, :3, 3], poses[b, :3, :3], poses[b, :3, 3]
            RPa, RPb = Pa @ Ra.T, Pb @ Rb.T
            Xa, Xb = RPa + ta, RPb + tb
            # point term r = (Xa - Xb) / sigma, Xa(omega, v) = Ra (I + [omega]x) Pa + ta + Ra v:
            # dXa/domega = -Ra [Pa]x = -[Ra Pa]x Ra, dXa/dv = Ra (b alike, opposite sign); all the
            # products below are plain GEMMs with one 3x3 matrix per pair (batched 3x3 bmm is slow)
            r = (Xa - Xb) / self.sigma_point
            e = torch.linalg.norm(r, dim=-1)
            hw = torch.where(e < self.huber, torch.ones_like(e), self.huber / e.clamp(min=1e-12)) * w
            cost += float((w * torch.where(e < self.huber, 0.5 * e ** 2, self.huber * (e - 0.5 * self.huber))).sum())
            J = torch.empty(n, 3, 12, dtype=dt, device=dev)
            J[:, :, 0:3] = -(_hat(RPa).reshape(-1, 3) @ Ra).reshape(n, 3, 3)
            J[:, :, 3:6] = Ra
            J[:, :, 6:9] = (_hat(RPb).reshape(-1, 3) @ Rb).reshape(n, 3, 3)
            J[:, :, 9:12] = -Rb
            sw = (hw.sqrt() / self.sigma_point)[:, None, None]
            J2 = (J * sw).reshape(-1, 12)
            Hl = J2.T @ J2
            gl = J2.T @ (r * hw.sqrt()[:, None]).reshape(-1)
            if self.flow_weight > 0:
                Y = (Xa - tb) @ Rb  # point of a in camera b
                Z = Y[:, 2].clamp(min=1e-3)
                fx, fy, cx, cy = K[b][0, 0], K[b][1, 1], K[b][0, 2], K[b][1, 2]
                rf = torch.stack([fx * Y[:, 0] / Z + cx - uv[:, 0], fy * Y[:, 1] / Z + cy - uv[:, 1]], -1) / self.sigma_flow
                ef = torch.linalg.norm(rf, dim=-1)
                hf = torch.where(ef < self.huber, torch.ones_like(ef), self.huber / ef.clamp(min=1e-12)) * w * self.flow_weight
                cost += float((w * self.flow_weight * torch.where(ef < self.huber, 0.5 * ef ** 2,
                                                                   self.huber * (ef - 0.5 * self.huber))).sum())
                # dY/d(omega_a, v_a) = Rb^T Ra [-[Pa]x, I]; dY/d(omega_b, v_b) = [[Y]x, -I]
                RbTRa = Rb.T @ Ra
                JY = torch.empty(n, 3, 12, dtype=dt, device=dev)
                JY[:, :, 0:3] = -(_hat(Pa @ RbTRa.T).reshape(-1, 3) @ RbTRa).reshape(n, 3, 3)
                JY[:, :, 3:6] = RbTRa
                JY[:, :, 6:9] = _hat(Y)
                JY[:, :, 9:12] = -eye
                iz = 1.0 / Z
                Ju = (fx * iz)[:, None] * (JY[:, 0] - (Y[:, 0] * iz)[:, None] * JY[:, 2])
                Jv = (fy * iz)[:, None] * (JY[:, 1] - (Y[:, 1] * iz)[:, None] * JY[:, 2])
                sf = (hf.sqrt() / self.sigma_flow)[:, None]
                Jf = torch.cat([Ju * sf, Jv * sf], 0)
                Hl = Hl + Jf.T @ Jf
                gl = gl + Jf.T @ (torch.cat([rf[:, 0], rf[:, 1]]) * torch.cat([hf.sqrt(), hf.sqrt()]))
            ia, ib = slice(6 * a, 6 * a + 6), slice(6 * b, 6 * b + 6)
            H[ia, ia] += Hl[:6, :6]
            H[ia, ib] += Hl[:6, 6:]
            H[ib, ia] += Hl[6:, :6]
            H[ib, ib] += Hl[6:, 6:]
            g[ia] += gl[:6]
            g[ib] += gl[6:]
        if self.smooth_weight > 0 and F > 1:
            # MonST3R camera smoothness |dR - I|_F^2 + |dt|^2 between consecutive frames (few
            # residuals: autodiff is fine here)
            def fun(delta):
                d = delta.view(F, 6)
                R = poses[:, :3, :3] @ (torch.eye(3, dtype=dt, device=dev) + _hat(d[:, :3]))
                t = poses[:, :3, 3] + torch.einsum('nij,nj->ni', poses[:, :3, :3], d[:, 3:])
                dR = R[:-1].transpose(1, 2) @ R[1:]
                dtr = torch.einsum('nji,nj->ni', R[:-1], t[1:] - t[:-1])
                return torch.cat([(dR - torch.eye(3, dtype=dt, device=dev)).reshape(-1), dtr.reshape(-1)]) * self.smooth_weight ** 0.5
            z = torch.zeros(6 * F, dtype=dt, device=dev)
            rs = fun(z)
            Js = torch.func.jacfwd(fun)(z)
            H = H + Js.T @ Js
            g = g + Js.T @ rs
            cost += 0.5 * float((rs ** 2).sum())
        return H, g, cost

    def align(self, poses: np.ndarray, fixed: np.ndarray, constraints: list[PairConstraint],
              K: np.ndarray) -> AlignmentResult:
        """Refine ``poses`` (F, 4, 4) world<-camera; ``fixed`` (F,) bool frames held; K (F, 3, 3)."""
        poses = np.array(poses, dtype=np.float64)
        F = len(poses)
        free = np.flatnonzero(~np.asarray(fixed, bool))
        if len(free) == 0 or not constraints:
            return AlignmentResult(poses, float('nan'), float('nan'), 0)
        dev, dt = self.device, torch.float64
        constraints = [c for c in constraints if len(c.weight)]
        if not constraints:
            return AlignmentResult(poses, float('nan'), float('nan'), 0)
        cons = []
        for c in constraints:
            cons.append((c.a, c.b, torch.as_tensor(c.pts_a, dtype=dt, device=dev),
                         torch.as_tensor(c.pts_b, dtype=dt, device=dev),
                         torch.as_tensor(c.uv_b, dtype=dt, device=dev),
                         torch.as_tensor(c.weight, dtype=dt, device=dev)))
        Kt = torch.as_tensor(np.asarray(K, dtype=np.float64), device=dev)
        fidx = torch.as_tensor(np.concatenate([np.arange(6 * f, 6 * f + 6) for f in free]), device=dev)
        cost0, cost, it = None, float('nan'), 0
        for it in range(1, self.iterations + 1):
            H, g, cost = self._normal_equations(torch.as_tensor(poses, dtype=dt, device=dev), cons, Kt, F)
            if cost0 is None:
                cost0 = cost
            Hf = H[fidx][:, fidx]
            Hf = Hf + self.damping * torch.diag(torch.diagonal(Hf)) + 1e-9 * torch.eye(len(fidx), dtype=dt, device=dev)
            step = -torch.linalg.solve(Hf, g[fidx])
            s = step.view(-1, 6).cpu().numpy()
            for n, f in enumerate(free):
                Rf = poses[f, :3, :3].copy()
                poses[f, :3, 3] = poses[f, :3, 3] + Rf @ s[n, 3:]
                poses[f, :3, :3] = Rf @ so3_exp(s[n, :3])
            if np.abs(s).max() < 1e-8:
                break
        return AlignmentResult(poses, float(cost0), cost, it)
