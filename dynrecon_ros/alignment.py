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
from typing import TYPE_CHECKING

import numpy as np
import torch

from dynrecon_ros.geometry import hat, so3_exp
if TYPE_CHECKING:
    from dynrecon_ros.config import AlignmentConfig

DAMPING = 1e-6  # Levenberg damping of the normal equations (relative to their diagonal)


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


def _matvec(R: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """R @ p for (n, 3, 3) matrices and (n, 3) vectors (explicit sums: torch's batched 3x3 products
    and reductions over a size-3 axis are slow on CPU)."""
    return R[:, :, 0] * P[:, 0:1] + R[:, :, 1] * P[:, 1:2] + R[:, :, 2] * P[:, 2:3]


def _hat_mul(v: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """[v]x @ M for (n, 3) vectors and (n, 3, 3) matrices (column k = v x M[:, k])."""
    return torch.linalg.cross(v[:, :, None].expand(-1, 3, 3), M, dim=1)


class WindowAligner:
    """Gauss-Newton/IRLS over the poses of the free frames of a window.

    Args:
        cfg: the alignment section of the pipeline config (:class:`dynrecon_ros.config.AlignmentConfig`):
            iterations per call (warm-started, so few are needed); sigma_point_m: scale of the 3D
            residual (Huber threshold = huber · sigma); sigma_flow_px: scale of the flow residual;
            flow_weight: lambda_flow (0 disables the MonST3R flow term); smooth_weight: lambda_smooth
            (0 disables the smoothness term); huber: Huber threshold in sigmas.
        device: 'cpu' or 'cuda'.
    """

    def __init__(self, cfg: AlignmentConfig, device: str):
        self.iterations = cfg.iterations
        self.sigma_point = cfg.sigma_point_m
        self.sigma_flow = cfg.sigma_flow_px
        self.flow_weight = cfg.flow_weight
        self.smooth_weight = cfg.smooth_weight
        self.huber = cfg.huber
        self.damping = DAMPING
        self.device = torch.device(device)

    def _normal_equations(self, poses: torch.Tensor, data: dict, K: torch.Tensor, F: int):
        """Gauss-Newton system over all frames' 6-dof right increments [omega, v] with IRLS Huber.

        Jacobians are analytic (a rigid transform and a pinhole projection: small closed forms, far
        cheaper than autodiff for thousands of residuals), computed for the correspondences of all
        pairs at once (``data`` from :meth:`_stack`). Returns (H (6F, 6F), g (6F,), cost).
        """
        dev, dt = poses.device, poses.dtype
        a, b, pid, Pa, Pb, uv, w = (data[k] for k in ('a', 'b', 'pair_id', 'pts_a', 'pts_b', 'uv_b', 'weight'))
        n = len(Pa)
        R, t = poses[:, :3, :3], poses[:, :3, 3]
        Ra, ta, Rb, tb = R[a], t[a], R[b], t[b]  # (n, 3, 3), (n, 3)
        RPa, RPb = _matvec(Ra, Pa), _matvec(Rb, Pb)
        Xa, Xb = RPa + ta, RPb + tb
        # point term r = (Xa - Xb) / sigma, Xa(omega, v) = Ra (I + [omega]x) Pa + ta + Ra v:
        # dXa/domega = -Ra [Pa]x = -[Ra Pa]x Ra, dXa/dv = Ra (b alike, opposite sign)
        r = (Xa - Xb) / self.sigma_point
        e = torch.linalg.vector_norm(r, dim=-1)
        hw = torch.where(e < self.huber, torch.ones_like(e), self.huber / e.clamp(min=1e-12)) * w
        cost = float((w * torch.where(e < self.huber, 0.5 * e ** 2, self.huber * (e - 0.5 * self.huber))).sum())
        rows = 5 if self.flow_weight > 0 else 3
        J = torch.empty(n, rows, 12, dtype=dt, device=dev)
        res = torch.empty(n, rows, dtype=dt, device=dev)
        sq = hw.sqrt()
        sw = (sq / self.sigma_point)[:, None, None]
        J[:, :3, 0:3] = _hat_mul(RPa, Ra) * -sw
        J[:, :3, 3:6] = Ra * sw
        J[:, :3, 6:9] = _hat_mul(RPb, Rb) * sw
        J[:, :3, 9:12] = Rb * -sw
        res[:, :3] = r * sq[:, None]
        if self.flow_weight > 0:
            RbT = Rb.transpose(1, 2)
            Y = _matvec(RbT, Xa - tb)  # point of a in camera b: Rb^T (Xa - tb)
            Z = Y[:, 2].clamp(min=1e-3)
            Kb = data['K_b']
            fx, fy, cx, cy = Kb[:, 0], Kb[:, 1], Kb[:, 2], Kb[:, 3]
            iz = 1.0 / Z
            rf = torch.stack([fx * Y[:, 0] * iz + cx - uv[:, 0], fy * Y[:, 1] * iz + cy - uv[:, 1]], -1) / self.sigma_flow
            ef = torch.linalg.vector_norm(rf, dim=-1)
            hf = torch.where(ef < self.huber, torch.ones_like(ef), self.huber / ef.clamp(min=1e-12)) * w * self.flow_weight
            cost += float((w * self.flow_weight * torch.where(ef < self.huber, 0.5 * ef ** 2,
                                                               self.huber * (ef - 0.5 * self.huber))).sum())
            # dY/d(omega_a, v_a) = Rb^T Ra [-[Pa]x, I]; dY/d(omega_b, v_b) = [[Y]x, -I]
            RbTRa = (R[data['pair_b']].transpose(1, 2) @ R[data['pair_a']])[pid]  # per pair, then per point
            JY = torch.empty(n, 3, 12, dtype=dt, device=dev)
            JY[:, :, 0:3] = -_hat_mul(_matvec(RbTRa, Pa), RbTRa)
            JY[:, :, 3:6] = RbTRa
            JY[:, :, 6:9] = hat(Y)
            JY[:, :, 9:12] = -torch.eye(3, dtype=dt, device=dev)
            sf = hf.sqrt()
            J[:, 3] = ((fx * iz * sf / self.sigma_flow)[:, None]) * (JY[:, 0] - (Y[:, 0] * iz)[:, None] * JY[:, 2])
            J[:, 4] = ((fy * iz * sf / self.sigma_flow)[:, None]) * (JY[:, 1] - (Y[:, 1] * iz)[:, None] * JY[:, 2])
            res[:, 3:] = rf * sf[:, None]
        # per pair one GEMM over its rows (pairs are contiguous), added into the frames' blocks
        H = torch.zeros(6 * F, 6 * F, dtype=dt, device=dev)
        g = torch.zeros(6 * F, dtype=dt, device=dev)
        for (lo, hi), (fa, fb) in zip(data['ranges'], data['frames']):
            Jc = J[lo:hi].reshape(-1, 12)
            Hl = Jc.T @ Jc
            gl = Jc.T @ res[lo:hi].reshape(-1)
            ia, ib = slice(6 * fa, 6 * fa + 6), slice(6 * fb, 6 * fb + 6)
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
                R = poses[:, :3, :3] @ (torch.eye(3, dtype=dt, device=dev) + hat(d[:, :3]))
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

    def _stack(self, constraints: list[PairConstraint], K: np.ndarray) -> dict:
        """All pairs' correspondences as one set of tensors (pairs contiguous): (n, ...) data, (n,)
        frame indices a, b and pair id, (n, 4) fx fy cx cy of b; per pair its frames and row range."""
        dev, dt = self.device, torch.float64

        def cat(name):
            return torch.as_tensor(np.concatenate([np.asarray(getattr(c, name), np.float64) for c in constraints]),
                                   dtype=dt, device=dev)

        counts = np.array([len(c.weight) for c in constraints])
        ab = np.array([[c.a, c.b] for c in constraints])
        K = np.asarray(K, dtype=np.float64)
        kb = np.stack([K[ab[:, 1], 0, 0], K[ab[:, 1], 1, 1], K[ab[:, 1], 0, 2], K[ab[:, 1], 1, 2]], 1)
        ends = np.cumsum(counts)
        pair_id = np.repeat(np.arange(len(constraints)), counts)
        return {'pts_a': cat('pts_a'), 'pts_b': cat('pts_b'), 'uv_b': cat('uv_b'), 'weight': cat('weight'),
                'a': torch.as_tensor(ab[pair_id, 0], device=dev), 'b': torch.as_tensor(ab[pair_id, 1], device=dev),
                'pair_id': torch.as_tensor(pair_id, device=dev),
                'pair_a': torch.as_tensor(ab[:, 0], device=dev), 'pair_b': torch.as_tensor(ab[:, 1], device=dev),
                'K_b': torch.as_tensor(kb[pair_id], dtype=dt, device=dev),
                'ranges': list(zip((ends - counts).tolist(), ends.tolist())), 'frames': ab.tolist()}

    def align(self, poses: np.ndarray, fixed: np.ndarray, constraints: list[PairConstraint],
              K: np.ndarray) -> AlignmentResult:
        """Refine ``poses`` (F, 4, 4) world<-camera; ``fixed`` (F,) bool frames held; K (F, 3, 3)."""
        poses = np.array(poses, dtype=np.float64)
        F = len(poses)
        free = np.flatnonzero(~np.asarray(fixed, bool))
        if len(free) == 0 or not constraints:
            return AlignmentResult(poses, float('nan'), float('nan'), 0)
        dev, dt = self.device, torch.float64
        # pairs between two held frames only add to the held frames' blocks: they change nothing
        held = np.asarray(fixed, bool)
        constraints = [c for c in constraints if len(c.weight) and not (held[c.a] and held[c.b])]
        if not constraints:
            return AlignmentResult(poses, float('nan'), float('nan'), 0)
        cons = self._stack(constraints, K)
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
