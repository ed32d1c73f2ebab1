"""The static synthetic scene: room, static boxes, cylinder movers, procedural texture, ray casting.

World: z up, floor at z = 0, the room spans ``ROOM_LO``..``ROOM_HI`` metres; the texture is
view-independent value noise in surface coordinates. Everything is vectorised numpy ray casting
against analytic primitives (nothing else renders depth, masks and colour from one scene
description without a GPU, hence hand-written). Used by synthetic.py (sequences) and people.py.
"""
from __future__ import annotations

import numpy as np

from dynrecon_ros.geometry import project

ROOM_LO = np.array([-3.0, -3.0, 0.0])
ROOM_HI = np.array([3.0, 3.0, 2.8])
# Static boxes (lo, hi) in world metres: table, a box on it, a cabinet, a crate, a shelf.
STATIC_BOXES = np.array([
    [[-2.6, 1.4, 0.0], [-1.2, 2.6, 0.75]],
    [[-2.2, 1.8, 0.75], [-1.7, 2.2, 1.05]],
    [[1.5, 2.2, 0.0], [2.8, 2.95, 1.9]],
    [[2.2, -1.0, 0.0], [2.9, -0.3, 0.5]],
    [[-0.6, 2.75, 0.9], [0.9, 3.0, 1.2]],
])
MOVER_RADIUS = 0.28
MOVER_HEIGHT = 1.7
# Texture octaves: lattice cell sizes in metres and weights (multi-scale value noise, not periodic
# within a room: 256 cells per period).
OCTAVES = ((0.6, 1.0), (0.25, 0.8), (0.1, 0.6), (0.045, 0.45), (0.02, 0.25))
LIGHT = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
_TEXTURE = 0  # rng stream id of the texture (synthetic.py numbers the other streams)


def _box_sdf(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(M, 3) -> (M,) signed distance to an axis-aligned box (negative inside)."""
    q = np.abs(points - (lo + hi) / 2) - (hi - lo) / 2
    return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)


def static_surface_distance(points: np.ndarray) -> np.ndarray:
    """(M, 3) world points -> (M,) unsigned distance in metres to the static scene surfaces."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    d = np.abs(_box_sdf(points, ROOM_LO, ROOM_HI))
    for lo, hi in STATIC_BOXES:
        d = np.minimum(d, np.abs(_box_sdf(points, lo, hi)))
    return d


# ---------------------------------------------------------------------------------------------
# Texture


class _Texture:
    """Multi-scale value noise in surface coordinates, deterministic per seed."""

    def __init__(self, seed: int):
        rng = np.random.default_rng([seed, _TEXTURE])
        self.tables = [rng.random(256 * 256, dtype=np.float32) for _ in OCTAVES]
        self.tint_tables = [rng.random(256 * 256, dtype=np.float32) for _ in range(2)]

    @staticmethod
    def _noise(table: np.ndarray, u: np.ndarray, v: np.ndarray, cell: float) -> np.ndarray:
        """(256*256,) flat lattice, (P,) u, v metres -> (P,) float32 smooth value noise in [0, 1]."""
        x, y = u * (1.0 / cell), v * (1.0 / cell)
        ix, iy = np.floor(x), np.floor(y)
        fx, fy = (x - ix).astype(np.float32), (y - iy).astype(np.float32)
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep: C1 continuous
        ix, iy = ix.astype(np.int64) & 255, (iy.astype(np.int64) & 255) << 8
        ix1, iy1 = (ix + 1) & 255, (iy + 256) & 0xFF00
        top = table.take(iy + ix) * (1 - fx) + table.take(iy + ix1) * fx
        bot = table.take(iy1 + ix) * (1 - fx) + table.take(iy1 + ix1) * fx
        return top * (1 - fy) + bot * fy

    def colour(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(P,) u, v metres -> (P, 3) float albedo in [0, 1]."""
        lum = sum(w * self._noise(tab, u, v, cell) for tab, (cell, w) in zip(self.tables, OCTAVES))
        lum = lum / sum(w for _, w in OCTAVES)
        lum = np.clip(0.5 + (lum - 0.5) * 2.6, 0.0, 1.0)
        c1 = self._noise(self.tint_tables[0], u, v, 0.9) - 0.5
        c2 = self._noise(self.tint_tables[1], u, v, 0.7) - 0.5
        tint = np.stack([1 + 0.6 * c1, 1 + 0.6 * c2, 1 - 0.6 * (c1 + c2)], axis=1)
        return np.clip((0.12 + 0.85 * lum)[:, None] * tint, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Ray casting


def _cast(origin: np.ndarray, d: np.ndarray, centres: np.ndarray, headings: np.ndarray, cull=None):
    """Nearest hit of rays ``origin + t * d`` with the scene.

    Args:
        origin: (3,) world camera centre; d: (3, P) world directions whose optical-axis component is 1,
            so the hit parameter t is the z-depth (component rows: faster than (P, 3) columns).
        centres: (M, 2) mover xy; headings: (M,) mover yaw.
        cull: optional function (lo (3,), hi (3,)) -> flat indices of the rays that can hit that world box,
            or None for all; only an optimisation (results are identical without it).
    Returns:
        t (P,); cos_light (P,) = |normal . LIGHT|; u, v (P,) texture coordinates in metres; dynamic (P,) bool.
    """
    p_count = d.shape[1]
    everything = np.arange(p_count)
    with np.errstate(divide='ignore', invalid='ignore'):
        inv = 1.0 / np.where(d == 0, 1e-12, d)
    # Room, seen from inside: exit distance per axis.
    t_axes = [np.where(d[a] > 0, (ROOM_HI[a] - origin[a]) * inv[a], (ROOM_LO[a] - origin[a]) * inv[a])
              for a in range(3)]
    t_best = np.minimum(np.minimum(t_axes[0], t_axes[1]), t_axes[2])
    axis = np.where(t_best == t_axes[0], 0, np.where(t_best == t_axes[1], 1, 2))
    surf = axis * 2 + (np.take_along_axis(d, axis[None], 0)[0] > 0)  # 0..5: room faces
    kind = np.zeros(p_count, np.int8)  # 0 = axis-aligned face, 1 = mover side, 2 = mover cap
    mover = np.full(p_count, -1, np.int64)

    def candidates(lo, hi):
        idx = cull(lo, hi) if cull is not None else None
        return everything if idx is None else idx

    # Static boxes (slab test).
    for b, (lo, hi) in enumerate(STATIC_BOXES):
        idx = candidates(lo, hi)
        if not len(idx):
            continue
        dd, iv = d[:, idx], inv[:, idx]
        tn, tf = [], []
        for a in range(3):
            t1, t2 = (lo[a] - origin[a]) * iv[a], (hi[a] - origin[a]) * iv[a]
            tn.append(np.minimum(t1, t2))
            tf.append(np.maximum(t1, t2))
        t_in = np.maximum(np.maximum(tn[0], tn[1]), tn[2])
        t_out = np.minimum(np.minimum(tf[0], tf[1]), tf[2])
        sel = np.flatnonzero((t_in <= t_out) & (t_in > 1e-6) & (t_in < t_best[idx]))
        if not len(sel):
            continue
        th = t_in[sel]
        ax = np.where(th == tn[0][sel], 0, np.where(th == tn[1][sel], 1, 2))
        hit = idx[sel]
        t_best[hit] = th
        axis[hit] = ax
        surf[hit] = 10 + 6 * b + ax * 2 + (dd[ax, sel] > 0)
    # Movers: vertical cylinders with a flat top.
    for m, c in enumerate(centres):
        idx = candidates(np.array([c[0] - MOVER_RADIUS, c[1] - MOVER_RADIUS, 0.0]),
                         np.array([c[0] + MOVER_RADIUS, c[1] + MOVER_RADIUS, MOVER_HEIGHT]))
        if not len(idx):
            continue
        dd, iv, tb = d[:, idx], inv[:, idx], t_best[idx]
        ox, oy = origin[0] - c[0], origin[1] - c[1]
        a = dd[0] * dd[0] + dd[1] * dd[1]
        bq = 2 * (ox * dd[0] + oy * dd[1])
        cq = ox * ox + oy * oy - MOVER_RADIUS ** 2
        disc = bq * bq - 4 * a * cq
        ok = (disc >= 0) & (a > 1e-12)
        t_side = np.where(ok, (-bq - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, 1e-12)), np.inf)
        z_side = origin[2] + t_side * dd[2]
        side = ok & (t_side > 1e-6) & (z_side >= 0) & (z_side <= MOVER_HEIGHT) & (t_side < tb)
        tb = np.where(side, t_side, tb)
        with np.errstate(divide='ignore', invalid='ignore'):
            t_cap = (MOVER_HEIGHT - origin[2]) * iv[2]
            px, py = ox + t_cap * dd[0], oy + t_cap * dd[1]
        cap = np.isfinite(t_cap) & (t_cap > 1e-6) & (px * px + py * py <= MOVER_RADIUS ** 2) & (t_cap < tb)
        tb = np.where(cap, t_cap, tb)
        got = side | cap
        hit = idx[got]
        t_best[hit] = tb[got]
        kind[hit] = np.where(cap[got], 2, 1)
        mover[hit] = m

    hx, hy, hz = (origin[a] + t_best * d[a] for a in range(3))
    # Axis-aligned faces: texture in the two in-plane coordinates, normal along the axis (|n.L| = |L[axis]|).
    u = np.where(axis == 0, hy, hx) + surf * 13.7
    v = np.where(axis == 2, hy, hz) + surf * 29.3
    cos_light = np.abs(LIGHT)[axis]
    dyn = np.flatnonzero(mover >= 0)
    if len(dyn):
        m = mover[dyn]
        lx, ly = hx[dyn] - centres[m, 0], hy[dyn] - centres[m, 1]
        side = kind[dyn] == 1
        cos_light[dyn] = np.where(side, np.abs(lx * LIGHT[0] + ly * LIGHT[1]) / MOVER_RADIUS, abs(LIGHT[2]))
        # Texture moves with the mover: side uses (arc length, height), cap uses heading-rotated local xy.
        c, s = np.cos(-headings[m]), np.sin(-headings[m])
        u_side = (np.arctan2(ly, lx) - headings[m]) * MOVER_RADIUS
        off = 200 + 2 * m + ~side
        u[dyn] = np.where(side, u_side, c * lx - s * ly) + off * 13.7
        v[dyn] = np.where(side, hz[dyn], s * lx + c * ly) + off * 29.3
    return t_best, cos_light, u, v, mover >= 0


def _screen_cull(pose: np.ndarray, K: np.ndarray, w: int, h: int):
    """Ray culling for _cast: flat pixel indices of the screen rectangle that a world box projects into
    (a convex box lies inside its projected corners' hull), or None when a corner is behind the camera."""
    R, o = pose[:3, :3], pose[:3, 3]

    def cull(lo: np.ndarray, hi: np.ndarray):
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing='ij')).reshape(3, -1).T
        pc = (corners - o) @ R
        if np.any(pc[:, 2] <= 1e-3):
            return None
        u, v = project(pc, K)
        u0, u1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 1, w - 1)
        v0, v1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 1, h - 1)
        if u0 > u1 or v0 > v1:
            return np.zeros(0, np.int64)
        return (np.arange(v0, v1 + 1)[:, None] * w + np.arange(u0, u1 + 1)[None, :]).ravel()
    return cull
