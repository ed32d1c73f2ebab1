"""Rolling shutter and depth delay in the RGB-D pose step: when each pixel was seen, where the camera was then.

A rolling-shutter sensor reads its rows top to bottom over ``readout`` seconds: row v of a frame is
seen at ``row_offsets(v)`` seconds from the frame's instant (the middle row's time, the stamp's pose);
a depth image taken ``depth_delay`` s after the colour one (registered to it) sees its row v that much
later, so a depth point and a colour pixel of one pixel are seen from two camera poses. Within a
frame the camera moves at a constant body velocity ``twist`` = (v (3,) m/s, omega (3,) rad/s) in the
camera's own axes, so the camera of offset s sits at exp(s twist) in the frame-instant camera (to first
order: rotation s omega, translation s v; s omega is < 0.2 degree at the speeds of a hand-held camera,
where the second-order terms are below 1e-6 rad). The twist comes from the pair's relative pose and
time (:func:`pair_twist`) and is refined with the pose (:class:`PairShutter`). Readout and delay 0:
the model is off (the predictor does not build one), so such a sequence is processed exactly as before.

Written by hand: OpenCV, Open3D and the odometry libraries we use model global shutters only (Kerl et
al., ICCV 2015, do it with B-splines inside their own tracker, which we do not embed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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

    The refinement's unknowns grow by the two frames' body twists nu = [twist_i, twist_j] (12,): a
    hand-held camera's velocity changes within a frame interval (tremor at 4-12 Hz), so the pair's
    mean velocity is not the frames' own (20 deg/s off on the renderer's jitter) and each frame's is
    fitted from the rows' distortion, with a Gaussian prior around the twist known from the frame's
    earlier pair (sigma ``known_scale`` x sigma_v, sigma_w) or else around the pair's mean velocity.

    Args:
        model: the sensor's :class:`ShutterModel`; rows_i: (n,) rows of the refined pixels of i;
        height: image rows; K_j: (3, 3) intrinsics of j; dt: t_j - t_i (s);
        twist_i, twist_j: (6,) body twists of the frames when known from earlier pairs, else None.
        sigma_v, sigma_w: prior spread of an unknown twist (m/s, rad/s).
    """

    def __init__(self, model: ShutterModel, rows_i: np.ndarray, height: int, K_j: np.ndarray, dt: float,
                 twist_i: np.ndarray | None = None, twist_j: np.ndarray | None = None,
                 sigma_v: float = 0.2, sigma_w: float = 0.5, known_scale: float = 0.5):
        self.model, self.height, self.dt = model, height, dt
        self.s_i = model.row_offsets(rows_i, height)  # (n,) colour instants of i's pixels
        self.s_id = model.row_offsets(rows_i, height, depth=True)  # (n,) their depth readings' instants
        self.fy, self.cy = float(K_j[1, 1]), float(K_j[1, 2])
        self.known = (twist_i, twist_j)
        sig = np.array([sigma_v] * 3 + [sigma_w] * 3)
        self.prior = np.concatenate([sig * (known_scale if tw is not None else 1.0) for tw in self.known]) ** -2.0
        self.nu = self.nu0 = None

    def start(self, T_i_j: np.ndarray) -> None:
        """Initial twists (12,): the known ones, the pair's mean velocity for the others."""
        pair = pair_twist(T_i_j, self.dt)
        self.nu0 = np.concatenate([pair if tw is None else tw for tw in self.known])
        self.nu = self.nu0.copy()

    @property
    def twist_i(self) -> np.ndarray:
        return self.nu[:6]

    @property
    def twist_j(self) -> np.ndarray:
        return self.nu[6:]

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
        bool mask or indices, of the last call; the depth points with ``depth``) -> (m, 12) derivatives
        by nu (first order in the instants)."""
        b = a @ self._R  # R^T a: the residual's derivative by i's frame-instant point
        Y, s_i, s_j = (self._Yd, self.s_id, self.s_jd) if depth else (self._Y, self.s_i, self.s_j)
        X, Y, si, sj = self._X[ok], Y[ok], s_i[ok, None], s_j[ok, None]
        return np.concatenate([si * np.concatenate([b, np.cross(X, b)], 1),
                               -sj * np.concatenate([a, np.cross(Y, a)], 1)], 1)

    def normal_prior(self) -> tuple[np.ndarray, np.ndarray]:
        """(12, 12) information and (12,) gradient of the twists' prior at the current nu."""
        return np.diag(self.prior), self.prior * (self.nu - self.nu0)


def pair_twist(T_i_j: np.ndarray, dt: float) -> np.ndarray:
    """(4, 4) pose of frame j in frame i, dt = t_j - t_i (s) -> (6,) constant body twist [v, omega]
    (m/s, rad/s) in i's axes that carries i to j in dt (rotation vector / dt, translation / dt; zeros
    when dt is not positive)."""
    if not dt > 0:
        return np.zeros(6)
    w = Rotation.from_matrix(np.asarray(T_i_j)[:3, :3]).as_rotvec()
    return np.concatenate([np.asarray(T_i_j)[:3, 3], w]) / dt


def to_frame_instant(X: np.ndarray, s: np.ndarray, twist: np.ndarray) -> np.ndarray:
    """(n, 3) points in the camera of their own instants s (n,) s -> (n, 3) in the frame-instant camera:
    X + s (omega x X + v) (first-order exp(s twist) applied to X)."""
    s = np.asarray(s, dtype=np.float64)[:, None]
    return X + s * (np.cross(twist[3:], X) + twist[:3])


def from_frame_instant(Y: np.ndarray, s: np.ndarray, twist: np.ndarray) -> np.ndarray:
    """(n, 3) points in the frame-instant camera -> (n, 3) in the camera of instants s (n,): the inverse
    of :func:`to_frame_instant` to first order, Y - s (omega x Y + v)."""
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
        model, twist_i, twist_j: the sensor's timing and the frames' body twists (6,); height: image rows.
        K_j: (3, 3) intrinsics of j.
    Returns (..., 3) float32 points in the camera of the row of j each projects to.
    """
    shape = X.shape
    s_i = model.row_offsets(np.asarray(rows).reshape(-1), height)
    X = X.reshape(-1, 3).astype(np.float64)
    Yf = Y.reshape(-1, 3).astype(np.float64) + (to_frame_instant(X, s_i, twist_i) - X) @ R_j_i.T
    with np.errstate(divide='ignore', invalid='ignore'):
        v = K_j[1, 1] * Yf[:, 1] / Yf[:, 2] + K_j[1, 2]
    mid = height / 2
    s_j = model.row_offsets(np.nan_to_num(v, nan=mid, posinf=mid, neginf=mid), height)
    return from_frame_instant(Yf, s_j, twist_j).reshape(shape).astype(np.float32)
