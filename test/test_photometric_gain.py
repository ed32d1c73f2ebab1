"""The RGB-D predictor's direct photometric refinement under an exposure change between the frames."""
import cv2
import numpy as np

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.geometry import unproject
from dynrecon_ros.predictors.direct_refinement import photometric_refine


def test_photometric_refinement_is_blind_to_an_exposure_change():
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=3, movers=0, seed=7))
    fi, fj = seq.frames[0], seq.frames[2]
    T_true = np.linalg.inv(seq.poses[0]) @ seq.poses[2]  # pose of j in i
    gi = cv2.cvtColor(fi.rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gj = cv2.cvtColor(fj.rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    pts = unproject(fi.depth, seq.K).reshape(-1, 3)
    grad = np.hypot(cv2.Sobel(gi, cv2.CV_32F, 1, 0), cv2.Sobel(gi, cv2.CV_32F, 0, 1)).ravel()
    sel = np.flatnonzero((grad > 20) & (fi.depth.ravel() > 0))[::3]
    T0 = T_true.copy()
    T0[:3, 3] += [0.004, -0.003, 0.002]  # a few millimetres off, as the flow fit leaves it

    def err(gain):
        T = photometric_refine(gi.ravel()[sel], pts[sel], np.clip(gj * gain, 0, 255), fj.depth, seq.K, T0, 10)
        return np.linalg.norm(T[:3, 3] - T_true[:3, 3])

    same, brighter = err(1.0), err(1.12)  # 12 % auto-exposure step
    assert same < 1e-3, same
    assert brighter < 1.5 * same + 2e-4, (same, brighter)


def test_one_exposure_gain_ignores_a_mover_over_part_of_the_samples():
    from dynrecon_ros.photometric import exposure_gain
    rng = np.random.default_rng(0)
    gray_i = rng.uniform(20, 200, 5000)
    seen_j = 1.1 * gray_i + rng.normal(0, 3, 5000)  # 10 % brighter, sensor noise
    moved = rng.random(5000) < 0.3
    seen_j[moved] = rng.uniform(150, 255, moved.sum())  # a bright mover over 30 % of the samples
    assert abs(np.median(seen_j) / np.median(gray_i) - 1.1) > 0.1  # the case is meaningful
    assert abs(exposure_gain(seen_j, gray_i) - 1.1) < 0.02
    # too few usable samples (dark or unseen): no gain
    assert exposure_gain(seen_j[:50], gray_i[:50]) == 1.0
    assert exposure_gain(np.where(gray_i > 8, np.nan, seen_j), gray_i) == 1.0
