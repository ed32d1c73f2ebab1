"""One brightness (exposure) gain between two frames' grey levels.

Auto-exposure changes a frame's brightness by a common factor; the photometric terms compare
``I_j`` with ``gain * I_i``: the RGB-D pose step's direct refinement
(:func:`dynrecon_ros.predictors.direct_refinement.photometric_refine`), the segmentation's appearance check
(:func:`dynrecon_ros.flow_cue.ego_explains_appearance`) and the hold's grey check
(:mod:`dynrecon_ros.permanence`) all take it from :func:`exposure_gain`.
"""
from __future__ import annotations

import numpy as np

MIN_LEVEL = 8.0  # grey levels: darker pixels give no usable ratio (noise, clipping)
MIN_SAMPLES = 100
BOUNDS = (0.2, 5.0)  # a ratio outside is not an exposure change (wrong correspondences): gain 1


def exposure_gain(seen_j: np.ndarray, gray_i: np.ndarray) -> float:
    """The gain of frame j over frame i: the median over samples of ``seen_j / gray_i``.

    Args:
        seen_j: (...) frame j's grey levels where frame i's samples should be (NaN = not seen).
        gray_i: (...) frame i's grey levels, same shape.
    Returns 1.0 with fewer than MIN_SAMPLES samples brighter than MIN_LEVEL in i, or a median ratio
    outside BOUNDS. The median of the per-sample ratios, not the ratio of the medians: a mover or an
    occlusion covering part of the samples shifts one median but not the other's matching part.
    """
    seen_j = np.asarray(seen_j, dtype=np.float64)
    gray_i = np.asarray(gray_i, dtype=np.float64)
    ok = np.isfinite(seen_j) & (gray_i > MIN_LEVEL)
    if np.count_nonzero(ok) <= MIN_SAMPLES:
        return 1.0
    gain = fast_median(seen_j[ok] / gray_i[ok])
    return gain if BOUNDS[0] < gain < BOUNDS[1] else 1.0


def fast_median(a: np.ndarray) -> float:
    """np.median of a 1-d array without NaN, without its generic machinery (NaN checks, axis handling): a
    partition around the middle, 5x faster on the refinement's few thousand samples (also the depth cue's
    per-surface medians)."""
    n = len(a)
    k = n // 2
    if n % 2:
        return float(np.partition(a, k)[k])
    p = np.partition(a, (k - 1, k))
    return 0.5 * float(p[k - 1] + p[k])
