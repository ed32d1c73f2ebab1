"""Pairwise pointmaps as a network would give them, made from the synthetic sequence's ground truth
(the oracle of the aligner's tests and of bench/alignment.py and bench/monocular_host.py)."""
from __future__ import annotations

import numpy as np


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
