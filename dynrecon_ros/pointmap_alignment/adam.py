"""The first window's schedule: DUSt3R's Adam optimisation of every unknown at once, with MonST3R's flow
and camera-smoothness terms (:func:`adam_schedule`); also the warm steps' Adam alternative
(``AlignConfig.warm_optimizer = 'adam'``)."""
from __future__ import annotations

import math

import numpy as np
import torch

from dynrecon_ros.geometry import pixel_grid
from dynrecon_ros.pointmap_alignment.problem import slot_tensors
from dynrecon_ros.pointmap_alignment.state import AlignmentState


def _quat_to_R(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternion (x, y, z, w), normalised here -> (..., 3, 3). Hand-written: autograd runs
    through it, which scipy's Rotation cannot; roma (which has it) is not a dependency for 8 lines."""
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


def adam_schedule(cfg, pairs, arr, static, flows, pp, poses, depths, focals, pw, focal_fixed, frozen, iters,
                  frame_ids, gauge, lr) -> AlignmentState:
    """DUSt3R's optimisation of a window with MonST3R's terms: ``iters`` Adam steps (betas 0.9, 0.9)
    from ``lr`` down to ``cfg.lr_min`` (``cfg.schedule``: cosine or linear) on every unknown at once,
    through autograd.

    Unknowns (float32 on ``cfg.device``): log-depths (N, H, W), unit quaternions (N, 4) (x, y, z, w)
    and signed-log1p translations (N, 3) of the poses, the log focal (one, shared when
    ``cfg.shared_focal``, else one per frame; held when ``focal_fixed``), and per pair its similarity
    (quaternion, translation, log-scale). The ``frozen`` frames (local indices) keep their starting
    depth, pose and focal. Loss: the data term, confidence-weighted distances between each frame's
    world points and its pairs' pointmaps mapped by the pair similarities, / (P * H * W); plus
    ``cfg.smooth_weight`` times the camera smoothness of consecutive frames; plus, after
    ``cfg.flow_start`` of the iterations, ``cfg.flow_weight`` times the mean smooth-L1 error between
    the ego flow of the estimate and the given optical flow (``flows`` {(i, j): (H, W, 2)}, NaN = no
    flow) on the static pixels within ``cfg.flow_max_px``; the flow term is dropped for good once it
    exceeds ``cfg.flow_guard`` (MonST3R's guard). ``gauge``: the pairs' log-scales are normalised to
    a mean of log(``cfg.base_scale``) (DUSt3R's scale gauge; off for warm starts, whose frozen frames
    fix the scale).

    pairs [(i, j)] (P); arr: checked pair outputs
    (:func:`~dynrecon_ros.pointmap_alignment.state.check_pair_outputs`); static (N, H, W) weights (1
    static, 0 dynamic); pp (2,); poses (N, 4, 4), depths (N, H, W), focals (N,) and pw
    [(s, R, t)] (P) the start (the tree init). Returns the :class:`AlignmentState` with
    ``history`` = the data term at every iteration.
    """
    dev = torch.device(cfg.device)
    T = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32, device=dev)  # noqa: E731
    n, H, W = depths.shape
    P = len(pairs)
    ii = torch.tensor([p[0] for p in pairs], device=dev)
    jj = torch.tensor([p[1] for p in pairs], device=dev)
    X, L = slot_tensors(arr, dev, torch.float32)
    X1, X2 = X.view(P, 2, H, W, 3).unbind(1)
    st = T(static)
    w1 = L.view(P, 2, H, W)[:, 0] * st[ii]
    w2 = L.view(P, 2, H, W)[:, 1] * st[jj]
    u, v = torch.tensor(pixel_grid(H, W), device=dev).unbind(-1)  # (copied: the grid is read-only)
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
