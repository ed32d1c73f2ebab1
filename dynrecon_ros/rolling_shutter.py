"""Rolling shutter and depth delay in the RGB-D pose step: when each pixel was seen, where the camera was then.

A rolling-shutter sensor reads its rows top to bottom over ``readout`` seconds: row v of a frame is
seen at ``row_offsets(v)`` seconds from the frame's instant (the middle row's time, the stamp's pose);
a depth image taken ``depth_delay`` s after the colour one (registered to it) sees its row v that much
later, so a depth point and a colour pixel of one pixel are seen from two camera poses. Within a
frame the camera moves by a twist-valued polynomial of the instant s, sum_k s^k / k! c_k in the
camera's own axes (:func:`motion_offsets`; c_1 = (v (3,) m/s, omega (3,) rad/s) the body twist, c_2
its rate), so the camera of offset s sits at exp(M(s)) in the frame-instant camera (to first order:
rotation and translation M(s); the rotation is < 0.2 degree at the speeds of a hand-held camera,
where the second-order terms are below 1e-6 rad). A constant twist (order 1) is not enough for
hand tremor: see :class:`PairShutter`. The motions start from the pair's relative pose and time
(:func:`pair_twist`) and are refined with the pose (:class:`PairShutter`); a long pair takes each frame's
velocity from the aligned trajectory instead (:func:`trajectory_velocity`), and once a frame has aligned frames on
both sides its pairs are refined again with its whole in-frame motion from them (:func:`band_derivatives`;
dynrecon_ros.rgbd_step.RGBDStep._smooth_motions). Readout and delay 0:
the model is off (the predictor does not build one), so such a sequence is processed exactly as before.

Written by hand: OpenCV, Open3D and the odometry libraries we use model global shutters only (Kerl et
al., ICCV 2015, do it with B-splines inside their own tracker, which we do not embed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import null_space
from scipy.spatial.transform import Rotation


@dataclass(frozen=True)
class ShutterModel:
    """Timing of the sensor: ``readout`` s from the first to the last row (0 = global shutter),
    ``depth_delay`` s from the colour image to the depth image."""

    readout: float = 0.0
    depth_delay: float = 0.0

    @property
    def active(self) -> bool:
        return self.readout != 0.0 or self.depth_delay != 0.0

    def row_offsets(self, v: np.ndarray, height: int, depth: bool = False) -> np.ndarray:
        """(n,) pixel rows (float ok) of an image ``height`` rows high -> (n,) float64 seconds from the
        frame instant (the middle row's): ((v + 0.5) / height - 0.5) readout (+ depth_delay: depth)."""
        s = ((np.asarray(v, dtype=np.float64) + 0.5) / height - 0.5) * self.readout
        return s + self.depth_delay if depth else s


class PairShutter:
    """A pair's rolling shutter inside the direct refinement of T_i_j (pose of j in i).

    The refinement's unknowns grow by the two frames' in-frame motions nu = [motion_i, motion_j]
    (2 x 6 ``order``): each frame's camera moves within its readout by the twist-valued polynomial
    sum_k s^k / k! c_k of the row's instant s (:func:`motion_offsets`; c_1 the body twist, c_2 its
    rate). Hand-held tremor (4-12 Hz) is not a constant velocity over a 25 ms readout (a 12 Hz
    rotation's phase turns by ~55 degrees in 12.5 ms): on the renderer's jitter (static room, every
    sensor effect, 320x240, 90 adjacent pairs of seeds 102 / 104) a constant twist (order 1) leaves
    the pairs 5.4 / 5.3 mm off, order 2 3.1 / 3.7 mm (the renderer's exact in-frame motion: 1.9 mm
    on 104, a global-shutter sensor 1.4 mm); order 3 did not do better (3.6 / 4.0 mm). A pair
    observes mostly the difference of the two frames' motions; Gaussian priors hold their common
    part: around the motion known from the frame's earlier pair (sigma x ``known_scale``) or else the
    pair's mean velocity and zero for the higher terms.

    Args:
        model: the sensor's :class:`ShutterModel`; rows_i: (n,) rows of the refined pixels of i;
        height: image rows; K_j: (3, 3) intrinsics of j; dt: t_j - t_i (s);
        twist_i, twist_j: (6 k,) in-frame motions of the frames when known from earlier pairs, else
            None (a shorter one is extended with unknown higher terms).
        sigma_v, sigma_w: prior spread of an unknown twist (m/s, rad/s); order: terms per frame;
        sigma_higher: ((m/s^2, rad/s^2), (m/s^3, rad/s^3)) prior spreads of the higher terms (hand
            tremor: accelerations up to a few m/s^2 and ~10 rad/s^2, x ~75 /s per order at 12 Hz;
            (20, 40) instead of (5, 10) m/s^2, rad/s^2 left the pairs 10 % further off).
        velocity_i, velocity_j: (v (3,) m/s, sigma m/s) a frame's velocity known from elsewhere (the
            aligned trajectory, :func:`trajectory_velocity`), or None: its in-frame velocity (the first
            3 terms) starts there and its prior is centred there with that spread (the rest as above).
        held_i, held_j: ((6 order,) motion, (6 order,) spreads) a frame's whole in-frame motion known from
            elsewhere (the smoothed trajectory, :func:`band_derivatives`), or None: it starts there and its
            prior is centred there with those spreads (instead of all of the above for that frame).
    """

    def __init__(self, model: ShutterModel, rows_i: np.ndarray, height: int, K_j: np.ndarray, dt: float,
                 twist_i: np.ndarray | None = None, twist_j: np.ndarray | None = None,
                 sigma_v: float = 0.2, sigma_w: float = 0.5, known_scale: float = 0.5, order: int = 1,
                 sigma_higher: tuple = ((5.0, 10.0), (400.0, 800.0)), velocity_i: tuple | None = None,
                 velocity_j: tuple | None = None, held_i: tuple | None = None, held_j: tuple | None = None):
        if not 1 <= order <= 1 + len(sigma_higher):
            raise ValueError(f'order must be in [1, {1 + len(sigma_higher)}], got {order}')
        self.model, self.height, self.dt, self.order = model, height, dt, order
        self.s_i = model.row_offsets(rows_i, height)  # (n,) colour instants of i's pixels
        self.s_id = model.row_offsets(rows_i, height, depth=True)  # (n,) their depth readings' instants
        self.fy, self.cy = float(K_j[1, 1]), float(K_j[1, 2])
        self.known = tuple(None if tw is None else np.asarray(tw, dtype=np.float64)[:6 * order]
                           for tw in (twist_i, twist_j))
        sig = np.concatenate([[sigma_v] * 3 + [sigma_w] * 3]
                             + [[a] * 3 + [b] * 3 for a, b in sigma_higher[:order - 1]])
        self.velocity = tuple(None if vel is None else (np.asarray(vel[0], dtype=np.float64), float(vel[1]))
                              for vel in (velocity_i, velocity_j))
        prior = []
        for tw, vel in zip(self.known, self.velocity):
            scale = np.ones(6 * order)
            if tw is not None:
                scale[:len(tw)] = known_scale
            sd = sig * scale
            if vel is not None:
                sd[:3] = vel[1]
            prior.append(sd)
        self.held = tuple(None if hd is None else tuple(np.asarray(a, dtype=np.float64)[:6 * order] for a in hd)
                          for hd in (held_i, held_j))
        for k, hd in enumerate(self.held):
            if hd is not None:
                prior[k] = hd[1]
        self.prior = np.concatenate(prior) ** -2.0
        self.nu = self.nu0 = None

    def start(self, T_i_j: np.ndarray) -> None:
        """Initial motions (2 x 6 order): the known ones, the pair's mean velocity (and zero higher
        terms) for the others."""
        m = 6 * self.order
        pair = np.zeros(m)
        pair[:6] = pair_twist(T_i_j, self.dt)
        nu0 = []
        for tw, vel, hd in zip(self.known, self.velocity, self.held):
            x = pair.copy()
            if tw is not None:
                x[:len(tw)] = tw
            if vel is not None:
                x[:3] = vel[0]
            if hd is not None:
                x = hd[0].copy()
            nu0.append(x)
        self.nu0 = np.concatenate(nu0)
        self.nu = self.nu0.copy()

    @property
    def twist_i(self) -> np.ndarray:
        """(6 order,) in-frame motion of i (the first 6: its body twist)."""
        return self.nu[:6 * self.order]

    @property
    def twist_j(self) -> np.ndarray:
        return self.nu[6 * self.order:]

    def _move(self, X: np.ndarray, T_j_i: np.ndarray, s_i: np.ndarray, depth: bool):
        """(n, 3) points of i seen at instants s_i -> (points in j's frame-instant camera (n, 3), their
        instants in j (n,) from the row they project to, the points in the cameras of those instants)."""
        Y = to_frame_instant(X, s_i, self.twist_i) @ T_j_i[:3, :3].T + T_j_i[:3, 3]
        v = self.fy * Y[:, 1] / np.maximum(Y[:, 2], 1e-6) + self.cy
        s_j = self.model.row_offsets(v, self.height, depth)
        return Y, s_j, from_frame_instant(Y, s_j, self.twist_j)

    def points(self, X: np.ndarray, T_j_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3) points of i's depth readings (camera coordinates of their pixels) -> ((n, 3) in the
        camera of the colour row of j they project to, (n, 3) in that of the depth row; the same array
        without a depth delay). The row is the frame-instant projection's (it moves < 1 pixel)."""
        self._X, self._R = X, T_j_i[:3, :3]
        self._Y, self.s_j, Yc = self._move(X, T_j_i, self.s_i, False)
        if self.model.depth_delay == 0:
            self._Yd, self.s_jd = self._Y, self.s_j
            return Yc, Yc
        self._Yd, self.s_jd, Yd = self._move(X, T_j_i, self.s_id, True)
        return Yc, Yd

    def columns(self, a: np.ndarray, ok: np.ndarray, depth: bool = False) -> np.ndarray:
        """(m, 3) derivatives of m residuals by the points of :meth:`points` (those of ``ok``, an (n,)
        bool mask or indices, of the last call; the depth points with ``depth``) -> (m, 12 order)
        derivatives by nu (first order in the instants; term k of a frame scales by s^k / k!)."""
        b = a @ self._R  # R^T a: the residual's derivative by i's frame-instant point
        Y, s_i, s_j = (self._Yd, self.s_id, self.s_jd) if depth else (self._Y, self.s_i, self.s_j)
        X, Y, si, sj = self._X[ok], Y[ok], s_i[ok, None], s_j[ok, None]
        ci = np.concatenate([b, np.cross(X, b)], 1)
        cj = -np.concatenate([a, np.cross(Y, a)], 1)
        fi, fj = _powers(si, self.order), _powers(sj, self.order)
        return np.concatenate([f * ci for f in fi] + [f * cj for f in fj], 1)

    def normal_prior(self) -> tuple[np.ndarray, np.ndarray]:
        """(12 order, 12 order) information and (12 order,) gradient of the motions' prior at nu."""
        return np.diag(self.prior), self.prior * (self.nu - self.nu0)


def _powers(s: np.ndarray, order: int) -> list:
    """s (any shape) -> [s^k / k! for k = 1..order]."""
    out, f = [], np.ones_like(s)
    for k in range(1, order + 1):
        f = f * s / k
        out.append(f)
    return out


def motion_offsets(s: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """(n,) instants s from the frame's, (6 k,) in-frame motion [c_1, ..., c_k] (c_1 the body twist
    [v, omega] in m/s, rad/s; c_m its (m-1)-th time derivative) -> (n, 6) the camera's displacement
    sum_m s^m / m! c_m (first order: translation, rotation vector) from the frame instant."""
    s = np.asarray(s, dtype=np.float64)
    c = np.asarray(motion, dtype=np.float64).reshape(-1, 6)
    return np.stack(_powers(s, len(c)), -1) @ c


def pair_twist(T_i_j: np.ndarray, dt: float) -> np.ndarray:
    """(4, 4) pose of frame j in frame i, dt = t_j - t_i (s) -> (6,) constant body twist [v, omega]
    (m/s, rad/s) in i's axes that carries i to j in dt (rotation vector / dt, translation / dt; zeros
    when dt is not positive)."""
    if not dt > 0:
        return np.zeros(6)
    w = Rotation.from_matrix(np.asarray(T_i_j)[:3, :3]).as_rotvec()
    return np.concatenate([np.asarray(T_i_j)[:3, 3], w]) / dt


def trajectory_velocity(T_w_a: np.ndarray, T_w_e: np.ndarray, T_w_b: np.ndarray | None, h1: float,
                        h2: float = 0.0) -> np.ndarray | None:
    """The camera's velocity at frame e from its neighbours' poses: (4, 4) camera-to-world poses of the
    previous frame a, of e and of the next frame b (None: not known yet), h1 = t_e - t_a, h2 = t_b - t_e (s)
    -> (3,) m/s in e's axes, or None when a spacing is not positive.

    With b: the central difference (h1^2 x_b - h2^2 x_a) / (h1 h2 (h1 + h2)) of the positions x_a, x_b of a
    and b in e's camera (exact for a quadratic path); without: the backward difference -x_a / h1. On the
    renderer's hand-held path with jitter (every_effect seeds 700-702, 90 frames at 30 Hz, poses 1 mm /
    0.01 degree off) they are 0.040-0.042 / 0.070-0.075 m/s RMS off the true in-frame velocity, where a
    pair's refinement fits it to 0.11-0.12 m/s (uncorrelated with the truth). The angular rate is not
    taken from the poses: a 12 Hz tremor turns 1.5 radians between frames and a difference keeps a
    quarter of it (0.08 rad/s RMS off, worse than the fit).
    """
    if not h1 > 0 or (T_w_b is not None and not h2 > 0):
        return None
    inv = np.linalg.inv(np.asarray(T_w_e, dtype=np.float64))
    xa = (inv @ T_w_a)[:3, 3]
    if T_w_b is None:
        return -xa / h1
    xb = (inv @ T_w_b)[:3, 3]
    return (h1 * h1 * xb - h2 * h2 * xa) / (h1 * h2 * (h1 + h2))


def band_derivatives(T_w: np.ndarray, t: np.ndarray, band_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """The camera's motion at one frame from its neighbours' poses, for motion band-limited below ``band_hz``.

    T_w: (m, 4, 4) camera-to-world poses of the frame and its neighbours (any order), t: (m,) their instants, s
    from the frame's (the frame itself at 0) -> ((6,), (6,)) the first and second time derivatives at 0 of the
    displacement [translation (m), rotation vector (rad)] in the frame's axes: its body twist [v, omega] and
    that twist's rate (the c_1, c_2 of :func:`motion_offsets`).

    A frame difference only keeps the slow part of the motion: hand tremor (4-12 Hz) turns by 1.5 radian between
    frames at 30 Hz, and the central difference keeps sin(x) / x of it (a quarter at 12 Hz). The weights here are
    exact for polynomials up to degree 3 and, within that, the least-squares fit at the samples' own instants of
    the derivative of every sinusoid from 0 to ``band_hz`` (they need samples on both sides: with 4 each side at 30
    frames/s and a 12 Hz band the rate comes out 0.96-1.03 of the true one up to 8 Hz, 0.86 at 12 Hz; the frame
    rate's Nyquist limit bounds what any does). Written by hand: scipy's differentiators (savgol, splines) fit
    polynomials, which leave the same attenuation as a difference.
    """
    T_w = np.asarray(T_w, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    me = int(np.argmin(np.abs(t)))
    inv = np.linalg.inv(T_w[me])
    others = np.flatnonzero(np.arange(len(t)) != me)
    if len(others) < 4:  # the cubic's three conditions leave no freedom for the band with fewer
        raise ValueError(f'band_derivatives needs the frame and at least 4 other poses, got {len(others)} others')
    rel = inv @ T_w[others]
    d = np.concatenate([rel[:, :3, 3], Rotation.from_matrix(rel[:, :3, :3]).as_rotvec()], 1)  # (m-1, 6)
    tk = t[others] - t[me]
    w = 2 * np.pi * np.linspace(band_hz / 64, band_hz, 64)
    ph = np.outer(w, tk)
    exact = np.stack([tk ** j / math.factorial(j) for j in range(1, 4)])  # (3, m-1) Taylor terms: held exactly
    null = null_space(exact)
    out = []
    for order in (1, 2):
        # weights = a particular solution of the Taylor conditions + the null space's part that fits the band best:
        # rows the sin / cos parts of exp(i w t) - 1 against (i w)^order, relative
        wp = np.linalg.lstsq(exact, (np.arange(1, 4) == order).astype(float), rcond=None)[0]
        a = np.vstack([np.sin(ph), np.cos(ph) - 1]) / np.concatenate([w, w])[:, None] ** order
        b = np.concatenate([np.ones(len(w)), np.zeros(len(w))] if order == 1 else [np.zeros(len(w)), -np.ones(len(w))])
        z = np.linalg.lstsq(a @ null, b - a @ wp, rcond=None)[0]
        out.append((wp + null @ z) @ d)
    return out[0], out[1]


def to_frame_instant(X: np.ndarray, s: np.ndarray, twist: np.ndarray) -> np.ndarray:
    """(n, 3) points in the camera of their own instants s (n,) s -> (n, 3) in the frame-instant camera:
    X + s (omega x X + v) (first-order exp(s twist) applied to X); a (6 k,) in-frame motion
    (:func:`motion_offsets`) moves them by its displacement at s instead."""
    if len(twist) > 6:
        d = motion_offsets(s, twist)
        return X + np.cross(d[:, 3:], X) + d[:, :3]
    s = np.asarray(s, dtype=np.float64)[:, None]
    return X + s * (np.cross(twist[3:], X) + twist[:3])


def from_frame_instant(Y: np.ndarray, s: np.ndarray, twist: np.ndarray) -> np.ndarray:
    """(n, 3) points in the frame-instant camera -> (n, 3) in the camera of instants s (n,): the inverse
    of :func:`to_frame_instant` to first order, Y - s (omega x Y + v)."""
    if len(twist) > 6:
        d = motion_offsets(s, twist)
        return Y - np.cross(d[:, 3:], Y) - d[:, :3]
    s = np.asarray(s, dtype=np.float64)[:, None]
    return Y - s * (np.cross(twist[3:], Y) + twist[:3])


def ego_points(X: np.ndarray, Y: np.ndarray, rows: np.ndarray, R_j_i: np.ndarray, model: ShutterModel,
               twist_i: np.ndarray, twist_j: np.ndarray, height: int, K_j: np.ndarray) -> np.ndarray:
    """Frame i's points as the colour camera of j sees them, under the rolling shutter (ego flow).

    Args:
        X: (..., 3) points of i's pixels in i's camera (a pixel's depth reading on its colour ray:
            the colour pixel is what the flow follows); Y: (..., 3) the same moved into j's camera by
            the frames' poses (R_j_i X + t_j_i, global shutter); rows: (...) their pixel rows in i;
            R_j_i: (3, 3).
        model, twist_i, twist_j: the sensor's timing and the frames' in-frame motions ((6,) body twists or
            (6 k,) :func:`motion_offsets` polynomials); height: image rows.
        K_j: (3, 3) intrinsics of j.
    Returns (..., 3) float32 points in the camera of the row of j each projects to (:func:`ego_planes`
    on the coordinate planes).
    """
    X, Y = np.asarray(X), np.asarray(Y)
    out = ego_planes(np.moveaxis(X, -1, 0), np.moveaxis(Y, -1, 0), rows, R_j_i, model, twist_i, twist_j,
                     height, K_j)
    return np.stack(out, -1)


def ego_planes(X, Y, rows, R_j_i: np.ndarray, model: ShutterModel, twist_i: np.ndarray, twist_j: np.ndarray,
               height: int, K_j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`ego_points` on coordinate planes: X (x, y, z) of i's points, three arrays that broadcast
    together to a shape S (e.g. an (H, W) plane and a (1, W) row); Y (x, y, z) of shape S; rows: i's
    pixel rows, broadcastable to S (an (H, 1) column: each row's displacement computed once) ->
    (x, y, z) float32 of shape S.

    Float64 throughout, as the (N, 3) formulation it replaces (frame i's displacement
    to_frame_instant(X) - X = omega(s) x X + v(s), rotated into j; then :func:`from_frame_instant` at
    the instant of the row of j each point projects to); plain per-component arithmetic instead of
    np.cross and matmuls (BLAS multithreads them and fuses multiply-adds): the float64 results differ
    from those by rounding only (< 1e-15 relative), the float32 ones not in practice. Computed in blocks of
    ~``_BLOCK`` elements along the first axis (the same values): the ~30 float64 temporaries of a block stay in
    the core's cache (a whole 320x240 plane of them did not: 2-3x the CPU time).
    """
    X = [np.asarray(a) for a in X]
    Y = [np.asarray(a) for a in Y]
    rows = np.asarray(rows)
    shape = np.broadcast_shapes(*(a.shape for a in X + Y), rows.shape)
    n = shape[0] if shape else 1
    step = max(1, _BLOCK // max(1, int(np.prod(shape[1:], dtype=np.int64))))
    if n <= step:
        return _ego_block(X, Y, rows, R_j_i, model, twist_i, twist_j, height, K_j)
    out = tuple(np.empty(shape, np.float32) for _ in range(3))

    def cut(a, sl):  # the block of an array that spans the first axis; one broadcast along it as it is
        return a[sl] if a.ndim == len(shape) and a.shape[0] == n else a
    for r0 in range(0, n, step):
        sl = slice(r0, r0 + step)
        for o, b in zip(out, _ego_block([cut(a, sl) for a in X], [cut(a, sl) for a in Y], cut(rows, sl), R_j_i,
                                        model, twist_i, twist_j, height, K_j)):
            o[sl] = b
    return out


_BLOCK = 8192  # elements of ego_planes' blocks (64 KiB per float64 temporary)


def _ego_block(X, Y, rows, R_j_i, model, twist_i, twist_j, height, K_j):
    """:func:`ego_planes` of one block (arrays as there)."""
    d = _displacement(model.row_offsets(rows, height), twist_i)
    X0, X1, X2 = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in X))
    # (omega x X + v) of frame i, then rotated into j and added to Y: Yf (3, S)
    a0 = d[4] * X2
    a0 -= d[5] * X1
    a0 += d[0]
    a1 = d[5] * X0
    a1 -= d[3] * X2
    a1 += d[1]
    a2 = d[3] * X1
    a2 -= d[4] * X0
    a2 += d[2]
    R = np.asarray(R_j_i, dtype=np.float64)
    Yf = []
    for m in range(3):
        y = np.multiply(a0, R[m, 0])
        y += a1 * R[m, 1]
        y += a2 * R[m, 2]
        ym = np.asarray(Y[m], dtype=np.float64)
        Yf.append(np.add(y, ym, out=y if np.broadcast_shapes(y.shape, ym.shape) == y.shape else None))
    with np.errstate(divide='ignore', invalid='ignore'):
        v = Yf[1] * K_j[1, 1]
        v /= Yf[2]
        v += K_j[1, 2]
    mid = height / 2
    s = model.row_offsets(np.nan_to_num(v, copy=False, nan=mid, posinf=mid, neginf=mid), height)
    # the displacement of frame j at each point's instant s (per point: the row it projects to)
    dj = _displacement(s, twist_j)
    out = []
    for m, (a, b) in enumerate(((1, 2), (2, 0), (0, 1))):  # Y - (omega x Y) - v
        cr = dj[3 + a] * Yf[b]
        cr -= dj[3 + b] * Yf[a]
        o = np.subtract(Yf[m], cr, out=cr)
        o -= dj[m]
        out.append(o.astype(np.float32))
    return tuple(out)


def _displacement(s: np.ndarray, motion: np.ndarray) -> list:
    """:func:`motion_offsets` per component: instants s (any shape) -> 6 arrays of s's shape (translation,
    rotation vector), each sum_m s^m / m! c_m (elementwise: no BLAS call)."""
    c = np.asarray(motion, dtype=np.float64).reshape(-1, 6)
    p = _powers(np.asarray(s, dtype=np.float64), len(c))
    out = []
    for m in range(6):
        e = p[0] * c[0, m]
        for k in range(1, len(c)):
            e += p[k] * c[k, m]
        out.append(e)
    return out
