"""Warm-started windows: block-coordinate descent on the DUSt3R data term plus MonST3R's flow term,
every block solved in closed form (:func:`refine_closed_form`), with the monotone extrapolation of
the state along each sweep; its last sweeps are joint steps (:mod:`.joint`)."""
from __future__ import annotations

from dataclasses import replace

import torch

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import fit_rigid_from_moments, fit_similarity_torch
from dynrecon_ros.pointmap_alignment.joint import _joint_step
from dynrecon_ros.pointmap_alignment.problem import _ClosedFormProblem, _dot, _moment, _rotate, _rotate_inv, _wsum
from dynrecon_ros.pointmap_alignment.state import AlignmentState


# refine_closed_form's extrapolation of the state along each sweep's step (0: off; measured in
# docs/ALIGNMENT.md)
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
        focal (their focal block cost ~40 % of a warm step and ended no lower). Off with a flow
        term (its quadratic has none). Measured effects: docs/ALIGNMENT.md.
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
        Mw, Mx, My, Mxy = sw.sum(1), _wsum(sw, xc), sa.sum(1), _moment(sa, xc)
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
                Mxy = Mxy.index_add(0, fr, _moment(y * ww[..., None], x))
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
