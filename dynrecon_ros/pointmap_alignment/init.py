"""The spanning-tree initialisation of a window (DUSt3R's init_im_poses, with a robust fit): the pairs
of a maximum-confidence spanning tree chained from its root (or from the frames already aligned),
each frame's focal from its pointmap, its pose and depth by registering its pointmap, and every
pair's similarity to the result."""
from __future__ import annotations

import numpy as np
import torch

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import fit_similarity_torch, intrinsics_matrix, robust_similarity, unproject
from dynrecon_ros.intrinsics import estimate_focal
from dynrecon_ros.pointmap_alignment.problem import _rotate, slot_tensors


def tree_init(cfg, n, pairs, arr, static, pp, fixed_focal, known_world, known_pose, known_depth, known_focal):
    """Spanning-tree init of a window (settings ``cfg``: :class:`AlignConfig`; ``arr``: checked pair
    outputs; static (N, H, W) weights; pp (2,); fixed_focal (N,) or None). known_*: dicts frame ->
    world points / pose / depth / focal (frozen frames). Returns poses (N, 4, 4), depths (N, H, W),
    focals (N,) and the pairs' similarities [(s, R, t)] (:func:`pair_similarities`)."""
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
    if fixed_focal is None and cfg.shared_focal:
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
    return poses, depths, focals, pair_similarities(pairs, arr, static, poses, depths, focals, pp,
                                                       cfg.device)


def pair_similarities(pairs, arr, static, poses, depths, focals, pp, device: str, chunk: int = 8):
    """[(s, R (3, 3), t (3,))] per pair: the weighted Umeyama fit of the pair's two pointmaps to its
    frames' world points (weights log-confidence x static), batched in torch on ``device``,
    ``chunk`` pairs at a time (float64 on CPU). poses (N, 4, 4), depths (N, H, W), focals (N,)."""
    dev = torch.device(device)
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
        X, L = slot_tensors({k: a[e0:e0 + chunk] for k, a in arr.items()}, dev, dt)  # (2p, HW, 3), (2p, HW)
        p = X.shape[0] // 2
        ij = torch.stack([ii[e0:e0 + p], jj[e0:e0 + p]], 1).reshape(-1)  # each slot's frame
        sc, R, t = fit_similarity_torch(X.view(p, -1, 3), world[ij].view(p, -1, 3), (L * st[ij]).view(p, -1))[:3]
        out += [(float(sc[k]), R[k].cpu().double().numpy(), t[k].cpu().double().numpy()) for k in range(p)]
    return out
