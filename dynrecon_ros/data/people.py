"""Articulated walking people for the synthetic renderer: body model, gait, paths, ray casting.

A person is ten capsules (a segment a-b swept by a sphere of radius r): torso, head, upper and
lower arms, thighs and shins. Legs swing about the hips and bend at the knees, arms swing opposite
to the legs, the body bobs; the gait phase advances with the distance walked, so a person who stops
stands still (limbs blend to a standing pose). Every part carries its own texture in its own local
frame (angle around and position along its axis), so the texture moves and turns with the limb.

Paths (world xy on the floor, z up; see synthetic.py for conventions):
    walkers: closed elliptic loops in front of the camera at ~1.1-1.4 m/s; with ``stop_and_go``
        each walker stops for ~1.5 s (staggered) and walks on.
    close crossing: a person crossing the view 0.85 m in front of the camera (up to half the view).
    toward camera: a person walking straight toward the camera, from 4 m in front of it at the start to
        0.9 m in front of it at the end of the sequence.

Ray casting is vectorised numpy over the rays of each part's screen rectangle (nothing renders
capsules with exact masks and body-attached texture on a CPU without a GPU, hence hand-written).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynrecon_ros.geometry import project

# Part table: name, parent joint, length (m), radius (m), clothing slot (0 shirt, 1 trousers, 2 skin).
PART_NAMES = ('torso', 'head', 'upper_arm_l', 'forearm_l', 'upper_arm_r', 'forearm_r',
              'thigh_l', 'shin_l', 'thigh_r', 'shin_r')
_RADII = np.array([0.16, 0.11, 0.052, 0.045, 0.052, 0.045, 0.075, 0.06, 0.075, 0.06])
_SLOT = np.array([0, 2, 0, 2, 0, 2, 1, 1, 1, 1])
HIP_HEIGHT = 0.90
THIGH, SHIN = 0.44, 0.44
UPPER_ARM, FOREARM = 0.29, 0.27
SHOULDER_HEIGHT, SHOULDER_HALF, HIP_HALF = 1.42, 0.21, 0.10
STRIDE = 1.45  # metres per gait cycle (two steps)
STOP_DURATION = 1.5  # seconds a stop-and-go walker stands still (plus two 0.25 s ramps)
_RAMP = 0.25
PARTS = len(PART_NAMES)

_PEOPLE, _CLOTHES = 11, 12  # rng stream ids (synthetic.py uses 0..5)


@dataclass
class PeopleState:
    """Pose of every body part at T instants (Q = persons * PARTS parts).

    a, b: (T, Q, 3) capsule segment ends in world metres; frames: (T, Q, 3, 3) part-to-world rotation
    whose third column is the unit axis a->b (the texture's local frame); radius: (Q,) metres;
    person: (Q,) person index; albedo: (Q, 3) clothing colour in [0, 1].
    """

    a: np.ndarray
    b: np.ndarray
    frames: np.ndarray
    radius: np.ndarray
    person: np.ndarray
    albedo: np.ndarray


def _walked(t: np.ndarray, speed: float, stop_at: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(T,) seconds -> distance walked (T,) metres and speed factor (T,) in [0, 1].

    Speed factor 1, or with ``stop_at`` a smooth dip to 0 for STOP_DURATION s from stop_at on,
    every 5 s. The distance is its integral in closed form (piecewise: cosine ramps, plateau).
    """
    t = np.asarray(t, dtype=np.float64)
    if stop_at is None:
        return speed * t, np.ones_like(t)
    period = STOP_DURATION + 2 * _RAMP + 3.0
    k = np.floor((t - stop_at) / period)
    x = t - stop_at - k * period  # time within the current cycle (stop starts at 0)
    r, p = _RAMP, STOP_DURATION
    # speed factor g: ramp down on [0, r], 0 on [r, r+p], ramp up on [r+p, 2r+p], 1 after.
    down = np.clip(x / r, 0, 1)
    up = np.clip((x - r - p) / r, 0, 1)
    g = np.where(x < r, 0.5 + 0.5 * np.cos(np.pi * down), np.where(x < r + p, 0.0, 0.5 - 0.5 * np.cos(np.pi * up)))
    g = np.where(x >= 2 * r + p, 1.0, g)
    # integral of g over [0, x] within a cycle, and per full cycle
    lost_cycle = r + p  # each ramp loses r/2 relative to full speed, the plateau loses p
    int_down = np.where(x < r, 0.5 * x + r / (2 * np.pi) * np.sin(np.pi * down), 0.5 * r)
    int_up = np.where(x < r + p, 0.0,
                      np.where(x < 2 * r + p, 0.5 * (x - r - p) - r / (2 * np.pi) * np.sin(np.pi * up), 0.5 * r))
    int_g = int_down + int_up + np.maximum(x - 2 * r - p, 0)
    dist = np.where(k < 0, t, stop_at + k * (period - lost_cycle) + int_g)
    return speed * dist, np.where(k < 0, 1.0, g)


def _loop_path(rng: np.random.Generator, k: int, count: int):
    """An elliptic loop in front of the camera for walker k -> function s (T,) -> xy (T, 2), heading (T,),
    moving (T,) gait amplitude factor."""
    cx = -0.5 + (k + 0.5) / max(count, 1) + rng.uniform(-0.25, 0.25)
    cy = 0.55 + rng.uniform(-0.25, 0.25)
    rx, ry = rng.uniform(1.2, 1.6), rng.uniform(0.45, 0.8)
    theta0, sense = rng.uniform(0, 2 * np.pi), rng.choice([-1.0, 1.0])
    grid = theta0 + sense * np.linspace(0.0, 2 * np.pi, 2049)  # arc-length parametrisation: constant speed
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(rx * np.diff(np.cos(grid)), ry * np.diff(np.sin(grid))))])

    def at(s):
        th = np.interp(np.mod(s, arc[-1]), arc, grid)
        xy = np.stack([cx + rx * np.cos(th), cy + ry * np.sin(th)], axis=-1)
        tangent = sense * np.stack([-rx * np.sin(th), ry * np.cos(th)], axis=-1)
        return xy, np.arctan2(tangent[..., 1], tangent[..., 0]), np.ones_like(s)
    return at


def _line_path(start: np.ndarray, direction: np.ndarray, max_s: float = np.inf):
    """A straight walk from start (2,) along unit direction (2,), stopping after max_s metres."""
    heading = float(np.arctan2(direction[1], direction[0]))

    def at(s):
        moving = np.clip((max_s - s) / 0.3, 0.0, 1.0)  # blends to a standing pose at the end
        s = np.minimum(s, max_s)
        return start + s[..., None] * direction, np.full(s.shape, heading), moving
    return at


def _limb(root: np.ndarray, length: float, angle: np.ndarray, fwd: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(T, 3) joint, swing angle (T,) rad forward from hanging down -> (T, 3) end of the limb."""
    return root + length * (np.sin(angle)[:, None] * fwd - np.cos(angle)[:, None] * up)


def body_parts(xy: np.ndarray, heading: np.ndarray, phase: np.ndarray, amp: np.ndarray):
    """Capsule ends of one person at T instants.

    Args:
        xy: (T, 2) floor position; heading: (T,) yaw rad; phase: (T,) gait phase rad; amp: (T,) gait
            amplitude in [0, 1] (0 = standing).
    Returns:
        a, b: (T, PARTS, 3) segment ends; lateral: (T, 3) unit left vector (for the part frames).
    """
    T = len(xy)
    fwd = np.stack([np.cos(heading), np.sin(heading), np.zeros(T)], axis=1)
    left = np.stack([-np.sin(heading), np.cos(heading), np.zeros(T)], axis=1)
    up = np.tile([0.0, 0.0, 1.0], (T, 1))
    base = np.concatenate([xy, np.zeros((T, 1))], axis=1) + (0.018 * amp * np.cos(2 * phase))[:, None] * up
    a = np.zeros((T, PARTS, 3))
    b = np.zeros((T, PARTS, 3))
    a[:, 0] = base + (HIP_HEIGHT + 0.07) * up
    b[:, 0] = base + (SHOULDER_HEIGHT - 0.02) * up
    a[:, 1] = b[:, 1] = base + 1.66 * up
    for side, sgn, offset in ((0, 1.0, 0.0), (1, -1.0, np.pi)):
        ph = phase + offset
        hip_swing = amp * 0.42 * np.sin(ph)
        knee = amp * (0.15 + 0.45 * np.maximum(0.0, np.sin(ph + 0.6)))
        hip = base + HIP_HEIGHT * up + sgn * HIP_HALF * left
        knee_pt = _limb(hip, THIGH, hip_swing, fwd, up)
        a[:, 6 + 2 * side], b[:, 6 + 2 * side] = hip, knee_pt
        a[:, 7 + 2 * side], b[:, 7 + 2 * side] = knee_pt, _limb(knee_pt, SHIN, hip_swing - knee, fwd, up)
        arm_swing = -amp * 0.38 * np.sin(ph)  # opposite to the leg on the same side
        shoulder = base + SHOULDER_HEIGHT * up + sgn * SHOULDER_HALF * left
        elbow = _limb(shoulder, UPPER_ARM, arm_swing, fwd, up)
        a[:, 2 + 2 * side], b[:, 2 + 2 * side] = shoulder, elbow
        a[:, 3 + 2 * side], b[:, 3 + 2 * side] = elbow, _limb(elbow, FOREARM, arm_swing + 0.25 + 0.2 * amp, fwd, up)
    return a, b, left


def _part_frames(a: np.ndarray, b: np.ndarray, left: np.ndarray) -> np.ndarray:
    """(T, Q, 3) ends, (T, 3) person's left -> (T, Q, 3, 3) rotations [e1 e2 axis] attached to each part
    (axis along a->b, or up for the head; e2 = the person's left, which every limb's swing keeps)."""
    axis = b - a
    n = np.linalg.norm(axis, axis=-1, keepdims=True)
    axis = np.where(n > 1e-9, axis / np.maximum(n, 1e-9), np.array([0.0, 0.0, 1.0]))
    e2 = np.broadcast_to(left[:, None, :], axis.shape)
    e1 = np.cross(e2, axis)
    return np.stack([e1, e2, axis], axis=-1)


class Crowd:
    """The people of a synthetic sequence (walkers, a close crosser, a person walking toward the camera).

    Args:
        walkers: number of people walking elliptic loops; stop_and_go: they stop ~1.5 s and walk on;
        close_crossing / toward_camera: add those people; camera: function (T,) seconds -> (T, 4, 4)
            camera-to-world (their paths are placed relative to the camera); duration: sequence length
            in seconds; seed; speed: walking speed scale.
    """

    def __init__(self, walkers: int, *, stop_and_go: bool = False, close_crossing: bool = False,
                 toward_camera: bool = False, camera=None, duration: float = 3.0, seed: int = 0,
                 speed: float = 1.0):
        rng = np.random.default_rng([seed, _PEOPLE])
        self.paths = []  # (path function s -> (xy, heading, moving); metres/s; stop time or None)
        for k in range(walkers):
            v = rng.uniform(1.1, 1.4) * speed
            stop = 0.5 + 0.45 * k + rng.uniform(0.0, 0.2) if stop_and_go else None
            self.paths.append((_loop_path(rng, k, walkers), v, stop))
        if close_crossing or toward_camera:
            if camera is None:
                raise ValueError('close_crossing / toward_camera need the camera path')
        if close_crossing:
            t_mid = 0.5 * duration
            P = camera(np.array([t_mid]))[0]
            fwd = P[:2, 2] / np.linalg.norm(P[:2, 2])
            centre = P[:2, 3] + 0.85 * fwd  # in front of the camera when it crosses the optical axis
            perp = np.array([fwd[1], -fwd[0]]) * rng.choice([-1.0, 1.0])
            v = 1.2 * speed
            self.paths.append((_line_path(centre - v * t_mid * perp, perp), v, None))
        if toward_camera:  # from 4 m in front of the camera at the start to 0.9 m in front of it at the end
            P0, P1 = camera(np.array([0.0, duration]))
            f0, f1 = (P[:2, 2] / np.linalg.norm(P[:2, 2]) for P in (P0, P1))
            start, end = P0[:2, 3] + 4.0 * f0, P1[:2, 3] + 0.9 * f1
            length = float(np.linalg.norm(end - start))
            v = float(np.clip(length / duration, 0.8, 1.5)) * speed
            self.paths.append((_line_path(start, (end - start) / length, max_s=length), v, None))
        clothes = np.random.default_rng([seed, _CLOTHES]).uniform(0.1, 0.9, size=(len(self.paths), 3, 3))
        clothes[:, 2] = [0.85, 0.62, 0.5] * np.random.default_rng([seed, _CLOTHES, 1]).uniform(
            0.5, 1.1, size=(len(self.paths), 1))  # skin tones
        self.albedo = clothes[:, _SLOT].reshape(-1, 3)  # (Q, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def state(self, t: np.ndarray) -> PeopleState:
        """(T,) seconds -> PeopleState of every part at those instants."""
        t = np.asarray(t, dtype=np.float64)
        A, B, F = [], [], []
        for path, v, stop in self.paths:
            s, g = _walked(t, v, stop)
            xy, heading, moving = path(s)
            a, b, left = body_parts(xy, heading, 2 * np.pi * s / STRIDE, np.clip(g, 0.0, 1.0) * moving)
            A.append(a)
            B.append(b)
            F.append(_part_frames(a, b, left))
        q = len(self.paths) * PARTS
        if not q:
            z = np.zeros((len(t), 0, 3))
            return PeopleState(z, z, np.zeros((len(t), 0, 3, 3)), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 3)))
        return PeopleState(np.concatenate(A, axis=1), np.concatenate(B, axis=1), np.concatenate(F, axis=1),
                           np.tile(_RADII, len(self.paths)), np.repeat(np.arange(len(self.paths)), PARTS),
                           self.albedo)


def _first_hit_sphere(o, d, dd, c, r):
    """Entry t of rays o + t d (d: (3, P)) into the sphere (c (3,), r); inf where missed."""
    oc = o - c
    bq = oc @ d
    cq = oc @ oc - r * r
    disc = bq * bq - dd * cq
    with np.errstate(invalid='ignore', divide='ignore'):
        t = (-bq - np.sqrt(np.maximum(disc, 0))) / dd
    return np.where((disc >= 0) & (t > 1e-6), t, np.inf)


def cast_capsule(o: np.ndarray, d: np.ndarray, a: np.ndarray, b: np.ndarray, r: float):
    """First hit of rays with a capsule.

    Args: o (3,) ray origin; d (3, P) directions (any length); a, b (3,) segment ends; r radius.
    Returns: t (P,) entry hit parameter, inf where missed (the capsule is the union of a finite tube and
        two spheres, so its first hit is the nearest of their first hits).
    """
    ab = b - a
    L = float(np.linalg.norm(ab))
    dd = np.einsum('ip,ip->p', d, d)
    t_a = _first_hit_sphere(o, d, dd, a, r)
    t_b = _first_hit_sphere(o, d, dd, b, r) if L > 1e-9 else np.full(d.shape[1], np.inf)
    best = np.minimum(t_a, t_b)
    if L > 1e-9:
        e = ab / L
        w = o - a
        de = e @ d
        d_perp = d - e[:, None] * de
        w_perp = w - e * (w @ e)
        A = np.einsum('ip,ip->p', d_perp, d_perp)
        Bq = 2 * (w_perp @ d_perp)
        C = w_perp @ w_perp - r * r
        disc = Bq * Bq - 4 * A * C
        with np.errstate(invalid='ignore', divide='ignore'):
            t_c = (-Bq - np.sqrt(np.maximum(disc, 0))) / (2 * A)
        y = w @ e + t_c * de
        ok = (disc >= 0) & (A > 1e-12) & (t_c > 1e-6) & (y >= 0) & (y <= L)
        best = np.minimum(best, np.where(ok, t_c, np.inf))
    return best


def _part_rects(state: PeopleState, j: int, pose: np.ndarray, K: np.ndarray, w: int, h: int) -> np.ndarray:
    """(Q, 4) int screen rectangles u0, u1, v0, v1 (inclusive) that each part's bounding box projects into
    (a convex box lies inside its projected corners' hull); u0 = -1 where a corner is behind the camera
    (every ray is a candidate); u0 > u1 where the part is off screen. Vectorised form of scene._screen_cull."""
    lo = np.minimum(state.a[j], state.b[j]) - state.radius[:, None]
    hi = np.maximum(state.a[j], state.b[j]) + state.radius[:, None]
    sel = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing='ij')).reshape(3, -1).T  # (8, 3)
    corners = np.where(sel[None].astype(bool), hi[:, None], lo[:, None])  # (Q, 8, 3)
    pc = (corners - pose[:3, 3]) @ pose[:3, :3]
    z = pc[..., 2]
    behind = np.any(z <= 1e-3, axis=1)
    zs = np.where(z > 1e-3, z, 1.0)
    u, v = project(pc, K, zs)
    rect = np.stack([np.maximum(np.floor(u.min(1)) - 1, 0), np.minimum(np.ceil(u.max(1)) + 1, w - 1),
                     np.maximum(np.floor(v.min(1)) - 1, 0), np.minimum(np.ceil(v.max(1)) + 1, h - 1)], 1)
    rect = rect.astype(np.int64)
    rect[behind] = (-1, w - 1, 0, h - 1)
    return rect


def cast_people(o: np.ndarray, d: np.ndarray, t_best: np.ndarray, state: PeopleState, j: int,
                pose: np.ndarray, K: np.ndarray, w: int, h: int):
    """Nearest people hits of rays ``o + t d`` that are in front of ``t_best``.

    Args:
        o: (3,) origin; d: (3, P) directions of the h x w pixels (P = h * w, row-major) whose intrinsics are
            K (3, 3) with the camera-to-world ``pose`` (4, 4); t_best: (P,) current nearest t (updated in
            place); state: PeopleState; j: which of its instants.
    Returns:
        idx (K,) ray indices hit by a person, part (K,) the part hit (index into the state), normal (K, 3)
        unit surface normal, local (K, 3) hit point in the part's frame (body-attached texture coordinates).
    """
    P = d.shape[1]
    part = np.full(P, -1, np.int64)
    rects = _part_rects(state, j, pose, K, w, h)
    for q in range(len(state.radius)):
        u0, u1, v0, v1 = rects[q]
        if u0 < 0:
            idx = np.arange(P)
        elif u0 > u1 or v0 > v1:
            continue
        else:
            idx = (np.arange(v0, v1 + 1)[:, None] * w + np.arange(u0, u1 + 1)[None, :]).ravel()
        t = cast_capsule(o, d[:, idx], state.a[j, q], state.b[j, q], float(state.radius[q]))
        got = t < t_best[idx]
        if got.any():
            t_best[idx[got]] = t[got]
            part[idx[got]] = q
    hit = np.flatnonzero(part >= 0)
    q = part[hit]
    pts = (o[:, None] + t_best[hit] * d[:, hit]).T  # (K, 3)
    a, b = state.a[j, q], state.b[j, q]  # (K, 3)
    ab = b - a
    y = np.clip(np.einsum('ki,ki->k', pts - a, ab) / np.maximum(np.einsum('ki,ki->k', ab, ab), 1e-12), 0.0, 1.0)
    normal = (pts - (a + y[:, None] * ab)) / state.radius[q][:, None]
    local = np.einsum('kji,kj->ki', state.frames[j, q], pts - a)
    return hit, q, normal, local
