"""Synthetic dynamic RGB-D sequences with exact ground truth (the embedded default data).

A textured static room (walls, floor, ceiling) with static boxes, people-sized vertical cylinders
walking on the floor (textured with the same procedural texture as the background, so appearance
alone cannot separate them) and a smooth hand-held camera path with small shake.

Everything is vectorised numpy ray casting against analytic primitives (nothing else renders
depth, masks and colour from one scene description without a GPU, hence hand-written).

Conventions:
    world: z up, floor at z = 0, the room spans ``ROOM_LO``..``ROOM_HI`` metres.
    poses: camera-to-world (4, 4) of the colour camera optical frame (x right, y down, z forward).
    depth: z-depth along the optical axis in metres, 0 = no reading.
    texture: view-independent (Lambertian shading with a fixed light), so a static surface point has
        the same colour in every frame up to sampling.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import cv2
import numpy as np

from dynrecon_ros.data.bags import write_bag  # noqa: F401  (re-exported: synthetic.write_bag)
from dynrecon_ros.data.tum import write_depth_png, write_masks, write_trajectory
from dynrecon_ros.frames import Frame
from dynrecon_ros.geometry import transform_points, unproject

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
BASE_STAMP = 1700000000.0

# Stream ids for the per-seed random generators (keeps each random draw independent of the others).
_TEXTURE, _CAMERA, _MOVERS, _NOISE, _STAMPS = range(5)


@dataclass
class SyntheticConfig:
    """Options of a synthetic sequence.

    depth_noise: std of additive Gaussian depth noise at 1 m in metres; grows with depth^2 like a
        structured-light sensor (sigma = depth_noise * z^2).
    depth_holes: fraction of pixels without depth reading (0 in the depth image), in smooth blobs.
    depth_stamp_jitter: colour and depth stamps differ by up to this many seconds (like TUM), so
        readers must associate them; the depth image content is rendered at the colour instant.
    """

    width: int = 320
    height: int = 240
    frames: int = 90
    fps: float = 30.0
    movers: int = 2
    seed: int = 0
    depth_noise: float = 0.0
    depth_holes: float = 0.0
    depth_stamp_jitter: float = 0.008
    mover_speed: float = 1.0  # scales the walking speed (1.0 ~ 1.2 m/s peak)
    camera_motion: float = 1.0  # scales the hand-held camera motion amplitude

    def intrinsics(self) -> np.ndarray:
        """(3, 3) K: the TUM fr3 colour camera scaled to width x height."""
        sx, sy = self.width / 640.0, self.height / 480.0
        return np.array([[535.4 * sx, 0.0, 320.1 * sx], [0.0, 539.2 * sy, 247.6 * sy], [0.0, 0.0, 1.0]])


@dataclass
class SyntheticSequence:
    """A rendered sequence with its ground truth.

    Attributes:
        frames: N Frames (rgb (H,W,3) uint8, depth (H,W) float32 m with noise/holes, K, key).
        poses: (N, 4, 4) float64 camera-to-world of the colour optical frame.
        masks: (N, H, W) bool, True where a moving object is seen.
        depth_gt: (N, H, W) float32 noise-free depth in metres (every pixel hits a surface).
        K: (3, 3) float64 intrinsics.
        stamps: (N,) float64 colour stamps (seconds); ``frames[i].key`` is ``f'{stamps[i]:.6f}'``.
        depth_stamps: (N,) float64 depth stamps as written to depth.txt (a few ms off the colour).
        mover_centers: (N, M, 2) float64 xy of each mover's axis on the floor.
        config: the SyntheticConfig used.
    """

    frames: list[Frame]
    poses: np.ndarray
    masks: np.ndarray
    depth_gt: np.ndarray
    K: np.ndarray
    stamps: np.ndarray
    depth_stamps: np.ndarray
    mover_centers: np.ndarray
    config: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def keys(self) -> list[str]:
        return [f.key for f in self.frames]

    def static_surface_distance(self, points: np.ndarray) -> np.ndarray:
        """(M, 3) world points -> (M,) metres to the nearest static surface (room or static box)."""
        return static_surface_distance(points)

    def world_points(self, i: int, pixels_mask: np.ndarray | None = None) -> np.ndarray:
        """(M, 3) world points of frame i's ground-truth depth (all pixels, or where mask is True)."""
        return backproject(self.depth_gt[i], self.K, self.poses[i], pixels_mask)


def backproject(depth: np.ndarray, K: np.ndarray, pose: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(H, W) depth, (3, 3) K, (4, 4) camera-to-world -> (M, 3) world points of valid (masked) pixels."""
    sel = depth > 0 if mask is None else (depth > 0) & mask
    return transform_points(np.asarray(pose, np.float64), unproject(depth, K)[sel])


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
# Scene motion


def _smooth_noise_1d(rng: np.random.Generator, t: np.ndarray, freqs: tuple, amp: float) -> np.ndarray:
    """(N,) sum of sinusoids with random phases: smooth, deterministic per rng."""
    phases = rng.uniform(0, 2 * np.pi, size=len(freqs))
    return amp * sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, phases)) / len(freqs)


def camera_poses(cfg: SyntheticConfig, t: np.ndarray) -> np.ndarray:
    """(N,) seconds -> (N, 4, 4) camera-to-world: a hand-held look-at path with small shake."""
    rng = np.random.default_rng([cfg.seed, _CAMERA])
    a = cfg.camera_motion
    pos = np.stack([
        _smooth_noise_1d(rng, t, (0.11, 0.23), 0.45 * a),
        -2.3 + _smooth_noise_1d(rng, t, (0.13, 0.19), 0.25 * a),
        1.35 + _smooth_noise_1d(rng, t, (0.17, 0.29), 0.12 * a),
    ], axis=1)
    pos += np.stack([_smooth_noise_1d(rng, t, (3.1, 4.7, 6.3), 0.006 * a) for _ in range(3)], axis=1)
    target = np.stack([
        _smooth_noise_1d(rng, t, (0.09, 0.21), 1.6 * a),
        np.full_like(t, 2.0),
        1.0 + _smooth_noise_1d(rng, t, (0.15, 0.27), 0.3 * a),
    ], axis=1)
    fwd = target - pos
    fwd /= np.linalg.norm(fwd, axis=1, keepdims=True)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(fwd, right)
    roll = np.deg2rad(_smooth_noise_1d(rng, t, (0.2, 0.37), 4.0 * a) + _smooth_noise_1d(rng, t, (3.7, 5.3), 0.3 * a))
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]
    right, down = c * right + s * down, -s * right + c * down
    poses = np.tile(np.eye(4), (len(t), 1, 1))
    poses[:, :3, 0], poses[:, :3, 1], poses[:, :3, 2], poses[:, :3, 3] = right, down, fwd, pos
    return poses


def _mover_centres(cfg: SyntheticConfig, t: np.ndarray) -> np.ndarray:
    """(N,) seconds -> (N, M, 2) xy of the movers' axes."""
    rng = np.random.default_rng([cfg.seed, _MOVERS])
    centres = np.zeros((len(t), cfg.movers, 2))
    for k in range(cfg.movers):
        period = rng.uniform(8.0, 11.0) / max(cfg.mover_speed, 1e-6)
        phase = 2 * np.pi * (k / max(cfg.movers, 1) + rng.uniform(-0.08, 0.08)) + 0.3
        y0 = -0.3 + 1.4 * (k % 3) / 2 + rng.uniform(-0.2, 0.2)
        w = 2 * np.pi / period
        centres[:, k, 0] = 1.75 * np.sin(w * t + phase)
        centres[:, k, 1] = y0 + 0.35 * np.sin(1.7 * w * t + rng.uniform(0, 2 * np.pi))
    return centres


def mover_paths(cfg: SyntheticConfig, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) seconds -> centres (N, M, 2) xy and headings (N, M) rad of the walking movers.

    Each mover walks back and forth across the room in front of the camera on a smooth Lissajous-like
    path; different movers start at different phases so they cross each other and the view. The
    heading follows the walking direction, so the movers also turn.
    """
    t = np.asarray(t, dtype=np.float64)
    centres = _mover_centres(cfg, t)
    vel = _mover_centres(cfg, t + 1e-3) - _mover_centres(cfg, t - 1e-3)
    return centres, np.arctan2(vel[..., 1], vel[..., 0])


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
        u = K[0, 0] * pc[:, 0] / pc[:, 2] + K[0, 2]
        v = K[1, 1] * pc[:, 1] / pc[:, 2] + K[1, 2]
        u0, u1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 1, w - 1)
        v0, v1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 1, h - 1)
        if u0 > u1 or v0 > v1:
            return np.zeros(0, np.int64)
        return (np.arange(v0, v1 + 1)[:, None] * w + np.arange(u0, u1 + 1)[None, :]).ravel()
    return cull


def _holes(rng: np.random.Generator, h: int, w: int, fraction: float) -> np.ndarray:
    """(H, W) bool, True for `fraction` of the pixels, in smooth blobs."""
    coarse = rng.random((max(h // 12, 2), max(w // 12, 2))).astype(np.float32)
    field_ = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return field_ > np.quantile(field_, 1.0 - fraction)


def render_sequence(cfg: SyntheticConfig | None = None) -> SyntheticSequence:
    """Render a sequence. Deterministic: the same config gives bitwise-equal arrays."""
    cfg = cfg or SyntheticConfig()
    if cfg.width < 8 or cfg.height < 8 or cfg.frames < 1 or cfg.fps <= 0 or cfg.movers < 0:
        raise ValueError(f'invalid synthetic config: {cfg}')
    n, h, w = cfg.frames, cfg.height, cfg.width
    K = cfg.intrinsics()
    stamps = np.array([float(f'{BASE_STAMP + i / cfg.fps:.6f}') for i in range(n)])
    t = stamps - BASE_STAMP
    srng = np.random.default_rng([cfg.seed, _STAMPS])
    jit = min(cfg.depth_stamp_jitter, 0.25 / cfg.fps)  # stays well inside the association window
    jitter = srng.uniform(-jit, jit, size=n)
    depth_stamps = np.array([float(f'{s + j:.6f}') for s, j in zip(stamps, jitter)])
    poses = camera_poses(cfg, t)
    centres, headings = mover_paths(cfg, t)
    tex = _Texture(cfg.seed)

    rays_cam = unproject(np.ones((h, w)), K).reshape(-1, 3).T  # (3, P) rays at depth 1
    frames, masks, depth_gt = [], np.zeros((n, h, w), bool), np.zeros((n, h, w), np.float32)
    for i in range(n):
        R, o = poses[i, :3, :3], poses[i, :3, 3]
        tt, cos_light, tu, tv, dyn = _cast(o, R @ rays_cam, centres[i], headings[i],
                                           cull=_screen_cull(poses[i], K, w, h))
        shade = (0.6 + 0.4 * cos_light) * 255.0
        rgb = np.clip(tex.colour(tu, tv) * shade[:, None] + 0.5, 0, 255).astype(np.uint8)
        depth_gt[i] = tt.reshape(h, w).astype(np.float32)
        masks[i] = dyn.reshape(h, w)
        depth = depth_gt[i].copy()
        nrng = np.random.default_rng([cfg.seed, _NOISE, i])
        if cfg.depth_noise > 0:
            depth += (nrng.standard_normal((h, w)) * cfg.depth_noise * depth_gt[i] ** 2).astype(np.float32)
            depth = np.maximum(depth, 0.0)
        if cfg.depth_holes > 0:
            depth[_holes(nrng, h, w, cfg.depth_holes)] = 0.0
        key = f'{stamps[i]:.6f}'
        frames.append(Frame(stamp=stamps[i], rgb=rgb.reshape(h, w, 3), depth=depth, K=K.copy(), key=key,
                            meta={'depth_stamp': float(depth_stamps[i]), 'source': 'synthetic'}))
    return SyntheticSequence(frames=frames, poses=poses, masks=masks, depth_gt=depth_gt, K=K, stamps=stamps,
                             depth_stamps=depth_stamps, mover_centers=centres, config=cfg)


# ---------------------------------------------------------------------------------------------
# Writers


def write_tum(seq: SyntheticSequence, directory) -> pathlib.Path:
    """Write the sequence in the TUM RGB-D layout under ``directory`` and return its path.

    Files: rgb/<ts>.png (8-bit colour), depth/<depth_ts>.png (16-bit, 5000 units/m, 0 = no reading),
    rgb.txt, depth.txt, groundtruth.txt (camera-to-world at the colour stamps), masks_gt/<ts>.png
    (mono8, 255 = dynamic, named by the colour stamp) and calibration.txt (one line
    ``fx fy cx cy`` of the colour camera; TUM's readers use it when present).
    """
    root = pathlib.Path(directory)
    for sub in ('rgb', 'depth'):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rgb_lines, depth_lines = [], []
    for f, ds in zip(seq.frames, seq.depth_stamps):
        dkey = f'{ds:.6f}'
        cv2.imwrite(str(root / 'rgb' / f'{f.key}.png'), cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR))
        write_depth_png(root / 'depth' / f'{dkey}.png', f.depth)
        rgb_lines.append(f'{f.key} rgb/{f.key}.png')
        depth_lines.append(f'{dkey} depth/{dkey}.png')
    write_masks(root / 'masks_gt', dict(zip(seq.keys, seq.masks)))
    name = f'dynrecon synthetic seed {seq.config.seed}'
    (root / 'rgb.txt').write_text(f'# color images\n# file: \'{name}\'\n# timestamp filename\n'
                                  + '\n'.join(rgb_lines) + '\n')
    (root / 'depth.txt').write_text(f'# depth maps\n# file: \'{name}\'\n# timestamp filename\n'
                                    + '\n'.join(depth_lines) + '\n')
    write_trajectory(root / 'groundtruth.txt', seq.stamps, seq.poses,
                     header=f'ground truth trajectory\n# file: \'{name}\'\n# timestamp tx ty tz qx qy qz qw')
    K = seq.K
    (root / 'calibration.txt').write_text(f'{K[0, 0]:.9g} {K[1, 1]:.9g} {K[0, 2]:.9g} {K[1, 2]:.9g}\n')
    return root
