"""The RGB-D pose step's depth readings smoothed under a rolling shutter: the older frame's fit points and the
direct refinement's depth slopes (:class:`dynrecon_ros.predictors.rgbd.RGBDPredictor`, backend.refine_slope_sigmas).

Both cut a structured-light sensor's noise and disparity steps and keep depth edges and holes; the predictor
makes them once per frame (its stage A)."""
from __future__ import annotations

import cv2
import numpy as np

from dynrecon_ros.depth_cue import depth_sigma


def slope_depth(depth: np.ndarray, inverse_sigma: float) -> np.ndarray:
    """(H, W) float32 depth (m, 0 = none) whose slopes the refinement's depth rows take, and the depth of the
    pose fits' points under a rolling shutter: the readings smoothed in inverse depth by an edge-preserving
    bilateral filter (5 px, range sigma ``inverse_sigma`` 1/m, space sigma 2 px); holes stay holes.

    Why: a structured-light sensor measures disparity in steps (Kinect v1: 7 cm of depth at 5 m) with
    noise, both uniform in inverse depth, so its readings of a smooth wall are noisy terraces whose raw
    slopes are 0 on a terrace and a spike at each step. Those slopes are the depth rows' Jacobian, also in
    the columns of the frames' in-frame motions under a rolling shutter, where they bias the split between
    the pose and those motions: the smoothed slopes bring the adjacent pairs of a static room with every
    sensor effect ~10 % closer and every_effect's trajectories ~7 % (docs/MEASUREMENTS.md, session 37); as the
    fit points instead of :func:`point_depth`'s median (which keeps the terraces) pairs 5 frames apart ~8 % and
    the trajectories another ~5 % (session 38). On exact depth it moves the readings by up to ~3 cm at small
    edges (what a Kinect's noise hides): a sensor without that noise has a noise model without the z^2 term.
    Steps and noise smooth out; a real depth edge (2 m before 5 m: 0.3 1/m) is kept. OpenCV's bilateral
    filter; no library smooths depth in inverse depth, hence the two lines around it."""
    z = np.asarray(depth, dtype=np.float32)
    inv = np.where(z > 0, 1.0 / np.maximum(z, 1e-3), 0.0).astype(np.float32)
    smooth = cv2.bilateralFilter(inv, 5, float(inverse_sigma), 2.0)
    return np.where((z > 0) & (smooth > 0), 1.0 / np.maximum(smooth, 1e-6), 0.0).astype(np.float32)


def point_depth(depth: np.ndarray, sigma_a: float, sigma_b: float) -> np.ndarray:
    """(H, W) float32 depth for a frame's 3D points in the pose fits under a rolling shutter when
    backend.refine_slope_sigmas is 0 (else :func:`slope_depth`'s smoothed readings): the 5 x 5 median of
    the cleaned ``depth`` (readings > 0, else 0) where it lies within 3 sigma(z) of the reading (the sensor's
    model ``sigma_a + sigma_b (z - 0.4)^2``), else the reading (an edge, a hole's border: 0 stays 0).

    Why: the older frame's points are the regressors of the pair fit, and their depth noise is an errors-in-
    variables noise. Under a rolling shutter the fit splits the image motion between the pair's translation and
    the two frames' in-frame motions, which look alike, and the noise biases that split: the trajectory came out
    0.5-1.5 % short with Kinect depth (static_effects 852-854, Sim(3) scale 1.0049 / 1.0035 / 1.0153; 1.000 without
    the noise, or with it under a global shutter). The median cuts the noise ~3x: 0.9989 / 0.9991 / 1.0077. Under a
    global shutter the fits are unbiased and exact depth is worth more (a median moves curved surfaces by a
    fraction of a sigma): not used there (docs/MEASUREMENTS.md)."""
    med = cv2.medianBlur(np.ascontiguousarray(depth, dtype=np.float32), 5)
    near = np.abs(med - depth) < 3.0 * depth_sigma(depth, sigma_a, sigma_b)
    return np.where((depth > 0) & near, med, depth)
