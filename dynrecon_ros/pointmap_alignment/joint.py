"""The joint Gauss-Newton step of the closed-form refinement (:func:`_joint_step`): every unknown of
the window at once (poses, pair similarities, depths by the Schur complement, focals), on the IRLS
quadratic of the data term, the gauges as constraints."""
from __future__ import annotations

import torch

from dynrecon_ros.geometry import batched_total, hat
from dynrecon_ros.pointmap_alignment.problem import _dot, _moment, _rotate, _wsum


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
    Syy = _moment(wy, y)
    Szz = _moment(wz, z)
    Szy = _moment(wz, y)  # sum w z y^T
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
                       -batched_total(w, _dot(z, r))[:, None], -Sr], 1)
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
    linear rate, about halving the gap to the optimum each (a variant with less of that curvature:
    docs/ALIGNMENT.md).
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
        Wq, Qy, Qz = wq.sum(1), _moment(wq, y), _moment(wq, z)  # sum w q y^T ...
        c13 = torch.cat([-_vee(Qy), Wq, _vee(Qz), -Qz.diagonal(dim1=1, dim2=2).sum(1)[:, None], -Wq], 1).to(sd)
        hq = (wq * q).sum((1, 2)).to(sd)
        sk = fk[fs][:, None].expand(-1, 13)
        Hg.index_put_((sk, cols), c13, accumulate=True)
        Hg.index_put_((cols, sk), c13, accumulate=True)
        Hg.index_put_((fk[fs], fk[fs]), hq, accumulate=True)
        gg.index_put_((fk[fs],), batched_total(w, _dot(q, r)).to(sd), accumulate=True)
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
        gd = (_dot(r[sl], af[None]) * ws.T).sum(0) if af.is_cuda else torch.einsum('mk,kmi,mi->m', ws, r[sl], af)
        gd = gd.to(sd)
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
