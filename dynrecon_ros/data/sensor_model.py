"""Sensor effects of the synthetic renderer: Kinect v1 depth, exposure, colour noise, shutter, jitter.

Depth (a structured-light sensor registered to the colour camera, like the Kinect v1 of TUM RGB-D):
    axial noise   sigma_z(z) = 0.0012 + 0.0019 (z - 0.4)^2 m (Nguyen, Izadi, Lovell 2012, their fit
                  for surfaces at 10-60 deg; valid from 0.4 m);
    quantisation  the sensor measures disparity d = f b / z in 1/8 pixel steps (f = 580 px at its native
                  640 px width, b = 7.5 cm), so z steps grow with z^2 (2.6 cm at 3 m, 7 cm at 5 m);
    silhouettes   no reading where the projector's pattern cannot reach (the shadow that a nearer surface
                  casts, beside every depth discontinuity, on the side away from the projector) and a
                  band of `edge_px` pixels on both sides of every discontinuity;
    range         no reading closer than 0.4 m or beyond `max_range`;
    random blobs  synthetic._holes (a fraction of the pixels in smooth blobs).
Colour: auto-exposure flicker (a per-frame gain), additive Gaussian colour noise, motion blur (the
caller averages sub-frame renders over the exposure), rolling shutter (rows read out over a time; the
depth image's rows too, at the same offsets).
Camera: hand-held jitter (a few Hz of small rotations and translations on top of the smooth path).

Noise models here are formulas of the literature applied per pixel with numpy (no library simulates
a Kinect's depth from a depth image, hence hand-written).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

KINECT_FOCAL_NATIVE = 580.0  # px, IR camera at 640x480
KINECT_BASELINE = 0.075  # m, projector to IR camera
DISPARITY_STEP = 1.0 / 8.0  # px
KINECT_MIN_RANGE = 0.4  # m
JITTER_FREQS = (3.7, 5.9, 8.3, 11.9)  # Hz, hand tremor band
BLUR_SAMPLES = 5  # sub-frames averaged over the exposure (odd: the middle one is the frame instant)
SHUTTER_BANDS = 8  # row bands rendered at their own instants under a rolling shutter


def kinect_sigma(z: np.ndarray) -> np.ndarray:
    """(...) depth m -> (...) axial noise std m (Nguyen et al. 2012)."""
    return 0.0012 + 0.0019 * (np.asarray(z) - 0.4) ** 2


def quantise_disparity(z: np.ndarray) -> np.ndarray:
    """(...) depth m (> 0) -> depth rounded to the nearest 1/8 px disparity step of the native sensor."""
    fb = KINECT_FOCAL_NATIVE * KINECT_BASELINE
    with np.errstate(divide='ignore'):
        disp = np.round(fb / z / DISPARITY_STEP) * DISPARITY_STEP
        return np.where((z > 0) & (disp > 0), fb / np.maximum(disp, 1e-9), 0.0).astype(z.dtype)


def projector_shadow(depth: np.ndarray, fx: float, baseline: float = KINECT_BASELINE) -> np.ndarray:
    """(H, W) depth m, focal px -> (H, W) bool, True where the projector (``baseline`` m to the camera's
    +x) cannot light the surface: a point whose projector column is reached first by a nearer point.

    Along a row the projector column is u - fx b / z; a point is lit iff no pixel to its right has a
    smaller projector column (the nearer surface is then in front of it, seen from the projector).
    """
    h, w = depth.shape
    z = np.where(depth > 0, depth, np.inf)
    up = np.arange(w)[None, :] - fx * baseline / z  # (H, W); inf depth -> column u
    right_min = np.minimum.accumulate(up[:, ::-1], axis=1)[:, ::-1]  # min over columns >= u
    right_min = np.concatenate([right_min[:, 1:], np.full((h, 1), np.inf)], axis=1)  # strictly right
    return (right_min < up - 0.5) & (depth > 0)


def discontinuity_band(depth: np.ndarray, width_px: int, rel: float = 0.05, abs_m: float = 0.02) -> np.ndarray:
    """(H, W) depth -> (H, W) bool: within ``width_px`` pixels of a depth jump larger than
    rel * z + abs_m between 4-neighbours (both sides of the jump)."""
    z = depth.astype(np.float32)
    jump = np.zeros(z.shape, bool)
    for dz, zmin, sl_a, sl_b in (
            (np.abs(np.diff(z, axis=1)), np.minimum(z[:, 1:], z[:, :-1]), np.s_[:, 1:], np.s_[:, :-1]),
            (np.abs(np.diff(z, axis=0)), np.minimum(z[1:], z[:-1]), np.s_[1:], np.s_[:-1])):
        e = dz > rel * zmin + abs_m
        jump[sl_a] |= e
        jump[sl_b] |= e
    if width_px > 1:
        k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * width_px - 1, 2 * width_px - 1))
        jump = cv2.dilate(jump.astype(np.uint8), k) > 0
    return jump


def kinect_depth(depth: np.ndarray, rng: np.random.Generator | None, fx: float, width: int, *,
                 noise: bool = True, quantise: bool = True, silhouettes: bool = True,
                 max_range: float = 0.0) -> np.ndarray:
    """Kinect v1 depth image from a noise-free one.

    Args:
        depth: (H, W) float32 noise-free z-depth m (0 = no surface); rng: for the noise (None: no noise);
        fx: focal px of this image; width: its width (the discontinuity band is 1 px per 320 px);
        noise / quantise / silhouettes: the effects (module docstring); max_range: m, 0 = none.
    Returns:
        (H, W) float32 depth m, 0 where the sensor gives no reading.
    """
    out = depth.astype(np.float32).copy()
    invalid = depth <= 0
    if silhouettes:
        invalid |= projector_shadow(depth, fx) | discontinuity_band(depth, max(1, round(width / 320)))
    if noise and rng is not None:
        out += (rng.standard_normal(out.shape) * kinect_sigma(depth)).astype(np.float32)
    if quantise:
        out = quantise_disparity(np.maximum(out, 1e-3))
    invalid |= depth < KINECT_MIN_RANGE
    if max_range > 0:
        invalid |= depth > max_range
    out[invalid] = 0.0
    return out


def exposure_gains(t: np.ndarray, seed: int, amount: float) -> np.ndarray:
    """(N,) frame times s -> (N,) auto-exposure gains: a slow hunting oscillation plus frame-to-frame
    steps, relative amplitude ``amount`` (0.1 = +-10 % typical), clipped to [0.5, 1.6]."""
    rng = np.random.default_rng([seed, 21])
    slow = np.sin(2 * np.pi * rng.uniform(0.6, 1.2) * t + rng.uniform(0, 2 * np.pi))
    steps = rng.standard_normal(len(t))
    return np.clip(1.0 + amount * (0.7 * slow + 0.7 * steps), 0.5, 1.6)


def add_colour_noise(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """(H, W, 3) float 0..255 -> same plus independent Gaussian noise of std ``sigma`` levels."""
    return rgb + rng.standard_normal(rgb.shape).astype(rgb.dtype) * sigma


def jitter_poses(poses: np.ndarray, t: np.ndarray, seed: int, amount: float) -> np.ndarray:
    """(N, 4, 4) camera-to-world, (N,) s -> poses with hand-held jitter: rotations of RMS 0.15 deg *
    amount and translations of RMS 1 mm * amount per axis (angular rate RMS ~7 deg/s), sums of sinusoids in JITTER_FREQS with
    random phases (a smooth function of t, so sub-frame instants are consistent)."""
    rng = np.random.default_rng([seed, 22])
    ph = rng.uniform(0, 2 * np.pi, size=(6, len(JITTER_FREQS)))
    waves = np.sin(2 * np.pi * np.asarray(JITTER_FREQS)[None, None, :] * t[:, None, None] + ph[None])  # (N, 6, F)
    w = waves.sum(axis=2) / np.sqrt(len(JITTER_FREQS) / 2)  # unit RMS per component
    rot = Rotation.from_rotvec(np.deg2rad(0.15 * amount) * w[:, :3]).as_matrix()
    delta = np.tile(np.eye(4), (len(t), 1, 1))
    delta[:, :3, :3] = rot
    delta[:, :3, 3] = 0.001 * amount * w[:, 3:]
    return poses @ delta


def blur_offsets(exposure: float) -> np.ndarray:
    """Exposure time s -> (BLUR_SAMPLES,) sub-frame offsets, centred on the frame instant (middle one 0)."""
    if exposure <= 0:
        return np.zeros(1)
    return (np.arange(BLUR_SAMPLES) / (BLUR_SAMPLES - 1) - 0.5) * exposure


def shutter_bands(height: int, readout: float) -> list[tuple[int, int, float]]:
    """Rows and instants of a rolling shutter: [(row0, row1, offset s)], the frame instant at mid-image
    (readout 0: one band of all rows at offset 0)."""
    if readout <= 0:
        return [(0, height, 0.0)]
    edges = np.linspace(0, height, min(SHUTTER_BANDS, height) + 1).round().astype(int)
    return [(int(a), int(b), float(((a + b) / 2 / height - 0.5) * readout)) for a, b in zip(edges[:-1], edges[1:])]
